"""``value_and_grad``: ``nnx.value_and_grad`` with row-sparse gradients for sparse layers.

For every ``SparseInput`` and ``SlideDense`` the loss calls, the gradient of its ``RowParam``
weights is a :class:`slidejax.optim.RowGrad` (the ids of the rows the layer gathered and the
gradient of those rows); every other ``nnx.Param`` gets its ordinary gradient. No
``[N, width]`` gradient is formed. :class:`slidejax.optim.Optimizer` applies both kinds.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from slidejax.nn import _capture
from slidejax.nn._slide_dense import SlideDense
from slidejax.nn._sparse_input import SparseInput
from slidejax.nn._variables import RowDelta
from slidejax.nn._variables import RowParam
from slidejax.optim._optimizer import RowGrad
from slidejax.optim._row_sparse import sum_duplicate_rows


def sparse_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """(path, layer) for every ``SparseInput`` / ``SlideDense`` inside ``model``."""
  return [(path, mod) for path, mod in nnx.iter_modules(model)
          if isinstance(mod, (SparseInput, SlideDense))]


def _gathered_shapes(fn: Callable, model: nnx.Module, args, kwargs) -> dict:
  """path -> shape of the row ids each sparse layer gathers when ``fn(model, ...)`` runs
  (an abstract trace on a copy of the model: nothing runs, nothing changes)."""
  graphdef, state = nnx.split(model)
  found: dict = {}

  def trace(state):
    clone = nnx.merge(graphdef, state)
    paths = {id(layer): path for path, layer in sparse_layers(clone)}
    with _capture.recording() as recorded:
      fn(clone, *args, **kwargs)
    for layer_id, (_, shape) in recorded.items():
      found[paths[layer_id]] = shape

  jax.eval_shape(trace, state)
  return found


def _row_grads(layer, delta_grads: dict) -> dict:
  """name -> RowGrad of each RowParam of ``layer`` (unique ids; per-sample sets summed;
  block-local ids for a layer of several blocks)."""
  gathered = layer.active_ids[...]
  if getattr(layer, "shards", 1) > 1:   # block-local ids [S, M / S]: rows likewise
    return {name[:-len("_delta")]: RowGrad(gathered, grad.reshape(gathered.shape
                                                                  + grad.shape[1:]))
            for name, grad in delta_grads.items()}
  ids = gathered.reshape(-1)
  num_rows = layer.kernel.shape[0]
  rows = {name[:-len("_delta")]: grad.reshape((-1,) + grad.shape[gathered.ndim:])
          for name, grad in delta_grads.items()}
  if isinstance(layer, SlideDense) and layer.mode == "per_sample":   # sets overlap: sum
    ids, rows = sum_duplicate_rows(ids, rows, num_rows)
  return {name: RowGrad(ids, value) for name, value in rows.items()}


def value_and_grad(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """Like ``nnx.value_and_grad(fn, has_aux=has_aux)``, differentiating ``fn``'s first
  argument (a model) with respect to its ``nnx.Param`` variables, with row-sparse gradients
  for the ``RowParam`` weights of its sparse layers.

  Returns ``f(model, *args, **kwargs) -> (value, grads)`` (``value`` = ``(loss, aux)`` with
  ``has_aux``); ``grads`` is an ``nnx.State`` of the model's Params, holding a
  :class:`slidejax.optim.RowGrad` for each sparse layer's ``RowParam`` (an
  ``nnx.Optimizer`` cannot apply these: use :class:`slidejax.optim.Optimizer`). Each sparse
  layer may be called once inside ``fn``; a sparse layer ``fn`` does not call gets empty
  row gradients. A ``RowParam`` is differentiated only through its layer's call: reading
  ``layer.kernel`` elsewhere in ``fn`` contributes no gradient. Works eagerly and under
  ``nnx.jit``.
  """

  @functools.wraps(fn)
  def wrapper(model, *args, **kwargs):
    shapes = _gathered_shapes(fn, model, args, kwargs)
    layers = {path: layer for path, layer in sparse_layers(model) if path in shapes}
    dense_params = nnx.All(nnx.Param, nnx.Not(RowParam))
    for path, layer in layers.items():
      layer.attach_row_delta(shapes[path])
    try:
      diff = nnx.DiffState(0, nnx.Any(RowDelta, dense_params))
      value, grads = nnx.value_and_grad(fn, argnums=diff, has_aux=has_aux)(
          model, *args, **kwargs)
      flat = dict(nnx.to_flat_state(nnx.state(grads, dense_params)))
      for path, layer in layers.items():
        deltas = {name: _at(grads, path + (name,)) for name, value in vars(layer).items()
                  if isinstance(value, RowDelta)}
        for name, row_grad in _row_grads(layer, deltas).items():
          flat[path + (name,)] = RowParam(row_grad)
    finally:
      for layer in layers.values():
        layer.detach_row_delta()
    for path, layer in sparse_layers(model):   # not called by the loss: no rows touched
      if path not in layers:
        for name, value in vars(layer).items():
          if isinstance(value, RowParam):
            flat[path + (name,)] = RowParam(RowGrad(
                jnp.zeros((0,), jnp.int32), jnp.zeros((0,) + value.shape[1:], value.dtype)))
    return value, nnx.from_flat_state(sorted(flat.items()))

  return wrapper


def _at(state, path):
  node = state
  for name in path:
    node = node[name]
  return node[...] if isinstance(node, nnx.Variable) else node


def grad(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """:func:`value_and_grad` returning only the gradients (``(grads, aux)`` with ``has_aux``)."""
  vg = value_and_grad(fn, has_aux=has_aux)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    value, grads = vg(*args, **kwargs)
    return (grads, value[1]) if has_aux else grads

  return wrapper
