"""Jit-compiled sparse and dense training steps over NNX models.

A *sparse* step differentiates the loss with respect to the ordinary (dense) parameters and
to zero perturbations of the rows each sparse layer gathered (``RowDelta``): the gradient
with respect to such a perturbation is exactly the gradient of the gathered rows, so no
``[num_rows, width]`` gradient is ever formed. Dense parameters get an optax update; each
``RowParam`` group gets a row-sparse update (:func:`slidejax.optim.row_sparse`).

Model contract: ``model(feature_ids, feature_values, *, labels=, key=) -> SlideOutput`` (as
:class:`slidejax.nn.SlideMLP`), with its sparse layers :class:`~slidejax.nn.SparseInput` and
:class:`~slidejax.nn.SlideDense` anywhere inside.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from slidejax import optim
from slidejax._memory import release_free_memory
from slidejax.nn import ActiveIds
from slidejax.nn import RowDelta
from slidejax.nn import RowParam
from slidejax.nn import SlideDense
from slidejax.nn import SparseInput
from slidejax.nn import sampled_softmax_loss


class SparseTrainState(NamedTuple):
  """Everything a sparse step reads and writes (pure pytrees, donated each step)."""
  row_params: dict      # pure dict of RowParam arrays
  dense_params: dict    # pure dict of the other nnx.Param arrays
  other: Any            # nnx.State of the rest (tables, hash params, active ids)
  dense_opt_state: Any
  row_opt_state: dict   # layer path string -> RowSparseState
  step: jax.Array       # int32 scalar


class StepMetrics(NamedTuple):
  loss: jax.Array
  forced_dropped: jax.Array


def sparse_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """(path, layer) for every SparseInput / SlideDense inside ``model``."""
  return [(path, mod) for path, mod in nnx.iter_modules(model)
          if isinstance(mod, (SparseInput, SlideDense))]


def attach_row_deltas(model: nnx.Module, batch_size: int, max_features: int) -> None:
  """Gives every sparse layer its row-gradient perturbation for the given batch shape."""
  for _, layer in sparse_layers(model):
    if isinstance(layer, SparseInput):
      layer.attach_row_delta(batch_size, max_features)
    else:
      layer.attach_row_delta(batch_size)


def detach_row_deltas(model: nnx.Module) -> None:
  for _, layer in sparse_layers(model):
    layer.detach_row_delta()


def _get(tree: dict, path: tuple) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> dict:
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _row_group(row_params: dict, path: tuple, names: tuple[str, ...]) -> dict:
  node = _get(row_params, path)
  return {name: node[name] for name in names}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _to_state(abstract_state, pure: dict):
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state


class SparseTrainer(NamedTuple):
  """``init()`` -> state; ``step(state, batch, key)`` -> (state, StepMetrics);
  ``rebuild(state, key, redraw)`` -> state; ``write_back(state)`` updates the model;
  ``gradients(state, batch, key)`` -> (loss, grads): the step without its optimizer update
  (jitted, not donating; for profiling)."""
  init: Callable[[], SparseTrainState]
  step: Callable[..., tuple[SparseTrainState, StepMetrics]]
  rebuild: Callable[..., SparseTrainState]
  write_back: Callable[[SparseTrainState], None]
  graphdef: Any
  gradients: Callable[..., tuple[jax.Array, Any]] | None = None


def make_sparse_trainer(model: nnx.Module, dense_tx: optax.GradientTransformation,
                        row_tx: optax.GradientTransformation, *, batch_size: int,
                        max_features: int, donate: bool = True,
                        loss: Callable[..., jax.Array] = sampled_softmax_loss) -> SparseTrainer:
  """Builds a jitted row-sparse training step for ``model``.

  Args:
    model: an NNX model following the module's contract (above).
    dense_tx: optax transformation for the ordinary parameters.
    row_tx: an elementwise optax transformation, applied row-sparsely to each RowParam group.
    batch_size, max_features: the fixed batch shape (``[B, F]`` feature arrays).
    loss: ``(SlideOutput, sample_weight) -> scalar`` (default: the sampled softmax).
  """
  objective = loss
  attach_row_deltas(model, batch_size, max_features)
  layers = sparse_layers(model)
  graphdef, rows0, dense0, deltas0, other0 = nnx.split(model, RowParam, nnx.Param, RowDelta, ...)
  rows_abstract = _abstract(rows0)
  dense_abstract = _abstract(dense0)
  deltas_abstract = _abstract(deltas0)
  group_names = {}
  for path, layer in layers:
    group_names[path] = tuple(name for name, value in vars(layer).items()
                              if isinstance(value, RowParam))
  tx_rows = optim.row_sparse(row_tx)
  # Rows of SparseInput (deduplicated in the forward pass) and of batch-shared SlideDense
  # layers are unique; per-sample active sets overlap and are summed by the optimizer.
  unique_rows = {path: not (isinstance(layer, SlideDense) and layer.mode == "per_sample")
                 for path, layer in layers}

  def init() -> SparseTrainState:
    release_free_memory()   # what building the model left behind, before Adam's moments
    _, rows, dense, _, other = nnx.split(model, RowParam, nnx.Param, RowDelta, ...)
    rows_pure = nnx.to_pure_dict(rows)
    dense_pure = nnx.to_pure_dict(dense)
    row_opt = {"/".join(map(str, path)): tx_rows.init(_row_group(rows_pure, path, names))
               for path, names in group_names.items()}
    return SparseTrainState(rows_pure, dense_pure, other, dense_tx.init(dense_pure), row_opt,
                            jnp.zeros((), jnp.int32))

  def gradients(state: SparseTrainState, batch, key):
    """The step's forward and backward pass: (loss, new other, dropped, dense and row grads)."""
    rows_state = _to_state(rows_abstract, state.row_params)
    weight = (batch.rows >= 0).astype(jnp.float32)

    def loss_fn(dense_pure, deltas_pure):
      other = jax.tree.map(lambda x: x, state.other)  # fresh Variables in this trace
      m = nnx.merge(graphdef, rows_state, _to_state(dense_abstract, dense_pure),
                    _to_state(deltas_abstract, deltas_pure), other)
      out = m(batch.feature_ids, batch.feature_values, labels=batch.label_ids, key=key)
      value = objective(out, weight)
      *_, new_other = nnx.split(m, RowParam, nnx.Param, RowDelta, ...)
      return value, (new_other, out.forced_dropped)

    zero_deltas = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               nnx.to_pure_dict(deltas_abstract))
    (loss, (new_other, dropped)), (dense_grads, delta_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.dense_params, zero_deltas)
    return loss, new_other, dropped, dense_grads, delta_grads

  def step(state: SparseTrainState, batch, key):
    loss, new_other, dropped, dense_grads, delta_grads = gradients(state, batch, key)
    dense_updates, dense_opt_state = dense_tx.update(dense_grads, state.dense_opt_state,
                                                     state.dense_params)
    dense_params = optax.apply_updates(state.dense_params, dense_updates)
    other_pure = nnx.to_pure_dict(new_other)
    row_params = state.row_params
    row_opt_state = dict(state.row_opt_state)
    for path, names in group_names.items():
      name = "/".join(map(str, path))
      ids = _get(other_pure, path)["active_ids"].reshape(-1)
      params = _row_group(row_params, path, names)
      grads = {n: g.reshape((ids.shape[0],) + params[n].shape[1:])
               for n, g in ((n, _get(delta_grads, path)[f"{n}_delta"]) for n in names)}
      updates, uids, row_opt_state[name] = tx_rows.update(
          grads, row_opt_state[name], params, row_ids=ids, assume_unique=unique_rows[path])
      new_group = optim.apply_row_updates(params, uids, updates)
      node = dict(_get(row_params, path))
      node.update(new_group)
      row_params = _set(row_params, path, node)
    new_state = SparseTrainState(row_params, dense_params, new_other, dense_opt_state,
                                 row_opt_state, state.step + 1)
    return new_state, StepMetrics(loss, dropped)

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())

  def rebuild(state: SparseTrainState, key, redraw: bool = False) -> SparseTrainState:
    """Rebuilds every SlideDense layer's tables from the current weights.

    Runs eagerly: on the host backend each layer's build streams (see
    :func:`slidejax.lsh.build_tables_streamed`). With ``donate`` the old tables are freed
    before the new ones are built, as a donated argument would be: ``state`` is consumed.
    """
    m = nnx.merge(graphdef, _to_state(rows_abstract, state.row_params),
                  _to_state(dense_abstract, state.dense_params),
                  _to_state(deltas_abstract, jax.tree.map(
                      lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(deltas_abstract))),
                  state.other)
    for i, (_, layer) in enumerate(sparse_layers(m)):
      if isinstance(layer, SlideDense) and layer.uses_tables:
        if donate:
          for array in layer.tables.get_value():
            if not isinstance(array, jax.core.Tracer):
              array.delete()
        layer.rebuild(jax.random.fold_in(key, i), redraw=redraw)
    *_, other = nnx.split(m, RowParam, nnx.Param, RowDelta, ...)
    jax.block_until_ready(other)
    release_free_memory()
    return state._replace(other=other)

  def write_back(state: SparseTrainState) -> None:
    """Copies the trained parameters and tables back into ``model`` and detaches the row
    perturbations from it, so ``model`` is again an ordinary module (any batch size).
    The trainer itself keeps working: it holds its own graph."""
    detach_row_deltas(model)
    nnx.update(model, _to_state(rows_abstract, state.row_params),
               _to_state(dense_abstract, state.dense_params),
               nnx.filter_state(state.other, nnx.Not(ActiveIds)))

  def loss_and_grads(state: SparseTrainState, batch, key):
    loss, _, _, dense_grads, delta_grads = gradients(state, batch, key)
    return loss, (dense_grads, delta_grads)

  return SparseTrainer(init=init, step=jitted, rebuild=rebuild, write_back=write_back,
                       graphdef=graphdef, gradients=jax.jit(loss_and_grads))


class DenseTrainState(NamedTuple):
  params: dict
  other: Any
  opt_state: Any
  step: jax.Array


def make_dense_trainer(model: nnx.Module, tx: optax.GradientTransformation, *,
                       donate: bool = True) -> SparseTrainer:
  """The dense baseline step: full softmax, ``tx`` over every parameter.

  ``model(feature_ids, feature_values) -> logits [B, N]`` (as :class:`slidejax.nn.DenseMLP`).
  Returns the same ``init/step/rebuild/write_back`` bundle (``rebuild`` is a no-op).
  """
  from slidejax.nn import dense_softmax_loss
  graphdef, params0, other0 = nnx.split(model, nnx.Param, ...)
  params_abstract = _abstract(params0)

  def init() -> DenseTrainState:
    _, params, other = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    return DenseTrainState(pure, other, tx.init(pure), jnp.zeros((), jnp.int32))

  def step(state: DenseTrainState, batch, key):
    del key
    weight = (batch.rows >= 0).astype(jnp.float32)

    def loss_fn(pure):
      m = nnx.merge(graphdef, _to_state(params_abstract, pure), state.other)
      return dense_softmax_loss(m(batch.feature_ids, batch.feature_values), batch.label_ids,
                                weight)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (DenseTrainState(params, state.other, opt_state, state.step + 1),
            StepMetrics(loss, jnp.zeros((), jnp.int32)))

  def write_back(state: DenseTrainState) -> None:
    nnx.update(model, _to_state(params_abstract, state.params), state.other)

  return SparseTrainer(init=init, step=jax.jit(step, donate_argnums=(0,) if donate else ()),
                       rebuild=lambda state, key, redraw=False: state, write_back=write_back,
                       graphdef=graphdef)


def make_predictor(trainer: SparseTrainer, model: nnx.Module, k: int, *, exact: bool = True):
  """A jitted ``(state, feature_ids, feature_values) -> top-k ids int32 [B, k]``."""
  _, params0, _ = nnx.split(model, nnx.Param, ...)
  params_abstract = _abstract(params0)
  _, rows0, dense0, deltas0, _ = nnx.split(model, RowParam, nnx.Param, RowDelta, ...)
  rows_abstract, dense_abstract, deltas_abstract = map(_abstract, (rows0, dense0, deltas0))

  def predict(state, feature_ids, feature_values):
    if isinstance(state, DenseTrainState):
      m = nnx.merge(trainer.graphdef, _to_state(params_abstract, state.params), state.other)
    else:
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          nnx.to_pure_dict(deltas_abstract))
      m = nnx.merge(trainer.graphdef, _to_state(rows_abstract, state.row_params),
                    _to_state(dense_abstract, state.dense_params),
                    _to_state(deltas_abstract, zero), state.other)
      detach_row_deltas(m)
    return m.top_k(feature_ids, feature_values, k, exact=exact)[1]

  return jax.jit(predict)
