"""Row-sparse wrapper around elementwise optax transformations.

Only the rows of a weight matrix (and of its optimizer state) that a step touched are read
and written: duplicate row ids are summed first, the rows are gathered, the inner
(elementwise) update runs on ``[R, ...]`` rows, and the new rows are scattered back. Scalar
state such as Adam's step count stays global, so bias correction follows the global step.

Row ids equal to ``num_rows`` (out of range) are padding: gathered as zeros, dropped on
scatter. With donated buffers, XLA scatters in place: nothing costs O(num_rows x width).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from slidejax._dedup import MARKS_RATIO
from slidejax._dedup import unique_by_marks
from slidejax._dedup import unique_with_inverse


class RowSparseState(NamedTuple):
  """State of :func:`row_sparse`: the inner transformation's state over all rows."""
  inner_state: Any


class RowSparseTransformation(NamedTuple):
  """An ``init``/``update`` pair like ``optax.GradientTransformation``, over rows.

  ``update(row_grads, state, params, *, row_ids, assume_unique=False)`` returns
  ``(row_updates, new_state)`` where ``row_updates`` has the leading size of ``row_ids``
  (after deduplication when ``assume_unique`` is False, see :func:`sum_duplicate_rows`) and
  the matching ids; apply them with :func:`apply_row_updates`.
  """
  init: Callable[..., RowSparseState]
  update: Callable[..., tuple[Any, jax.Array, RowSparseState]]


def _num_rows(params: Any) -> int:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("row_sparse: params has no arrays")
  sizes = {leaf.shape[0] for leaf in leaves if leaf.ndim >= 1}
  if len(sizes) != 1 or any(leaf.ndim == 0 for leaf in leaves):
    raise ValueError(
        "row_sparse: every parameter must share one leading (row) dimension, got shapes "
        f"{[leaf.shape for leaf in leaves]}")
  return sizes.pop()


def sum_duplicate_rows(row_ids: jax.Array, row_grads: Any, num_rows: int
                       ) -> tuple[jax.Array, Any]:
  """Sums the rows of ``row_grads`` that share an id; output keeps the static size ``R``.

  Args:
    row_ids: int32 ``[R]``; ids ``>= num_rows`` or ``< 0`` are padding.
    row_grads: pytree of ``[R, ...]`` arrays.
  Returns:
    (unique ids int32 ``[R]`` padded with ``num_rows``, summed grads ``[R, ...]`` with zero rows
    at the padding).
  """
  row_ids = jnp.where((row_ids >= 0) & (row_ids < num_rows), row_ids, num_rows).astype(jnp.int32)
  size = row_ids.shape[0]
  if num_rows <= MARKS_RATIO * size:   # O(num_rows) marks beat an O(R log R) sort here
    unique_ids, inverse = unique_by_marks(row_ids, size, num_rows)
    summed = jax.tree.map(   # padding maps to segment `size`: dropped, its rows stay zero
        lambda g: jax.ops.segment_sum(g, inverse, num_segments=size), row_grads)
    return unique_ids, summed
  unique_ids, inverse = unique_with_inverse(row_ids, size, num_rows)
  summed = jax.tree.map(
      lambda g: jax.ops.segment_sum(g, inverse, num_segments=size), row_grads)
  is_pad = unique_ids >= num_rows
  summed = jax.tree.map(
      lambda g: jnp.where(is_pad.reshape((-1,) + (1,) * (g.ndim - 1)), 0, g), summed)
  return unique_ids.astype(jnp.int32), summed




def _gather_state_rows(state: Any, row_ids: jax.Array, num_rows: int) -> Any:
  def gather(leaf):
    if hasattr(leaf, "ndim") and leaf.ndim >= 1 and leaf.shape[0] == num_rows:
      return jnp.take(leaf, row_ids, axis=0, mode="fill", fill_value=0)
    return leaf
  return jax.tree.map(gather, state)


def _scatter_state_rows(state: Any, new_rows: Any, row_ids: jax.Array, num_rows: int) -> Any:
  def scatter(leaf, new_leaf):
    if hasattr(leaf, "ndim") and leaf.ndim >= 1 and leaf.shape[0] == num_rows:
      return leaf.at[row_ids].set(new_leaf.astype(leaf.dtype), mode="drop")
    return new_leaf
  return jax.tree.map(scatter, state, new_rows)


def row_sparse(inner: optax.GradientTransformation) -> RowSparseTransformation:
  """Makes an elementwise optax transformation row-sparse.

  ``inner`` must act elementwise (adam, adamw, sgd, adagrad, rmsprop, momentum, ...): each
  entry's update depends only on that entry's gradient, state and parameter, plus global
  scalars. Rows that are not touched are left bit-identical, their state too (so momentum of
  an untouched row does not decay: the "lazy" semantics of sparse Adam).

  Example::

    tx = row_sparse(optax.adam(1e-3))
    state = tx.init({"kernel": w, "bias": b})
    updates, ids, state = tx.update(row_grads, state, params, row_ids=ids)
    params = apply_row_updates(params, ids, updates)
  """

  def init_fn(params: Any) -> RowSparseState:
    _num_rows(params)
    return RowSparseState(inner_state=inner.init(params))

  def update_fn(row_grads: Any, state: RowSparseState, params: Any, *, row_ids: jax.Array,
                assume_unique: bool = False):
    num_rows = _num_rows(params)
    if assume_unique:
      row_ids = jnp.where((row_ids >= 0) & (row_ids < num_rows), row_ids, num_rows)
      row_ids = row_ids.astype(jnp.int32)
    else:
      row_ids, row_grads = sum_duplicate_rows(row_ids, row_grads, num_rows)
    param_rows = jax.tree.map(lambda p: jnp.take(p, row_ids, axis=0, mode="fill", fill_value=0),
                              params)
    state_rows = _gather_state_rows(state.inner_state, row_ids, num_rows)
    row_updates, new_state_rows = inner.update(row_grads, state_rows, param_rows)
    new_inner = _scatter_state_rows(state.inner_state, new_state_rows, row_ids, num_rows)
    return row_updates, row_ids, RowSparseState(inner_state=new_inner)

  return RowSparseTransformation(init=init_fn, update=update_fn)


def apply_row_updates(params: Any, row_ids: jax.Array, row_updates: Any) -> Any:
  """``params[row_ids] += row_updates`` for each leaf; ids out of range are dropped.

  Ids must be unique (as :meth:`RowSparseTransformation.update` returns them).
  """
  return jax.tree.map(
      lambda p, u: p.at[row_ids].add(u.astype(p.dtype), mode="drop", unique_indices=True),
      params, row_updates)
