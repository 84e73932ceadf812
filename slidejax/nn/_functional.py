"""Pure-functional layer math over fixed-size active neuron sets.

Conventions: ``B`` batch, ``F`` padded features per sample, ``H`` layer input width,
``N`` neurons of the wide layer, ``M`` batch-shared active size, ``m`` per-sample active size.
Active ids equal to ``N`` (out of range on purpose) are padding: gathers use ``mode='fill'``
(zero rows) and the bias of such slots is folded to a large negative number, so no separate
mask is applied to the logits (masking the ``[B, M]`` logits doubled the step in measurements).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from slidejax._dedup import unique_with_inverse  # noqa: F401  (re-exported by slidejax.nn)

# Added to the logit of a padding slot; exp() of it is exactly 0 in float32.
PAD_LOGIT = -1e9


def gather_rows(weights: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows ``weights[ids]`` with out-of-range ids giving zero rows. ``[N, ...]``, ``[...]`` int."""
  return jnp.take(weights, ids, axis=0, mode="fill", fill_value=0)


def gather_block_rows(weights: jax.Array, local_ids: jax.Array) -> jax.Array:
  """Rows of ``weights`` ``[N, ...]`` split into ``S`` equal blocks, by block-local ids
  ``[S, m]`` (out-of-range ids give zero rows): ``[S * m, ...]`` in block order. A batched
  gather over the block axis, so each block's rows are read where the block lives."""
  blocks = weights.reshape((local_ids.shape[0], -1) + weights.shape[1:])
  rows = jax.vmap(gather_rows)(blocks, local_ids)
  return rows.reshape((-1,) + weights.shape[1:])


def embedding_bag(rows: jax.Array, values: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Weighted sum of feature rows per sample.

  Args:
    rows: float32 ``[B, F, H]``, the weight rows of each sample's (padded) feature ids.
    values: float32 ``[B, F]``, feature values; padding has value 0.
    bias: optional float32 ``[H]``.
  Returns:
    float32 ``[B, H]``.
  """
  out = jnp.einsum("bf,bfh->bh", values, rows)
  return out if bias is None else out + bias


def shared_logits(inputs: jax.Array, rows: jax.Array, bias_rows: jax.Array,
                  valid: jax.Array | None = None) -> jax.Array:
  """Logits of a batch-shared active set: one dense matrix product.

  Args:
    inputs: float32 ``[B, H]``.
    rows: float32 ``[M, H]``, weight rows of the active neurons.
    bias_rows: float32 ``[M]``.
    valid: optional bool ``[M]``; invalid slots get ``PAD_LOGIT``.
  Returns:
    float32 ``[B, M]``.
  """
  if valid is not None:
    bias_rows = jnp.where(valid, bias_rows, jnp.asarray(PAD_LOGIT, bias_rows.dtype))
  return inputs @ rows.T + bias_rows


def per_sample_logits(inputs: jax.Array, rows: jax.Array, bias_rows: jax.Array,
                      valid: jax.Array | None = None) -> jax.Array:
  """Logits of per-sample active sets.

  Args:
    inputs: float32 ``[B, H]``.
    rows: float32 ``[B, m, H]``.
    bias_rows: float32 ``[B, m]``.
    valid: optional bool ``[B, m]``.
  Returns:
    float32 ``[B, m]``.
  """
  if valid is not None:
    bias_rows = jnp.where(valid, bias_rows, jnp.asarray(PAD_LOGIT, bias_rows.dtype))
  return jnp.einsum("bh,bmh->bm", inputs, rows) + bias_rows


def target_distribution(label_slots: jax.Array, num_slots: int) -> jax.Array:
  """Target mass spread evenly over each sample's labels present in the active set.

  Args:
    label_slots: int32 ``[B, f]``: position of each true label among the logits' columns,
      -1 for padding (or a label that is not among them).
    num_slots: the number of logit columns (``M``, ``m`` or ``N``).
  Returns:
    float32 ``[B, num_slots]``; rows with no label are all zero.
  """
  present = label_slots >= 0
  count = jnp.sum(present, axis=1, keepdims=True).astype(jnp.float32)
  mass = jnp.where(present, 1.0 / jnp.maximum(count, 1.0), 0.0).astype(jnp.float32)
  batch = jnp.arange(label_slots.shape[0])[:, None]
  slots = jnp.where(present, label_slots, num_slots)  # dropped by the scatter
  return jnp.zeros((label_slots.shape[0], num_slots), jnp.float32).at[batch, slots].add(
      mass, mode="drop")


def softmax_cross_entropy(logits: jax.Array, label_slots: jax.Array,
                          sample_weight: jax.Array | None = None) -> jax.Array:
  """Mean multi-label softmax cross-entropy (targets spread evenly over the true labels).

  Args:
    logits: float32 ``[B, C]``.
    label_slots: int32 ``[B, f]``, column of each true label, -1 padding.
    sample_weight: optional float32 ``[B]`` (0 for padding rows).
  Returns:
    float32 scalar: the weighted mean over samples that have at least one label.
  """
  targets = target_distribution(label_slots, logits.shape[1])
  log_norm = jax.nn.logsumexp(logits, axis=1)
  per_sample = log_norm - jnp.sum(targets * logits, axis=1)
  has_label = jnp.any(label_slots >= 0, axis=1).astype(jnp.float32)
  weight = has_label if sample_weight is None else has_label * sample_weight
  return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def shared_label_slots(active_ids: jax.Array, label_ids: jax.Array) -> jax.Array:
  """Position of each label in a batch-shared active set, -1 where absent.

  Pure-JAX lookup by sorting ``active_ids`` (single int32 key) and ``searchsorted``;
  the host selection kernels return these slots directly.

  Args:
    active_ids: int32 ``[M]`` unique ids (padding ``N`` allowed).
    label_ids: int32 ``[B, f]``, -1 padding.
  Returns:
    int32 ``[B, f]``.
  """
  order = jnp.argsort(active_ids)
  sorted_ids = active_ids[order]
  pos = jnp.clip(jnp.searchsorted(sorted_ids, label_ids), 0, active_ids.shape[0] - 1)
  found = (sorted_ids[pos] == label_ids) & (label_ids >= 0)
  return jnp.where(found, order[pos], -1).astype(jnp.int32)


def per_sample_label_slots(active_ids: jax.Array, label_ids: jax.Array) -> jax.Array:
  """Position of each label in its own sample's active set, -1 where absent.

  Args:
    active_ids: int32 ``[B, m]``.
    label_ids: int32 ``[B, f]``, -1 padding.
  Returns:
    int32 ``[B, f]``.
  """
  return jax.vmap(lambda a, y: shared_label_slots(a, y[None])[0])(active_ids, label_ids)


def top_k_chunked(inputs: jax.Array, weights: jax.Array, bias: jax.Array, k: int,
                  chunk_size: int = 65536, extra: tuple[jax.Array, jax.Array] | None = None,
                  *, normalizer: bool = False):
  """Exact top-``k`` neurons over all ``N`` neurons with memory bounded by ``chunk_size``.

  Args:
    inputs: float32 ``[B, H]``.
    weights: float32 ``[N, H]``.
    bias: float32 ``[N]``.
    extra: (ids int32 ``[B, E]``, -1 for none; scores float32 ``[B, E]``) added to those
      neurons' scores (a sample's repeated id: summed), as a
      :class:`slidejax.nn.LabelShortcut` gives them.
    normalizer: also return each sample's log-sum-exp of all ``N`` scores.
  Returns:
    (scores float32 ``[B, k]``, ids int32 ``[B, k]``), best first; with ``normalizer``, and
    float32 ``[B]``.
  """
  num_neurons = weights.shape[0]
  chunk_size = min(chunk_size, num_neurons)
  k = min(k, num_neurons)
  num_chunks = -(-num_neurons // chunk_size)
  best_scores = jnp.full((inputs.shape[0], k), -jnp.inf, jnp.float32)
  best_ids = jnp.zeros((inputs.shape[0], k), jnp.int32)
  log_total = jnp.full((inputs.shape[0],), -jnp.inf, jnp.float32)
  rows = jnp.arange(inputs.shape[0])[:, None]
  for c in range(num_chunks):  # static, few chunks; each compiles into one program
    start = c * chunk_size
    stop = min(start + chunk_size, num_neurons)
    scores = inputs @ weights[start:stop].T + bias[start:stop]
    if extra is not None:
      ids, values = extra
      inside = (ids >= start) & (ids < stop)
      scores = scores.at[rows, jnp.where(inside, ids - start, stop - start)].add(
          values, mode="drop")
    if normalizer:
      log_total = jnp.logaddexp(log_total, jax.nn.logsumexp(scores, axis=1))
    top_scores, top_pos = jax.lax.top_k(scores, min(k, stop - start))
    merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)
    merged_ids = jnp.concatenate([best_ids, (top_pos + start).astype(jnp.int32)], axis=1)
    best_scores, pos = jax.lax.top_k(merged_scores, k)
    best_ids = jnp.take_along_axis(merged_ids, pos, axis=1)
  if normalizer:
    return best_scores, best_ids, log_total
  return best_scores, best_ids


def mix_votes(scores: jax.Array, ids: jax.Array, log_total: jax.Array, vote_ids: jax.Array,
              votes: jax.Array, weight: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-``k`` of ``(1 - weight) * softmax + weight * votes`` per sample.

  Args:
    scores, ids: a model's top ``M`` logits and label ids ``[B, M]`` (score ``-inf`` for
      none), as ``top_k`` gives them; log_total: float32 ``[B]``, the log-sum-exp of every
      logit (the softmax's normaliser).
    vote_ids, votes: ``[B, W]`` labels (-1 for none) and their votes (summing to at most 1),
      as :class:`slidejax.nn.NeighbourVotes` gives them.
    weight: float32 scalar in ``[0, 1]``.
  Returns:
    (mixed probabilities float32 ``[B, k]``, ids int32 ``[B, k]``), best first. A voted label
    outside the model's top ``M`` counts with its votes alone (its probability, below the
    ``M``-th, is left out).
  """
  probs = jnp.exp(scores - log_total[:, None])
  same = (vote_ids[:, :, None] == ids[:, None, :]) & (vote_ids[:, :, None] >= 0)   # [B, W, M]
  model_part = (1 - weight) * probs + weight * jnp.einsum("bw,bwm->bm", votes,
                                                          same.astype(votes.dtype))
  alone = (vote_ids >= 0) & ~jnp.any(same, axis=2)
  vote_part = jnp.where(alone, weight * votes, -jnp.inf)
  mixed = jnp.concatenate([jnp.where(jnp.isfinite(scores), model_part, -jnp.inf), vote_part],
                          axis=1)
  best, pos = jax.lax.top_k(mixed, k)
  return best, jnp.take_along_axis(jnp.concatenate([ids, vote_ids], axis=1), pos, axis=1)
