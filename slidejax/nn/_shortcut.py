"""``LabelShortcut``: a sparse linear path from input features straight to output labels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slidejax.nn import _capture
from slidejax.nn import _functional as F
from slidejax.nn._variables import ActiveIds
from slidejax.nn._variables import LabelLinks
from slidejax.nn._variables import RowDelta
from slidejax.nn._variables import RowParam


class LabelShortcut(nnx.Module):
  """``logit[b, l] += sum_f values[b, f] * kernel[f, p]`` over the links ``links[f, p] == l``.

  Each input feature links to at most ``per_feature`` labels (fixed, from the training data:
  :func:`slidejax.data.label_links`); only a linked pair carries a weight. A hidden layer of
  width ``H`` maps features to labels through a rank-``H`` product; this path is a sparse
  linear model beside it (one weight per linked pair, full rank), which is what a label whose
  name or tag is itself an input word needs.

  Attributes:
    kernel: ``RowParam`` float32 ``[num_features, per_feature]``, zeros at the start (the
      model starts as it would without the path); row ``f`` is read only by batches that hold
      feature ``f``, so its gradient is row-sparse like an embedding's.
    links: ``LabelLinks`` int32 ``[num_features, per_feature]``: label ids, -1 for none.
  """

  def __init__(self, num_features: int, per_feature: int, num_labels: int, *,
               links: np.ndarray | None = None):
    if num_features <= 0 or per_feature <= 0 or num_labels <= 0:
      raise ValueError(f"LabelShortcut: sizes must be positive, got {num_features}, "
                       f"{per_feature}, {num_labels}")
    shape = (num_features, per_feature)
    if links is None:
      links = np.full(shape, -1, np.int32)
    links = np.asarray(links)
    if links.shape != shape or not np.issubdtype(links.dtype, np.integer):
      raise ValueError(f"LabelShortcut: links must be integers of shape {shape}, got "
                       f"{links.dtype} {links.shape}")
    if links.size and (links.min() < -1 or links.max() >= num_labels):
      raise ValueError(f"LabelShortcut: link ids must be in [-1, {num_labels}), got "
                       f"[{links.min()}, {links.max()}]")
    self.num_features = num_features
    self.per_feature = per_feature
    self.num_labels = num_labels
    self.kernel = RowParam(jnp.zeros(shape, jnp.float32))
    self.links = LabelLinks(jnp.asarray(links, jnp.int32))
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """``[B, F]`` ids and values -> (label ids int32 ``[B, F * per_feature]``, -1 for none;
    their scores float32, same shape). A label linked from several features of a sample
    appears once per link: adding the scores sums them."""
    batch, width = feature_ids.shape
    used = jnp.where((feature_values != 0) & (feature_ids >= 0)
                     & (feature_ids < self.num_features), feature_ids,
                     self.num_features).astype(jnp.int32)
    num_unique = min(batch * width, self.num_features)
    _capture.record(self, (num_unique,))
    if self.kernel_delta is None:
      rows = F.gather_rows(self.kernel[...], used)
    else:
      if self.kernel_delta.shape[0] != num_unique:
        raise ValueError(f"LabelShortcut: row capture prepared for {self.kernel_delta.shape[0]}"
                         f" rows, the batch [{batch}, {width}] gathers {num_unique}")
      unique_ids, slots = F.unique_with_inverse(used.reshape(-1), num_unique,
                                                self.num_features)
      self.active_ids.set_value(unique_ids)
      unique_rows = F.gather_rows(self.kernel[...], unique_ids) + self.kernel_delta[...]
      rows = F.gather_rows(unique_rows, slots.reshape(batch, width))
    links = jnp.take(self.links[...], used, axis=0, mode="fill", fill_value=-1)
    scores = feature_values[..., None].astype(rows.dtype) * rows
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

  def attach_row_delta(self, ids_shape: tuple[int, ...]) -> None:
    """Prepares row-gradient capture (see :func:`slidejax.nn.value_and_grad`) for ``(U,)``
    gathered feature rows."""
    (num_unique,) = ids_shape
    self.kernel_delta = RowDelta(jnp.zeros((num_unique, self.per_feature), self.kernel.dtype))
    self.active_ids = ActiveIds(jnp.full((num_unique,), self.num_features, jnp.int32))

  def detach_row_delta(self) -> None:
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)
