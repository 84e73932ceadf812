"""``SparseInput``: an embedding bag over padded sparse features, with row-sparse gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slidejax.nn import _functional as F
from slidejax.nn._variables import ActiveIds
from slidejax.nn._variables import RowDelta
from slidejax.nn._variables import RowParam


class SparseInput(nnx.Module):
  """``y = sum_f values[b, f] * kernel[ids[b, f]] + bias`` for bag-of-features inputs.

  Attributes:
    kernel: ``RowParam`` float32 ``[num_features, features_out]`` (one contiguous row per
      input feature, so a batch's gradient touches only its feature rows).
    bias: ``nnx.Param`` float32 ``[features_out]``.
  """

  def __init__(self, num_features: int, features_out: int, *,
               kernel_init: nnx.Initializer | None = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_features <= 0 or features_out <= 0:
      raise ValueError(f"SparseInput: sizes must be positive, got {num_features}, {features_out}")
    self.num_features = num_features
    self.features_out = features_out
    init = kernel_init or nnx.initializers.normal(stddev=1.0 / (features_out ** 0.5) * 0.1)
    self.kernel = RowParam(init(rngs.params(), (num_features, features_out), dtype))
    self.bias = nnx.Param(jnp.zeros((features_out,), dtype))
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    """``feature_ids`` int32 ``[B, F]``, ``feature_values`` float32 ``[B, F]`` -> ``[B, out]``.

    Padding entries have value 0; ids out of range read zero rows.
    """
    rows = F.gather_rows(self.kernel[...], feature_ids)
    if self.kernel_delta is not None:
      rows = rows + self.kernel_delta[...]
      used = jnp.where(feature_values != 0, feature_ids, self.num_features)
      self.active_ids.set_value(used.reshape(-1).astype(jnp.int32))
    return F.embedding_bag(rows, feature_values, self.bias[...])

  def attach_row_delta(self, batch_size: int, width: int) -> None:
    """Prepares row-gradient capture for batches of ``[batch_size, width]`` features."""
    self.kernel_delta = RowDelta(
        jnp.zeros((batch_size, width, self.features_out), self.kernel.dtype))
    self.active_ids = ActiveIds(jnp.zeros((batch_size * width,), jnp.int32))

  def detach_row_delta(self) -> None:
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)
