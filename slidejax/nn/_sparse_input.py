"""``SparseInput``: an embedding bag over padded sparse features, with row-sparse gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slidejax.nn import _capture
from slidejax.nn import _functional as F
from slidejax.nn._init import row_chunked
from slidejax.nn._mesh import mesh_of
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
    init = kernel_init or row_chunked(
        nnx.initializers.normal(stddev=1.0 / (features_out ** 0.5) * 0.1))
    self.kernel = RowParam(init(rngs.params(), (num_features, features_out), dtype))
    self.bias = nnx.Param(jnp.zeros((features_out,), dtype))
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    """``feature_ids`` int32 ``[B, F]`` (or ``[F]``, one id list shared by the batch),
    ``feature_values`` float32 ``[B, F]`` -> ``[B, out]``.

    Padding entries have value 0 (a zero value reads no row); ids out of range read zero
    rows. Shared ids ``[F]`` must be unique apart from out-of-range padding (as a shared
    ``SlideDense`` set is): the layer after a sparse hidden layer takes its ``ids [M]`` and
    activations ``[B, M]`` and reads just those ``M`` rows (one ``[B, M] @ [M, out]`` product).
    """
    if feature_ids.ndim == 1:
      return self._shared(feature_ids, feature_values)
    mesh = mesh_of(self.kernel.get_value())
    if mesh is None:
      return self._bag(feature_ids, feature_values)
    # On a mesh every device embeds the whole batch (ids and values are small): the row
    # gradient is then complete on each device, and the backward pass gathers the [B, out]
    # activation gradients instead of summing [U, out] row gradients over the data axis.
    whole = NamedSharding(mesh, P())
    keep = lambda x: jax.lax.with_sharding_constraint(x, whole)  # noqa: E731
    return keep(self._bag(keep(feature_ids), keep(feature_values)))

  def _bag(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    """:meth:`__call__` of ``[B, F]`` ids and values."""
    batch, width = feature_ids.shape
    _capture.record(self, (min(batch * width, self.num_features),))
    if self.kernel_delta is None:
      rows = F.gather_rows(self.kernel[...], feature_ids)
      return F.embedding_bag(rows, feature_values, self.bias[...])
    # Row-gradient capture: gather each distinct feature row once ([U, out]); the gradient
    # w.r.t. kernel_delta is then the (already summed) gradient of those rows.
    num_unique = self.kernel_delta.shape[0]
    if num_unique != min(batch * width, self.num_features):
      raise ValueError(f"SparseInput: row capture prepared for {num_unique} rows, the batch "
                       f"[{batch}, {width}] gathers {min(batch * width, self.num_features)}")
    used = jnp.where(feature_values != 0, feature_ids, self.num_features).astype(jnp.int32)
    unique_ids, slots = F.unique_with_inverse(used.reshape(-1), num_unique, self.num_features)
    self.active_ids.set_value(unique_ids)
    rows = F.gather_rows(self.kernel[...], unique_ids) + self.kernel_delta[...]
    slots = slots.reshape(batch, width)
    if num_unique <= 8 * width:
      # Few distinct rows: a dense [B, U] bag-of-features matrix times the rows is a BLAS
      # product forward and backward, instead of a [B, F, out] gather and scatter-add.
      bag = jnp.zeros((batch, num_unique), rows.dtype).at[
          jnp.arange(batch)[:, None], slots].add(feature_values, mode="drop")
      return bag @ rows + self.bias[...]
    return F.embedding_bag(F.gather_rows(rows, slots), feature_values, self.bias[...])

  def _shared(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    _capture.record(self, feature_ids.shape)
    ids = jnp.where((feature_ids >= 0) & (feature_ids < self.num_features), feature_ids,
                    self.num_features).astype(jnp.int32)
    rows = F.gather_rows(self.kernel[...], ids)
    if self.kernel_delta is not None:
      if self.kernel_delta.shape[0] != ids.shape[0]:
        raise ValueError(f"SparseInput: row capture prepared for {self.kernel_delta.shape[0]} "
                         f"rows, this call gathers {ids.shape[0]}")
      rows = rows + self.kernel_delta[...]
      self.active_ids.set_value(ids)
    return feature_values @ rows + self.bias[...]

  def attach_row_delta(self, ids_shape: tuple[int, ...]) -> None:
    """Prepares row-gradient capture for ``ids_shape`` ``(U,)`` gathered rows (a ``[B, F]``
    batch touches at most ``U = min(B * F, num_features)`` distinct rows)."""
    (num_unique,) = ids_shape
    self.kernel_delta = RowDelta(jnp.zeros((num_unique, self.features_out), self.kernel.dtype))
    self.active_ids = ActiveIds(jnp.full((num_unique,), self.num_features, jnp.int32))

  def detach_row_delta(self) -> None:
    self.kernel_delta = nnx.data(None)
    self.active_ids = nnx.data(None)
