"""``Optimizer``: ``nnx.Optimizer`` that applies any optax transformation row-sparsely where the
gradients are row-sparse (:class:`RowGrad`, from :func:`slidejax.nn.value_and_grad`).

For a row-sparse gradient only the touched rows of the parameter and of every optimizer-state
tree that mirrors the parameters (Adam's moments, ...) are gathered; the transformation runs
once over the whole gradient tree (so global transformations such as
``optax.clip_by_global_norm`` see every gradient: untouched rows have zero gradient) and the
new rows are scattered back. Untouched rows, and their state, stay bit-identical: the "lazy"
semantics of sparse Adam (an untouched row's momentum does not decay, weight decay reaches a
row only when it is touched). The transformation must act elementwise apart from global
scalars (adam, adamw, sgd, momentum, rmsprop, adagrad, lion, chains with clipping, schedules,
``inject_hyperparams``); transformations that mix entries of a row or across rows (factored
second moments, ``optax.masked`` states) need dense gradients.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class RowGrad(NamedTuple):
  """A row-sparse gradient of a ``[N, ...]`` parameter: ``rows[i]`` is the gradient of row
  ``ids[i]``; every other row's gradient is zero.

  Attributes:
    ids: int32 ``[R]`` unique row ids; ``N`` (out of range) marks padding. Or, for a
      parameter split into ``S`` equal row blocks (a layer laid out over ``S`` model shards,
      :class:`slidejax.nn.SlideDense` with ``shards=S``), ``[S, R]`` block-local ids: row
      ``ids[s, i]`` of block ``s``, ``N / S`` marking padding; the update then runs block by
      block (a batched gather and scatter, local to each shard on a mesh).
    rows: ``[R, ...]`` (``[S, R, ...]``), zero at padding.
  """
  ids: jax.Array
  rows: jax.Array


def is_row_grad(x: Any) -> bool:
  return isinstance(x, RowGrad)


class _Dense:
  """Marker in the row-id tree for a parameter with an ordinary (dense) gradient."""


_DENSE = _Dense()


def _param_trees(tree: Any, params: Any, fn) -> Any:
  """Applies ``fn`` to every subtree of ``tree`` shaped like ``params`` (same structure and
  leaf shapes): the optimizer-state copies of the parameters."""
  structure = jax.tree.structure(params)
  shapes = [getattr(leaf, "shape", None) for leaf in jax.tree.leaves(params)]

  def like_params(node) -> bool:
    if jax.tree.structure(node) != structure:
      return False
    return [getattr(leaf, "shape", None) for leaf in jax.tree.leaves(node)] == shapes

  return jax.tree.map(lambda node: fn(node) if like_params(node) else node, tree,
                      is_leaf=like_params)


def _blocks(leaf, ids):
  """``leaf`` ``[N, ...]`` seen as ``[S, N / S, ...]`` for block-local ``ids`` ``[S, R]``."""
  return leaf.reshape((ids.shape[0], -1) + leaf.shape[1:])


def _take(leaf, ids):
  return jnp.take(leaf, ids, axis=0, mode="fill", fill_value=0)


def _take_rows(leaf, ids):
  if ids is _DENSE:
    return leaf
  if ids.ndim == 2:
    return jax.vmap(_take)(_blocks(leaf, ids), ids)
  return _take(leaf, ids)


def _scatter(leaf, new, ids, add: bool):
  """``leaf`` with ``new`` set into (or added to) rows ``ids`` (flat or block-local)."""
  def one(block, new, ids):
    at = block.at[ids]
    new = new.astype(block.dtype)
    return at.add(new, mode="drop", unique_indices=True) if add else at.set(new, mode="drop")
  if ids.ndim == 2:
    return jax.vmap(one)(_blocks(leaf, ids), new, ids).reshape(leaf.shape)
  return one(leaf, new, ids)


def _put_rows(leaf, new, ids):
  if ids is _DENSE:
    return new
  return _scatter(leaf, new, ids, add=False)


def row_sparse_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                      params: Any, **extra_args) -> tuple[Any, Any]:
  """One ``tx`` step over a gradient tree whose leaves are arrays or :class:`RowGrad`.

  Returns ``(new_params, new_opt_state)``: dense leaves updated as ``optax.apply_updates``
  does, row-sparse leaves by a scatter-add into their touched rows only.
  """
  ids = jax.tree.map(lambda g: g.ids if is_row_grad(g) else _DENSE, grads, is_leaf=is_row_grad)
  grad_rows = jax.tree.map(lambda g: g.rows if is_row_grad(g) else g, grads,
                           is_leaf=is_row_grad)
  param_rows = jax.tree.map(_take_rows, params, ids)
  state_rows = _param_trees(opt_state, params,
                            lambda tree: jax.tree.map(_take_rows, tree, ids))
  updates, new_state_rows = tx.update(grad_rows, state_rows, param_rows, **extra_args)
  # scatter the new state rows back: pair each param-shaped subtree of the old state with
  # its row-sized counterpart in the new one (same positions in both trees)
  old_subtrees = []
  _param_trees(opt_state, params, lambda tree: old_subtrees.append(tree) or tree)
  row_structure = jax.tree.structure(param_rows)
  row_shapes = [leaf.shape for leaf in jax.tree.leaves(param_rows)]

  def like_rows(node) -> bool:
    return (jax.tree.structure(node) == row_structure
            and [getattr(x, "shape", None) for x in jax.tree.leaves(node)] == row_shapes)

  old_iter = iter(old_subtrees)
  new_state = jax.tree.map(
      lambda node: jax.tree.map(_put_rows, next(old_iter), node, ids) if like_rows(node)
      else node, new_state_rows, is_leaf=like_rows)

  def apply(param, update, row_ids):
    if row_ids is _DENSE:
      return (param + update).astype(param.dtype)
    return _scatter(param, update, row_ids, add=True)

  return jax.tree.map(apply, params, updates, ids), new_state


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` with row-sparse updates where gradients are :class:`RowGrad`.

  Same calls as ``nnx.Optimizer``::

    optimizer = slidejax.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    loss, grads = slidejax.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)

  The state (``opt_state``, ``step``) is ``tx.init`` over the full parameters, as in
  ``nnx.Optimizer``; with ``nnx.jit(..., donate_argnums=...)`` over the model and the
  optimizer, the row scatters run in place, so a step costs O(touched rows), not O(rows).
  Dense gradients (e.g. from ``nnx.grad``) are applied as ``nnx.Optimizer`` applies them.
  See the module docstring for which transformations qualify and the lazy semantics.
  """

  def __init__(self, model, tx: optax.GradientTransformation, *, wrt=nnx.Param):
    super().__init__(model, tx, wrt=wrt)

  def update(self, model, grads, /, **kwargs):
    """Applies ``grads`` (a State from :func:`slidejax.nn.value_and_grad` or ``nnx.grad``)
    to ``model`` and advances the optimizer state; returns None (the updates of row-sparse
    leaves are never formed at full size)."""
    params = nnx.as_pure(nnx.state(model, self.wrt))
    grad_tree = nnx.as_pure(nnx.state(grads, self.wrt))
    opt_state = nnx.as_pure(self.opt_state)
    new_params, new_opt_state = row_sparse_update(self.tx, grad_tree, opt_state, params,
                                                  **nnx.as_pure(kwargs))
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state))
    self.step[...] += 1
