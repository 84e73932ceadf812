"""The training step of ``slidejax train``: the public path, compiled once.

:func:`train_step` is what a user writes (``slidejax.value_and_grad`` and
``slidejax.Optimizer.update``); :class:`Trainer` compiles it with ``jax.jit`` over the split
model and optimizer state (donated, so row updates run in place) and runs the eager parts
between steps: table rebuilds and predictions. ``fit``, the benchmarks and the examples all
step through it.

Model contract: ``model(feature_ids, feature_values, *, labels=) -> SlideOutput`` (sampled
loss) or ``-> logits [B, N]`` (dense softmax), as :class:`slidejax.nn.SlideMLP` and
:class:`slidejax.nn.DenseMLP`; ``model.top_k(feature_ids, feature_values, k, exact=)``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slidejax._memory import release_free_memory
from slidejax.distributed import _layout
from slidejax.nn import SlideOutput
from slidejax.nn import rebuild_tables
from slidejax.nn import sampled_softmax_loss
from slidejax.nn import value_and_grad
from slidejax.optim import Optimizer


class TrainBatch(NamedTuple):
  feature_ids: np.ndarray     # int32 [B, F]
  feature_values: np.ndarray  # float32 [B, F]
  label_ids: np.ndarray       # int32 [B, f], -1 padding
  rows: np.ndarray            # int32 [B], -1 = padding row


class StepMetrics(NamedTuple):
  loss: jax.Array             # float32 scalar
  forced_dropped: jax.Array   # int32 scalar: labels that did not fit into the active set


def batch_loss(model: nnx.Module, batch: TrainBatch,
               loss: Callable[..., jax.Array] = sampled_softmax_loss):
  """(loss, forced_dropped) of ``model`` on ``batch`` (padding rows weigh 0): ``loss`` over a
  ``SlideOutput``; full logits ``[B, N]`` (a dense model) are seen as a ``SlideOutput`` with
  every neuron active, so the same ``loss`` (softmax or one-vs-all) applies to them."""
  weight = (batch.rows >= 0).astype(jnp.float32)
  out = model(batch.feature_ids, batch.feature_values, labels=batch.label_ids)
  if not isinstance(out, SlideOutput):
    out = every_neuron_active(out, batch.label_ids)
  return loss(out, weight), out.forced_dropped


def every_neuron_active(logits: jax.Array, label_ids: jax.Array) -> SlideOutput:
  """Full logits ``[B, N]`` and labels ``[B, f]`` (-1 padding) as the ``SlideOutput`` of a
  layer whose active set is every neuron (column ``j`` is neuron ``j``)."""
  num_labels = logits.shape[1]
  slots = jnp.where((label_ids >= 0) & (label_ids < num_labels), label_ids, -1)
  ids = jnp.arange(num_labels, dtype=jnp.int32)
  return SlideOutput(logits, ids, jnp.ones((num_labels,), bool), slots.astype(jnp.int32),
                     jnp.zeros((), jnp.int32))


def train_step(model: nnx.Module, optimizer: Optimizer, batch: TrainBatch,
               loss: Callable[..., jax.Array] = sampled_softmax_loss) -> StepMetrics:
  """One step: row-sparse gradients of ``batch_loss`` and ``optimizer.update``. Mutates
  ``model`` and ``optimizer`` (run it under ``nnx.jit``, or through :class:`Trainer`)."""
  (value, dropped), grads = value_and_grad(batch_loss, has_aux=True)(model, batch, loss)
  optimizer.update(model, grads)
  return StepMetrics(value, dropped)


def _abstract_batch(batch_size: int, max_features: int, max_labels: int) -> TrainBatch:
  return TrainBatch(jax.ShapeDtypeStruct((batch_size, max_features), jnp.int32),
                    jax.ShapeDtypeStruct((batch_size, max_features), jnp.float32),
                    jax.ShapeDtypeStruct((batch_size, max_labels), jnp.int32),
                    jax.ShapeDtypeStruct((batch_size,), jnp.int32))


class Trainer:
  """:func:`train_step` compiled over the split ``(model, optimizer)`` state.

  ``state`` is the ``nnx.State`` of both; the trainer keeps it as its flat list of arrays
  (donated each step: a flat list takes jit's fast dispatch path, about 1.6 ms per step less
  than the ``nnx.State`` at Amazon-670K shape). :attr:`model` / :attr:`optimizer` rebuild
  the objects from it, sharing its arrays. ``rebuild`` rebuilds the LSH tables eagerly (host
  kernels stream), freeing the old ones first.

  ``mesh``: a ``("data", "model")`` mesh (:func:`slidejax.distributed.make_mesh`) to lay the
  state out on (:mod:`slidejax.distributed`: blocked layers over ``model``, the rest
  replicated) and split batches over ``data``; the step is the same program.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               loss: Callable[..., jax.Array] = sampled_softmax_loss, donate: bool = True,
               mesh=None):
    release_free_memory()   # what building the model left behind, before the optimizer state
    self.graphdef, state = nnx.split((model, Optimizer(model, tx, wrt=nnx.Param)))
    self._leaves, self._treedef = jax.tree.flatten(state)
    self.donate = donate
    self.mesh = mesh
    jit_options = {}
    if mesh is not None:
      _layout.check_layout(model, mesh)
      self._shardings = jax.tree.leaves(_layout.state_shardings(state, model, mesh))
      self._leaves = _layout.place(self._leaves, self._shardings)
      batch = _layout.batch_sharding(mesh)
      jit_options = dict(in_shardings=(self._shardings, batch),
                         out_shardings=(self._shardings, NamedSharding(mesh, P())))

    def step(leaves, batch):
      model, optimizer = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))
      metrics = train_step(model, optimizer, batch, loss)
      new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
      if treedef != self._treedef:
        raise ValueError("the training step changed the structure of the model's state")
      return new_leaves, metrics

    self._step = jax.jit(step, donate_argnums=(0,) if donate else (), **jit_options)
    self._compiled = {}

  def _on_mesh(self):
    """The context that traces for the trainer's mesh (none without one)."""
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _placed(self, leaves: list) -> list:
    """``leaves`` where the trainer keeps them (on its mesh: laid out as at the start)."""
    if self.mesh is None:
      return leaves
    return _layout.place(leaves, self._shardings)

  @property
  def state(self) -> nnx.State:
    """The ``nnx.State`` of ``(model, optimizer)`` (the trainer's arrays, not copies)."""
    return jax.tree.unflatten(self._treedef, self._leaves)

  @state.setter
  def state(self, state) -> None:
    leaves, treedef = jax.tree.flatten(state)
    if treedef != self._treedef:
      raise ValueError("Trainer.state: the new state has another structure")
    self._leaves = self._placed(leaves)

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state)[0]

  @property
  def optimizer(self) -> Optimizer:
    return nnx.merge(self.graphdef, self.state)[1]

  def set_hyperparams(self, **values: float) -> None:
    """Sets hyperparameters of an ``optax.inject_hyperparams`` transformation (e.g.
    ``learning_rate``) for the next steps; raises KeyError for one the optimizer lacks."""
    if not hasattr(self, "_hyperparam_index"):
      paths = jax.tree_util.tree_flatten_with_path(self.state)[0]
      self._hyperparam_index = {
          path[-2].key: i for i, (path, _) in enumerate(paths)
          if len(path) >= 3 and getattr(path[-3], "key", None) == "hyperparams"}
    for name, value in values.items():
      if name not in self._hyperparam_index:
        raise KeyError(f"the optimizer has no injected hyperparameter {name!r} (known: "
                       f"{sorted(self._hyperparam_index)})")
      i = self._hyperparam_index[name]
      value = jnp.asarray(value, self._leaves[i].dtype)
      if self.mesh is not None:
        value = _layout.place(value, self._shardings[i])
      self._leaves[i] = value

  def compile(self, batch_size: int, max_features: int, max_labels: int):
    """Compiles the step for a batch shape (before the first batch: the compiler's transient
    memory is returned to the OS before training allocates more)."""
    shape = (batch_size, max_features, max_labels)
    if shape not in self._compiled:
      abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._leaves]
      with self._on_mesh():
        self._compiled[shape] = self._step.lower(abstract,
                                                 _abstract_batch(*shape)).compile()
      release_free_memory()
    return self._compiled[shape]

  def step(self, batch: TrainBatch) -> StepMetrics:
    """One training step on ``batch`` (fixed shapes); returns its metrics unread (async)."""
    shape = tuple(batch.feature_ids.shape) + (batch.label_ids.shape[1],)
    if self.mesh is not None and jax.process_count() > 1:
      # every process holds the whole batch: each feeds its own devices' part (one process
      # hands the host arrays to the compiled step, which splits them as it was compiled to)
      batch = _layout.global_arrays(batch, _layout.batch_sharding(self.mesh))
    self._leaves, metrics = self.compile(*shape)(self._leaves, batch)
    return metrics

  def rebuild(self, *, redraw: bool = False) -> None:
    """Rebuilds every LSH table of the model from its current weights (keys from each layer's
    own stream), freeing the old tables first when the trainer donates."""
    model, optimizer = nnx.merge(self.graphdef, self.state)
    rebuild_tables(model, redraw=redraw, free_old=self.donate)
    self.state = nnx.state((model, optimizer))
    jax.block_until_ready(self.state)
    release_free_memory()

  @functools.cached_property
  def _top_k(self):
    graphdef = self.graphdef
    treedef = self._treedef
    # on a mesh: answers on every device (each process reads them whole)
    placed = {} if self.mesh is None else dict(out_shardings=NamedSharding(self.mesh, P()))

    @functools.partial(jax.jit, static_argnames=("k", "exact"), **placed)
    def top_k(leaves, feature_ids, feature_values, k, exact):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))[0]
      return model.top_k(feature_ids, feature_values, k, exact=exact)

    return top_k

  def predict(self, feature_ids, feature_values, k: int = 5, *, exact: bool = True
              ) -> jax.Array:
    """Top-``k`` label ids int32 ``[B, k]`` of the current model."""
    if self.mesh is not None and jax.process_count() > 1:   # as in step
      feature_ids, feature_values = _layout.global_arrays(
          (feature_ids, feature_values), NamedSharding(self.mesh, P()))
    with self._on_mesh():
      return self._top_k(self._leaves, feature_ids, feature_values, k, exact)[1]
