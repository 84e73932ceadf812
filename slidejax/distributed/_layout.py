"""Where each array of a model (and its optimizer) lives on a ``("data", "model")`` mesh.

A :class:`slidejax.nn.SlideDense` built with ``shards=S`` splits its neurons into ``S`` equal
blocks, each with its own hash functions and tables. On a mesh whose ``model`` axis divides
``S``, block ``s`` lives on model shard ``s * model // S``: the layer's kernel and bias rows,
their optimizer state (Adam's moments, ...), its hash functions and tables are split over
``model`` along their leading axis. Every other array (the embedding, dense layers, counters,
random streams) is replicated, and a batch is split over ``data``.

The layer then selects, gathers and updates block by block (``shard_map`` for the selection,
batched gathers and scatters for the rows), and XLA inserts the collectives the rest needs: the
softmax normalizer over the active columns of every shard, the sum over ``data`` of row
gradients. Nothing else changes: the same model, optimizer, step and loop run on one device.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slidejax import lsh
from slidejax.nn import SlideDense

DATA = "data"
MODEL = "model"
BLOCKED_FIELDS = ("kernel", "bias", "hash_params", "tables")


def blocked_paths(model: nnx.Module) -> list[tuple]:
  """Paths (inside ``model``) of every array laid out over ``model``: the
  :data:`BLOCKED_FIELDS` of each :class:`SlideDense` with more than one block."""
  return [tuple(path) + (field,) for path, layer in nnx.iter_modules(model)
          if isinstance(layer, SlideDense) and layer.shards > 1 for field in BLOCKED_FIELDS]


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _variable_of(keys: tuple, variables: set) -> tuple | None:
  """The longest variable path of the model that occurs in a leaf's key path (a leaf of the
  model's state, or of an optimizer-state tree mirroring it), or None."""
  found = None
  for start in range(len(keys)):
    for end in range(start + 1, len(keys) + 1):
      run = keys[start:end]
      if run in variables and (found is None or len(run) > len(found)):
        found = run
  return found


def state_shardings(state: Any, model: nnx.Module, mesh: Mesh) -> Any:
  """The ``NamedSharding`` of every leaf of ``state`` (a pytree holding ``model``'s state,
  e.g. ``nnx.state((model, optimizer))``): over ``model`` where the leaf belongs to a blocked
  field of a layer (the optimizer's copies included), replicated elsewhere."""
  blocked = set(blocked_paths(model))
  variables = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model))}
  variables |= blocked
  split, whole = NamedSharding(mesh, P(MODEL)), NamedSharding(mesh, P())

  def sharding(path, leaf):
    return split if _variable_of(_keys(path), variables) in blocked else whole

  return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A batch's arrays: split over ``data`` along their leading (sample) axis."""
  return NamedSharding(mesh, P(DATA))


def global_arrays(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays (the same in every process) as global arrays placed by ``sharding``: each
  process supplies its own devices' parts (one process: a plain ``device_put``)."""
  return place(jax.tree.map(np.asarray, tree), sharding)


def place(tree: Any, shardings: Any) -> Any:
  """``tree``'s arrays placed by ``shardings`` (a matching tree, or one sharding). With several
  processes, arrays that each process holds whole (the same values everywhere, e.g. a model
  each process initialised from the same seed) become global arrays, each process supplying
  its own devices' parts; arrays already placed so are kept."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if getattr(x, "sharding", None) == sharding:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
    value = host_value(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def host_value(array: jax.Array) -> np.ndarray:
  """The whole value of ``array`` on this host (gathered from every process when it spans
  several)."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def check_layout(model: nnx.Module, mesh: Mesh) -> None:
  """Raises ValueError unless every blocked layer of ``model`` divides over ``mesh``."""
  if tuple(mesh.axis_names) != (DATA, MODEL):
    raise ValueError(f"the mesh's axes must be {(DATA, MODEL)}, got {mesh.axis_names}")
  size = mesh.shape[MODEL]
  for path, layer in nnx.iter_modules(model):
    if isinstance(layer, SlideDense) and layer.shards % size:
      raise ValueError(f"layer {'.'.join(map(str, path)) or '(root)'} has {layer.shards} "
                       f"blocks: they do not divide over a model axis of {size}")


def relayout(model: nnx.Module, shards: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """``model`` (a :class:`slidejax.nn.SlideMLP`) with its output layer in ``shards`` blocks,
  e.g. a model trained on one device, for a mesh whose ``model`` axis divides ``shards`` (or
  back to ``shards=1``). The weights are the same (a rounded-up last block's extra rows start
  at zero and are never a label); the tables hold block-local ids, so each block gets hash
  functions drawn from ``rngs`` and tables rebuilt from its rows (their size follows the new
  blocks when it was the default for the old ones). Returns a new model on this process's
  default device (one process; ``Trainer(model, tx, mesh=...)`` lays it out)."""
  from slidejax.nn import SlideMLP
  if not isinstance(model, SlideMLP):
    raise TypeError(f"relayout: expected a SlideMLP, got {type(model).__name__}")
  spec = model.spec
  trunk = {name: spec[name] for name in ("hidden", "dropout", "residual", "output_init")}
  options = dict(spec["output"], shards=shards)
  old_rows = model.output.block_rows
  if options["range_bits"] == lsh.default_range_bits(old_rows, options["bucket_capacity"]):
    # sized for the old blocks: size them for the new ones (and SimHash's k with them)
    if options["hash"] == "simhash" and options["k"] == options["range_bits"]:
      options["k"] = None
    options["range_bits"] = None
  new = SlideMLP(spec["num_features"], spec["num_labels"], rngs=rngs, **trunk, **options)
  where = new.output.bias.get_value().sharding   # the new model's device: copies go there
  kept = nnx.Not(nnx.Any(nnx.PathContains("output")))
  nnx.update(new, jax.device_put(nnx.state(model, kept), where))
  labels = spec["num_labels"]
  for name in ("kernel", "bias"):
    old = jax.device_put(getattr(model.output, name)[...][:labels], where)
    rows = jax.numpy.zeros_like(getattr(new.output, name)[...]).at[:labels].set(old)
    getattr(new.output, name).set_value(rows)
  new.output.rebuild(rngs.params())
  return new
