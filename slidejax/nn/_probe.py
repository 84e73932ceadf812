"""Selection-quality telemetry: how good are a :class:`SlideDense` layer's active sets?

On a probe batch the exact logits over every neuron are computed and compared with the
active sets the layer selects, so a collapsed table or a sampler that picks easy negatives is
visible at a glance. Costs one exact pass over all neurons: call it every few hundred steps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from slidejax import lsh
from slidejax.nn import _functional as F

RECALL_KS = (10, 100)
UNIFORM_DRAWS = 1024


def _in_active_set(top_ids: jax.Array, active_ids: jax.Array, valid: jax.Array) -> jax.Array:
  """bool ``[B, k]``: whether each of a sample's ``top_ids`` is in its active set
  (``active_ids`` ``[M]`` shared by the batch, or ``[B, m]``)."""
  if active_ids.ndim == 1:
    active_ids = jnp.broadcast_to(active_ids, (top_ids.shape[0],) + active_ids.shape)
    valid = jnp.broadcast_to(valid, active_ids.shape)
  members = jnp.where(valid, active_ids, -1)
  return jax.vmap(lambda ids, act: jnp.isin(ids, act))(top_ids, members)


@functools.partial(jax.jit, static_argnames=("k",))
def _exact_top(inputs, kernel, bias, k):
  return F.top_k_chunked(inputs, kernel, bias, k)


def selection_probe(layer, inputs: jax.Array, labels: jax.Array, key: jax.Array) -> dict:
  """Selection-quality numbers of ``layer`` for one batch (plain floats).

  Args:
    layer: a :class:`slidejax.nn.SlideDense` in ``shared`` or ``per_sample`` mode.
    inputs: float32 ``[B, in_features]``; labels: int32 ``[B, f]`` (-1 padding), forced in as
      in training.
    key: PRNG key of the selection and of the uniform reference draws.
  Returns:
    ``recall@10`` / ``recall@100``: share of each sample's 10 / 100 highest exact logits that
    are in its active set; ``table_share``: share of the non-label active slots that hold a
    table candidate (the rest is random top-up; 0 for samplers without tables);
    ``negative_logit`` / ``uniform_logit``: mean exact logit of the selected non-label neurons
    and of uniformly drawn ones; ``bucket_occupancy`` (non-empty buckets / buckets) and
    ``largest_bucket_share`` (the largest bucket's population / neurons, max over tables)
    for LSH layers.
  """
  select_key, draw_key = jax.random.split(key)
  kernel, bias = layer.kernel[...], layer.bias[...]
  num = layer.out_features
  labels = labels.astype(jnp.int32)
  k = min(max(RECALL_KS), num)
  _, top_ids = _exact_top(inputs, kernel, bias, k)
  active = layer.select(inputs, labels=labels, key=select_key)
  hit = np.asarray(_in_active_set(top_ids, active.ids, active.valid))
  out = {f"recall@{r}": float(hit[:, :min(r, k)].mean()) for r in RECALL_KS}

  ids = np.asarray(active.ids)
  valid = np.asarray(active.valid)
  label_set = np.asarray(labels)
  if ids.ndim == 1:
    is_label = np.isin(ids, label_set[label_set >= 0])
  else:
    is_label = np.stack([np.isin(ids[b], label_set[b][label_set[b] >= 0])
                         for b in range(ids.shape[0])])
  negatives = valid & ~is_label
  logits = np.asarray(_logits_of(inputs, kernel, bias, jnp.asarray(ids)))
  if ids.ndim == 1:
    logits_neg = logits[:, negatives]
  else:
    logits_neg = logits[negatives]
  uniform_ids = jax.random.randint(draw_key, (UNIFORM_DRAWS,), 0, num, jnp.int32)
  out["negative_logit"] = float(logits_neg.mean()) if logits_neg.size else float("nan")
  out["uniform_logit"] = float(np.asarray(_logits_of(inputs, kernel, bias, uniform_ids)).mean())
  out["table_share"] = 0.0
  if layer.uses_tables:
    tables = layer.tables.get_value()
    codes = layer.hash_codes(inputs)
    if layer.shards == 1:
      rows = np.asarray(lsh.bucket_rows(tables, codes))
    else:   # each block's buckets, as global ids: [B, S * l, capacity]
      local = np.asarray(jax.vmap(lsh.bucket_rows)(tables, codes))
      first = (np.arange(layer.shards) * layer.block_rows)[:, None, None, None]
      rows = np.concatenate(list(np.where(local >= 0, local + first, -1)), axis=1)
    if ids.ndim == 1:
      from_table = np.isin(ids, rows[rows >= 0])
    else:
      from_table = np.stack([np.isin(ids[b], rows[b][rows[b] >= 0]) for b in range(len(ids))])
    out["table_share"] = float((from_table & negatives).sum() / max(negatives.sum(), 1))
    counts = np.asarray(tables.counts)
    out["bucket_occupancy"] = float((counts > 0).mean())
    out["largest_bucket_share"] = float(counts.max() / layer.block_rows)
  return out


@jax.jit
def _logits_of(inputs, kernel, bias, ids):
  """Exact logits of the neurons ``ids`` (``[M]``: ``[B, M]``; ``[B, m]``: per sample)."""
  rows = F.gather_rows(kernel, ids)
  b = F.gather_rows(bias, ids)
  if ids.ndim == 1:
    return inputs @ rows.T + b
  return jnp.einsum("bh,bmh->bm", inputs, rows) + b
