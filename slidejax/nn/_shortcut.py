"""``LabelShortcut``: a fixed sparse path from input features straight to output labels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slidejax.nn import _functional as F
from slidejax.nn._variables import LabelLinks


class LabelShortcut(nnx.Module):
  """``logit[b, l] += scale * sum_f values[b, f] * share[f, p]`` over the links
  ``links[f, p] == l``, with ``scale = INITIAL_SCALE * exp(SCALE_GAIN * log_scale)``.

  Each input feature links to the ``per_feature`` labels it co-occurs with most in the
  training rows, weighted by the share of the feature's rows that carry the label
  (:func:`slidejax.data.label_links`). Both are fixed; one scale is learned, in log space and
  ``SCALE_GAIN`` times as fast as a weight (an optimizer's step of ``lr`` changes it by a
  factor ``exp(SCALE_GAIN * lr)``), so a data set where the path helps little turns it down
  within a few hundred steps. What it adds: a
  label whose name or tag is itself a rare input word is scored from its first step, where
  the hidden layer (a rank-``hidden`` map from features to labels, trained by a few gradient
  steps per rare pair) ranks it under frequent labels. Learned beside a hidden layer under
  dropout and through a sampled softmax, the scale ends too small for predictions over every
  label: :func:`slidejax.train.calibrate` (``fit``'s ``--calibrate auto``) multiplies it by a
  factor chosen on validation rows.

  Attributes:
    links: ``LabelLinks`` int32 ``[num_features, per_feature]``: label ids, -1 for none.
    shares: ``LabelLinks`` float32, same shape (0 for none).
    log_scale: ``nnx.Param`` float32 scalar, 0 at the start.
  """

  INITIAL_SCALE = 1.0   # the scale at the start (see the README)
  SCALE_GAIN = 10.0

  def __init__(self, num_features: int, per_feature: int, num_labels: int, *,
               links: tuple[np.ndarray, np.ndarray] | None = None):
    """``links``: (label ids, shares) ``[num_features, per_feature]`` as
    :func:`slidejax.data.label_links` gives them; None: none yet (a model to load into)."""
    if num_features <= 0 or per_feature <= 0 or num_labels <= 0:
      raise ValueError(f"LabelShortcut: sizes must be positive, got {num_features}, "
                       f"{per_feature}, {num_labels}")
    shape = (num_features, per_feature)
    if links is None:
      ids, shares = np.full(shape, -1, np.int32), np.zeros(shape, np.float32)
    else:
      ids, shares = np.asarray(links[0]), np.asarray(links[1], np.float32)
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"LabelShortcut: link ids must be integers of shape {shape}, got "
                       f"{ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < -1 or ids.max() >= num_labels):
      raise ValueError(f"LabelShortcut: link ids must be in [-1, {num_labels}), got "
                       f"[{ids.min()}, {ids.max()}]")
    if shares.shape != shape or not np.isfinite(shares).all():
      raise ValueError(f"LabelShortcut: shares must be finite, of shape {shape}, got "
                       f"{shares.shape}")
    self.num_features = num_features
    self.per_feature = per_feature
    self.num_labels = num_labels
    self.links = LabelLinks(jnp.asarray(ids, jnp.int32))
    self.shares = LabelLinks(jnp.asarray(shares))
    self.log_scale = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """``[B, F]`` ids and values -> (label ids int32 ``[B, F * per_feature]``, -1 for none;
    their scores float32, same shape). A label linked from several features of a sample
    appears once per link: adding the scores sums them."""
    batch = feature_ids.shape[0]
    used = jnp.where((feature_values != 0) & (feature_ids >= 0)
                     & (feature_ids < self.num_features), feature_ids,
                     self.num_features).astype(jnp.int32)
    links = jnp.take(self.links[...], used, axis=0, mode="fill", fill_value=-1)
    shares = F.gather_rows(self.shares[...], used)
    scale = self.INITIAL_SCALE * jnp.exp(self.SCALE_GAIN * self.log_scale[...])
    scores = scale * feature_values[..., None].astype(shares.dtype) * shares
    return links.reshape(batch, -1), scores.reshape(batch, -1)

  def add_to(self, logits: jax.Array, ids: jax.Array | None, feature_ids: jax.Array,
             feature_values: jax.Array) -> jax.Array:
    """``logits`` float32 ``[B, M]`` of the neurons ``ids`` (``[M]``, one set for the batch,
    or ``[B, M]``, one per sample; unique within a set, padding ids ``>= num_labels`` are left
    alone; None: column ``j`` is label ``j``) plus this path's scores of the linked labels
    among them."""
    labels, scores = self(feature_ids, feature_values)
    width = logits.shape[1]
    if ids is None:
      columns = labels
    elif ids.ndim == 1:
      columns = F.shared_label_slots(ids, labels)
    else:
      columns = F.per_sample_label_slots(ids, labels)
    columns = jnp.where(columns >= 0, columns, width)   # not in the set: dropped
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, columns].add(scores, mode="drop")
