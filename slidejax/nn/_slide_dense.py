"""``SlideDense``: a wide layer that computes only the neurons its LSH tables select."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slidejax import lsh
from slidejax.nn import _capture
from slidejax.nn import _functional as F
from slidejax.nn._init import lecun_rows
from slidejax.nn._mesh import mesh_of as _mesh_of
from slidejax.nn._variables import ActiveIds
from slidejax.nn._variables import HashParams
from slidejax.nn._variables import HashTables
from slidejax.nn._variables import RowDelta
from slidejax.nn._variables import RowParam
from slidejax.nn._variables import SamplerCDF

HASH_FAMILIES = ("simhash", "wta", "dwta", "minhash")
POLICIES = lsh.POLICIES
MODES = ("shared", "per_sample", "dense")
SAMPLERS = ("lsh", "uniform", "unigram")
CORRECTIONS = ("none", "logq")
TRANSFORMS = ("none", "center", "mips")
UNIGRAM_POWER = 0.75
MODEL_AXIS = "model"   # the mesh axis a layer's blocks are laid out over (slidejax.distributed)


class SlideOutput(NamedTuple):
  """What a :class:`SlideDense` forward pass computed.

  Attributes:
    logits: float32 ``[B, M]`` (shared), ``[B, m]`` (per-sample) or ``[B, N]`` (dense mode):
      pre-activations of the active neurons, padding slots at a large negative value.
    ids: int32 ``[M]``, ``[B, m]`` or ``[N]``: neuron id of each column (``N`` = padding).
    valid: bool, same shape as ``ids``.
    label_slots: int32 ``[B, f]``: column of each forced (true) label, -1 if none/padding.
    forced_dropped: int32 scalar: labels that did not fit into the active set (shared mode).
    logit_correction: float32, same shape as ``ids``, or None: what the sampled-softmax loss
      subtracts from each column's logit (``log`` of the column's expected inclusion under a
      non-uniform sampler, 0 for forced labels); None when no correction applies.
  """
  logits: jax.Array
  ids: jax.Array
  valid: jax.Array
  label_slots: jax.Array
  forced_dropped: jax.Array
  logit_correction: jax.Array | None = None


def unigram_cdf(label_counts) -> jax.Array:
  """float32 ``[N]``: cumulative draw probabilities ``(counts + 1) ** 0.75``, normalised (in
  float64, then stored as float32)."""
  weights = (np.asarray(label_counts, np.float64) + 1.0) ** UNIGRAM_POWER
  return jnp.asarray(np.cumsum(weights) / np.sum(weights), jnp.float32)


def _make_family(name: str, dim: int, k: int, l: int, range_bits: int | None, bin_size: int):
  if name == "simhash":
    return lsh.simhash(dim, k=k, l=l, range_bits=range_bits)
  if name == "wta":
    return lsh.wta(dim, k=k, l=l, bin_size=bin_size, range_bits=range_bits)
  if name == "dwta":
    return lsh.dwta(dim, k=k, l=l, bin_size=bin_size, range_bits=range_bits)
  if name == "minhash":
    return lsh.minhash(dim, k=k, l=l, range_bits=range_bits)
  raise ValueError(f"unknown hash family {name!r}; expected one of {HASH_FAMILIES}")


def _check_shards(shards, out_features, num_active, mode, sampler, correction) -> None:
  if not isinstance(shards, int) or shards < 1:
    raise ValueError(f"SlideDense: shards must be a positive integer, got {shards!r}")
  if shards == 1:
    return
  if out_features % shards or num_active % shards:
    raise ValueError(f"SlideDense: shards={shards} must divide out_features ({out_features}) "
                     f"and num_active ({num_active})")
  if mode == "per_sample" or sampler == "unigram" or correction != "none":
    raise ValueError("SlideDense: shards > 1 supports the shared and dense modes and the lsh "
                     "and uniform samplers without correction")


def _model_size(mesh) -> int:
  return mesh.shape[MODEL_AXIS] if MODEL_AXIS in mesh.axis_names else 1


def _model_mesh(array, shards: int):
  """The multi-device mesh a layer of ``shards`` blocks runs on (blocks over its ``model``
  axis when it has one larger than 1), or None: one device's view."""
  mesh = _mesh_of(array) if shards > 1 else None
  if mesh is not None and shards % _model_size(mesh):
    raise ValueError(f"SlideDense: {shards} blocks do not divide over a model axis of "
                     f"{_model_size(mesh)}")
  return mesh


def _value(variable):
  """The value of an optional variable (None where the layer has none)."""
  return None if variable is None else variable.get_value()


def _staging_devices() -> set:
  """Each process's first CPU device: where its host callbacks stage their arguments (every
  process decides alike from this, so all of them compile the same program)."""
  first = {}
  for device in jax.devices("cpu"):
    if device.process_index not in first or device.id < first[device.process_index].id:
      first[device.process_index] = device
  return set(first.values())


def _mesh_backend(backend: str | None, mesh) -> str | None:
  """The table backend of a layer on ``mesh``. Host callbacks stage their arguments on a
  process's first CPU device, so a mesh program running there would wait on itself (measured:
  a hung step); on such a mesh the tables work in pure JAX (``slidejax.distributed.make_mesh``
  leaves that device out when it can)."""
  if mesh is None or backend == "jax" or lsh.resolve_backend(backend) != "host":
    return backend
  devices = getattr(mesh, "devices", None)
  if devices is not None and not _staging_devices() & set(devices.flat):
    return backend
  if backend == "host":
    raise ValueError("SlideDense: backend='host' on a mesh that holds the first CPU device "
                     "(where host callbacks stage their arguments): build the mesh without it "
                     "(slidejax.distributed.make_mesh does when a spare device exists)")
  return "jax"


def _selection_stream(rngs: nnx.Rngs) -> nnx.Rngs | None:
  try:
    return nnx.Rngs(select=rngs.select())
  except (AttributeError, KeyError):   # neither a "select" nor a "default" stream
    return nnx.data(None)


@functools.lru_cache(maxsize=None)
def _rebuild_program(family, bucket_capacity: int, insertion: str, backend: str | None,
                     keep_codes: bool, shards: int = 1, mesh=None):
  """One jitted table build per static configuration: ``(hash_params, kernel, key) -> tables``
  (with ``shards`` > 1: one table set per block of rows, stacked; on ``mesh`` each model
  shard builds its own blocks)."""

  def rebuild(hash_params, kernel, key):
    # lax.map keeps one chunk of projections alive at a time (unrolled chunks let XLA hold
    # them all: +2 GB at 670K neurons) and was as fast for SimHash; WTA-style codes are
    # much slower under lax.map on CPU, so they keep explicit chunks.
    loop = "map" if family.name in ("simhash", "minhash") else "unrolled"
    codes = lsh.neuron_codes(family, hash_params, kernel, loop=loop)
    return lsh.build_tables(codes, range_bits=family.range_bits, bucket_capacity=bucket_capacity,
                            insertion=insertion, key=key, backend=backend,
                            keep_codes=keep_codes)

  if shards == 1:
    return jax.jit(rebuild)
  blocks = _on_blocks(jax.vmap(rebuild), mesh, 3)

  def rebuild_blocks(hash_params, kernel, key):
    return blocks(hash_params, kernel.reshape((shards, -1) + kernel.shape[1:]),
                  jax.random.split(key, shards))

  return jax.jit(rebuild_blocks)


def _on_blocks(fn, mesh, num_blocked: int, num_shared: int = 0, *, once: bool = False):
  """``fn`` over arguments whose leading axis is the block axis (the first ``num_blocked``)
  and shared ones (the next ``num_shared``); on ``mesh``, run per model shard (``shard_map``:
  each shard's blocks, host callbacks on its own device), outputs blocked. ``once``: integer
  outputs computed by one replica of each model shard (see :func:`_once_over`)."""
  if mesh is None:
    return fn
  split = _model_size(mesh) > 1   # else every device runs every block (data parallel)
  if once:
    fn = _once_over(fn, tuple(a for a in mesh.axis_names if a != MODEL_AXIS or not split))
  blocked = P(MODEL_AXIS) if split else P()
  specs = (blocked,) * num_blocked + (P(),) * num_shared
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=blocked, check_vma=False)


def _once_over(fn, axes: tuple[str, ...]):
  """``fn`` (inside ``shard_map``; integer and bool outputs) computed only on the devices at
  index 0 along ``axes`` and handed to the others by a sum over ``axes`` (they add zeros):
  a selection that every data replica would repeat runs once, its host callback included,
  for a few integers of traffic."""
  if not axes:
    return fn

  def once(*args):
    first = functools.reduce(jnp.logical_and, [jax.lax.axis_index(a) == 0 for a in axes])
    shapes = jax.eval_shape(fn, *args)
    out = jax.lax.cond(first, lambda: fn(*args),
                       lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def share(x):
      if x.dtype == jnp.bool_:
        return jax.lax.psum(x.astype(jnp.int32), axes) > 0
      return jax.lax.psum(x, axes)

    return jax.tree.map(share, out)

  return once


class SlideDense(nnx.Module):
  """A wide dense layer whose forward pass computes only LSH-selected neurons.

  Sizes positional, options keyword-only, ``rngs`` required (like ``nnx.Linear``)::

    layer = SlideDense(128, 670_091, hash="dwta", k=6, l=50, num_active=2048, rngs=nnx.Rngs(0))
    out = layer(h, labels=label_ids, key=key)        # SlideOutput, logits [B, 2048]

  Attributes:
    kernel: ``RowParam`` float32 ``[out_features, in_features]``: one contiguous row per neuron.
    bias: ``RowParam`` float32 ``[out_features]``.
    tables: ``HashTables`` holding the :class:`slidejax.lsh.LSHTables` of the kernel rows.
    hash_params: ``HashParams``, the hash functions.

  Options:
    hash: ``simhash`` | ``wta`` | ``dwta`` | ``minhash``; ``k`` hashes per table, ``l`` tables.
    range_bits: bits of a table's bucket id (``None``: sized so a bucket holds about
      ``bucket_capacity`` neurons, see :func:`slidejax.lsh.default_range_bits`).
    num_active: active neurons per sample (per-sample mode) or per batch (shared mode).
    policy: ``vanilla`` | ``topk`` | ``threshold`` (found in at least ``threshold`` tables) |
      ``sample_topk`` (shared: each sample's best candidates, merged); see :mod:`slidejax.lsh`.
    mode: ``shared`` (one active set per batch: a dense matrix product), ``per_sample`` or
      ``dense`` (every neuron: the exact reference).
    insertion: ``fifo`` | ``reservoir`` bucket insertion.
    track_codes: keep every neuron's codes in the tables (``[out_features, l]``, uint16 up to
      2**16 buckets, else int32), which
      :func:`slidejax.lsh.update_tables` needs for incremental updates; full rebuilds do not.
    backend: where tables are built and queried: ``host`` (Numba through a host callback),
      ``jax`` (pure JAX), ``None`` (host on CPU, jax on accelerators).
    sampler: where the negatives (the active neurons besides the forced labels) come from:
      ``lsh`` (the hash tables), ``uniform`` (uniformly random ids, no tables) or ``unigram``
      (ids drawn by ``(label_counts + 1) ** 0.75``, no tables, with the sampled-softmax
      ``log q`` correction in :attr:`SlideOutput.logit_correction`).
    label_counts: float ``[out_features]`` training-label counts (``unigram`` only), stored
      in the layer as the cumulative distribution of its draws (``SamplerCDF``), computed
      once, so a step draws and corrects by gathers alone (nothing O(out_features)).
    uniform_share: share of the non-label slots kept for uniform random negatives (``lsh``:
      a mixture of hashed and uniform negatives; 0 = SLIDE's tables alone). The default 0.5
      was the best LSH setting of the selection screening (README: Selection).
    correction: ``none`` or ``logq`` (``lsh`` and ``uniform``): the random fill's columns get
      the log of their inclusion probability (fill size / neurons outside the forced and
      table-selected ones) as ``logit_correction``, so the loss sums the selected neurons
      exactly and estimates the rest of the softmax normalizer from the uniform fill (an
      unbiased estimate of the full one). ``unigram`` always corrects by its own ``log q``.
    in_batch_negatives: per-sample mode: every sample's set also takes the batch's labels
      (after its own, before candidates, as room allows), the negatives that a shared set
      holds by construction.
    transform: what the tables hash (``lsh``): ``none`` the kernel rows and the inputs;
      ``center`` the rows minus their mean row (a query's inner products all change by one
      amount, so the ranking is kept while rows sharing one direction spread over buckets);
      ``mips`` the asymmetric transform for maximum inner product search (Neyshabur & Srebro
      2015): rows ``[w, b] / U`` completed by ``sqrt(1 - |[w, b] / U|^2)`` (``U`` the largest
      row norm), queries ``[x, 1, 0]``, so the angle a hash sees is monotone in the logit.
    shards: split the neurons into this many equal blocks of contiguous rows, each with its
      own hash functions and tables, each contributing ``num_active / shards`` active
      neurons (both must divide evenly). The layout of a layer sharded over a mesh's
      ``model`` axis of size ``m`` dividing ``shards`` (:mod:`slidejax.distributed`: block
      ``s`` lives on model shard ``s * m // shards``);
      the same math on one device, so a model trained on a mesh runs anywhere. ``shared``
      and ``dense`` modes, ``lsh`` and ``uniform`` samplers, no ``logq`` correction.
  """

  def __init__(self, in_features: int, out_features: int, *, hash: str = "simhash",
               k: int | None = None, l: int = 50, bin_size: int = 8,
               range_bits: int | None = None, bucket_capacity: int = 128,
               num_active: int = 2048, policy: str = "vanilla", threshold: int = 2,
               mode: str = "shared", insertion: str = "fifo", backend: str | None = None,
               track_codes: bool = False, kernel_init: nnx.Initializer | None = None,
               sampler: str = "lsh", label_counts=None, uniform_share: float = 0.5,
               correction: str = "none", transform: str = "none",
               in_batch_negatives: bool = True, shards: int = 1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if sampler not in SAMPLERS:
      raise ValueError(f"SlideDense: sampler {sampler!r} is not one of {SAMPLERS}")
    if (sampler == "unigram") != (label_counts is not None):
      raise ValueError("SlideDense: sampler='unigram' needs label_counts (and only it takes them)")
    if label_counts is not None and jnp.shape(label_counts) != (out_features,):
      raise ValueError(f"SlideDense: label_counts must have shape ({out_features},), got "
                       f"{jnp.shape(label_counts)}")
    if not 0.0 <= uniform_share <= 1.0:
      raise ValueError(f"SlideDense: uniform_share must be in [0, 1], got {uniform_share}")
    if transform not in TRANSFORMS:
      raise ValueError(f"SlideDense: transform {transform!r} is not one of {TRANSFORMS}")
    if correction not in CORRECTIONS:
      raise ValueError(f"SlideDense: correction {correction!r} is not one of {CORRECTIONS}")
    if in_features <= 0 or out_features <= 0:
      raise ValueError(f"SlideDense: sizes must be positive, got {in_features}, {out_features}")
    if policy not in POLICIES:
      raise ValueError(f"SlideDense: policy {policy!r} is not one of {POLICIES}")
    if mode not in MODES:
      raise ValueError(f"SlideDense: mode {mode!r} is not one of {MODES}")
    if not 0 < num_active:
      raise ValueError(f"SlideDense: num_active must be positive, got {num_active}")
    if num_active > out_features:
      raise ValueError(f"SlideDense: num_active={num_active} is larger than the layer "
                       f"({out_features} neurons); use mode='dense' to compute every neuron")
    _check_shards(shards, out_features, num_active, mode, sampler, correction)
    if range_bits is None:
      range_bits = lsh.default_range_bits(out_features // shards, bucket_capacity)
    if k is None:
      k = {"simhash": range_bits, "wta": 6, "dwta": 6, "minhash": 4}.get(hash, 6)
    self.resolved_options = dict(
        hash=hash, k=k, l=l, bin_size=bin_size, range_bits=range_bits,
        bucket_capacity=bucket_capacity, num_active=num_active, policy=policy,
        threshold=threshold, mode=mode, insertion=insertion, backend=backend,
        track_codes=track_codes, sampler=sampler, uniform_share=float(uniform_share),
        correction=correction, transform=transform, in_batch_negatives=in_batch_negatives,
        shards=shards)
    self.in_features = in_features
    self.out_features = out_features
    self.num_active = num_active
    self.policy = policy
    self.threshold = threshold
    self.mode = mode
    self.bucket_capacity = bucket_capacity
    self.insertion = insertion
    self.backend = backend
    self.track_codes = track_codes
    self.sampler = sampler
    self.uniform_share = float(uniform_share)
    self.correction = correction
    self.in_batch_negatives = in_batch_negatives
    self.transform = transform
    self.shards = shards
    init = kernel_init or lecun_rows(out_features)   # lecun_normal, drawn in row blocks
    self.kernel = RowParam(init(rngs.params(), (out_features, in_features), dtype))
    self.bias = RowParam(jnp.zeros((out_features,), dtype))
    self.sampler_cdf = (SamplerCDF(unigram_cdf(label_counts)) if sampler == "unigram"
                        else nnx.data(None))
    if self.uses_tables:
      hashed_width = in_features + (2 if transform == "mips" else 0)
      self.family = _make_family(hash, hashed_width, k, l, range_bits, bin_size)
      init_hashes = self.family.init if shards == 1 else jax.vmap(self.family.init)
      hash_key = rngs.params()
      self.hash_params = HashParams(init_hashes(
          hash_key if shards == 1 else jax.random.split(hash_key, shards)))
      self.tables = HashTables(self._build(rngs.params()))
    else:   # samplers without hashing: no tables, nothing to rebuild
      self.family = None
      self.hash_params = nnx.data(None)
      self.tables = nnx.data(None)
    # the selection's randomness: a stream of its own, from the "select" stream of ``rngs``
    # (or its default stream); None when ``rngs`` has neither (then every call needs a key)
    self.rngs = _selection_stream(rngs)
    self.kernel_delta = nnx.data(None)
    self.bias_delta = nnx.data(None)
    self.active_ids = nnx.data(None)

  # -- tables -------------------------------------------------------------------------------
  @property
  def uses_tables(self) -> bool:
    """Whether this layer selects through LSH tables (and so needs rebuilds)."""
    return self.sampler == "lsh" and self.mode != "dense"

  def _hashed_rows(self) -> jax.Array:
    """float32 ``[N, hashed width]``: what the tables hash for each neuron (see transform)."""
    kernel = self.kernel[...]
    if self.transform == "center":
      return kernel - jnp.mean(kernel, axis=0)
    if self.transform == "mips":
      rows = jnp.concatenate([kernel, self.bias[...][:, None]], axis=1)
      sq = jnp.sum(rows * rows, axis=1, keepdims=True)
      scale = jnp.sqrt(jnp.maximum(jnp.max(sq), 1e-30))
      return jnp.concatenate([rows, jnp.sqrt(jnp.maximum(1.0 - sq / scale**2, 0.0)) * scale],
                             axis=1) / scale
    return kernel

  @property
  def block_rows(self) -> int:
    """Neurons per block (``out_features / shards``)."""
    return self.out_features // self.shards

  def model_mesh(self):
    """The mesh this layer's blocks are laid out over (None: one device's view)."""
    return _model_mesh(self.kernel.get_value(), self.shards)

  def hash_codes(self, inputs: jax.Array, hash_params=None) -> jax.Array:
    """int32 ``[B, l]``: the table codes of ``inputs`` ``[B, in_features]`` (with blocks:
    ``[shards, B, l]``, each block's own; ``hash_params``: one block's, default all)."""
    if self.transform == "mips":
      extra = jnp.broadcast_to(jnp.asarray([1.0, 0.0], inputs.dtype), inputs.shape[:-1] + (2,))
      inputs = jnp.concatenate([inputs, extra], axis=-1)
    if hash_params is None:
      hash_params = self.hash_params.get_value()
      if self.shards > 1:
        return jax.vmap(self.family.codes, in_axes=(0, None))(hash_params, inputs)
    return self.family.codes(hash_params, inputs)

  def _build(self, key: jax.Array) -> lsh.LSHTables:
    kernel = self._hashed_rows()
    if self.shards > 1:   # one table set per block (per model shard on a mesh)
      mesh = _model_mesh(kernel, self.shards)
      program = _rebuild_program(self.family, self.bucket_capacity, self.insertion,
                                 _mesh_backend(self.backend, mesh), self.track_codes,
                                 self.shards, mesh)
      return program(self.hash_params.get_value(), kernel, key)
    if (lsh.resolve_backend(self.backend) == "host"
        and not isinstance(kernel, jax.core.Tracer)):   # eager: stream, bounded memory
      return lsh.build_tables_streamed(self.family, self.hash_params.get_value(), kernel,
                                       bucket_capacity=self.bucket_capacity,
                                       insertion=self.insertion, key=key,
                                       keep_codes=self.track_codes)
    program = _rebuild_program(self.family, self.bucket_capacity, self.insertion, self.backend,
                               self.track_codes)
    return program(self.hash_params.get_value(), kernel, key)

  def rebuild(self, key: jax.Array | None = None, *, redraw: bool = False,
              free_old: bool = False) -> None:
    """Rebuilds the tables from the current weights (eagerly: on the host backend the build
    streams, bounded memory); ``redraw`` draws new hash functions first. ``key``: default the
    next key of the layer's stream. ``free_old`` deletes the old tables' buffers first (their
    memory is reused by the build; the old arrays must have no other user)."""
    if not self.uses_tables:
      return
    if key is None:
      if self.rngs is None:
        raise ValueError("SlideDense.rebuild: the layer has no random stream: pass key=")
      key = self.rngs.select()
    build_key, draw_key = jax.random.split(key)
    if redraw:
      old = self.hash_params.get_value()
      if self.shards == 1:
        new = self.family.init(draw_key)
      else:
        new = jax.vmap(self.family.init)(jax.random.split(draw_key, self.shards))
        if not isinstance(draw_key, jax.core.Tracer):   # placed as the old ones were
          from slidejax.distributed import place
          new = place(new, jax.tree.map(lambda o: o.sharding, old))
      self.hash_params.set_value(new)
    if free_old:
      for array in self.tables.get_value():
        if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
          array.delete()
    self.tables.set_value(self._build(build_key))

  # -- forward ------------------------------------------------------------------------------
  def select(self, inputs: jax.Array, *, labels: jax.Array | None, key: jax.Array):
    """The active set for ``inputs`` ``[B, in]`` (labels ``[B, f]`` forced in, -1 padding):
    an :class:`slidejax.lsh.ActiveSet` (per-sample) or ``SharedActiveSet`` (with blocks:
    each block's ``num_active / shards`` in block order, global ids; ``num_fixed`` 0)."""
    if self.shards > 1:
      return self._select_blocks(inputs, labels, key)
    mesh = _mesh_of(self.kernel.get_value())
    if mesh is None:
      return self._select_in(_value(self.tables), _value(self.hash_params), inputs, labels,
                             key, self.num_active, self.out_features)
    # one block on a mesh (data parallel): one device selects for the whole batch
    backend = _mesh_backend(self.backend, mesh)
    select = lambda tables, hash_params, inputs, labels, key: self._select_in(  # noqa: E731
        tables, hash_params, inputs, labels, key, self.num_active, self.out_features, backend)
    select = _once_over(select, tuple(mesh.axis_names))
    return jax.shard_map(select, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(
        _value(self.tables), _value(self.hash_params), inputs, labels, key)

  def _select_blocks(self, inputs, labels, key):
    shards, rows, size = self.shards, self.block_rows, self.num_active // self.shards
    if labels is None:
      labels = jnp.full((inputs.shape[0], 1), -1, jnp.int32)
    mesh = self.model_mesh()
    backend = _mesh_backend(self.backend, mesh)

    def block(tables, hash_params, index, inputs, labels, key):
      first = index * rows   # this block's labels, as block-local ids
      local = jnp.where((labels >= first) & (labels < first + rows), labels - first, -1)
      active = self._select_in(tables, hash_params, inputs, local,
                               jax.random.fold_in(key, index), size, rows, backend)
      return active.ids, active.valid, active.forced_slots, active.forced_dropped

    run = _on_blocks(jax.vmap(block, in_axes=(0, 0, 0, None, None, None)), mesh, 3, 3,
                     once=True)
    index = jnp.arange(shards, dtype=jnp.int32)
    ids, valid, slots, dropped = run(_value(self.tables), _value(self.hash_params), index,
                                     inputs, labels.astype(jnp.int32), key)
    ids = jnp.where(valid, ids + (index * rows)[:, None], self.out_features).reshape(-1)
    slots = jnp.max(jnp.where(slots >= 0, slots + (index * size)[:, None, None], -1), axis=0)
    return lsh.SharedActiveSet(ids.astype(jnp.int32), valid.reshape(-1), slots.astype(jnp.int32),
                               jnp.sum(dropped).astype(jnp.int32), jnp.zeros((), jnp.int32))

  def _select_in(self, tables, hash_params, inputs, labels, key, num_active: int,
                 num_neurons: int, backend: str | None = None):
    """The selection over ``num_neurons`` neurons with ``tables`` and ``hash_params`` (the
    layer's, or one block's), on ``backend`` (default the layer's)."""
    options = dict(num_active=num_active, num_neurons=num_neurons, key=key,
                   policy=self.policy, threshold=self.threshold, forced_ids=labels,
                   backend=backend or self.backend, uniform_share=self.uniform_share)
    shared = self.mode == "shared"
    if not shared and self.in_batch_negatives and labels is not None:
      options["preferred_ids"] = labels.reshape(-1)
    if self.sampler == "lsh":
      codes = self.hash_codes(inputs, hash_params)
      query = lsh.query_shared if shared else lsh.query
      return query(tables, codes, **options)
    draw_key, options["key"] = jax.random.split(key)
    options.update(policy="vanilla", uniform_share=0.0)
    rows = 1 if shared else inputs.shape[0]
    if self.sampler == "uniform":   # no candidates: the random fill draws every negative
      candidates = jnp.full((rows, 1, 0), -1, jnp.int32)
    else:
      cdf = self.sampler_cdf[...]
      u = jax.random.uniform(draw_key, (rows, 1, num_active), jnp.float32) * cdf[-1]
      candidates = jnp.minimum(jnp.searchsorted(cdf, u, side="right"),
                               num_neurons - 1).astype(jnp.int32)
    return (lsh.select_shared if shared else lsh.select)(candidates, **options)

  def _unigram_probs(self, ids: jax.Array) -> jax.Array:
    """float32 like ``ids``: the unigram sampler's draw probability of each id (1 for the
    padding id), from the stored CDF by two gathers."""
    cdf = self.sampler_cdf[...]
    upper = jnp.take(cdf, ids, mode="fill", fill_value=1.0)
    lower = jnp.where(ids > 0, jnp.take(cdf, jnp.maximum(ids - 1, 0), mode="fill",
                                        fill_value=1.0), 0.0)
    return jnp.where(ids < self.out_features, upper - lower, 1.0)

  def _logit_correction(self, active, slots) -> jax.Array | None:
    """float32 like ``active.ids``: ``log`` of each column's inclusion probability where the
    sampler needs a correction (0 for forced labels, selected candidates and padding);
    None where it needs none."""
    ids, valid = active.ids, active.valid
    if self.sampler == "unigram":    # log of the expected inclusion in num_active draws
      q = self._unigram_probs(ids)
      log_incl = jnp.log(-jnp.expm1(self.num_active * jnp.log1p(-jnp.minimum(q, 1 - 1e-7))))
      width = ids.shape[-1]
      target = jnp.where(slots >= 0, slots, width)
      if ids.ndim == 1:
        forced = jnp.zeros((width,), bool).at[target.reshape(-1)].set(True, mode="drop")
      else:
        rows = jnp.arange(ids.shape[0])[:, None]
        forced = jnp.zeros(ids.shape, bool).at[rows, target].set(True, mode="drop")
      return jnp.where(forced | ~valid, 0.0, log_incl).astype(jnp.float32)
    if self.correction == "none":
      return None
    # the random fill: a uniform draw of its size from the neurons outside the fixed part
    fixed = active.num_fixed[..., None]
    num_random = jnp.sum(valid, axis=-1, keepdims=True) - fixed
    rest = self.out_features - fixed
    log_incl = jnp.log(jnp.maximum(num_random, 1).astype(jnp.float32)
                       / jnp.maximum(rest, 1).astype(jnp.float32))
    is_fill = (jnp.arange(ids.shape[-1]) >= fixed) & valid
    return jnp.where(is_fill, log_incl, 0.0).astype(jnp.float32)

  def __call__(self, inputs: jax.Array, *, labels: jax.Array | None = None,
               key: jax.Array | None = None) -> SlideOutput:
    """Computes the active neurons of ``inputs`` float32 ``[B, in_features]``.

    ``labels`` int32 ``[B, f]`` (-1 padding) are always active (training). The selection is
    random (the uniform share, the fill, ties): its key is ``key`` when given, else the next
    key of the layer's own stream (``self.rngs``, from the ``rngs`` it was built with), so
    every call draws afresh. A layer built without a "select" or "default" stream needs
    ``key``: a sampled forward pass without randomness is an error, never a fixed key.
    """
    batch = inputs.shape[0]
    if key is None and self.mode != "dense":
      if self.rngs is None:
        raise ValueError("SlideDense: the selection is random, but the layer has no random "
                         "stream (its rngs had no 'select' or 'default' stream): pass key=")
      key = self.rngs.select()
    if labels is None:
      labels_or_none = None
      labels = jnp.full((batch, 1), -1, jnp.int32)
    else:
      labels_or_none = labels.astype(jnp.int32)
      labels = labels_or_none
    if self.mode == "dense":
      ids = jnp.arange(self.out_features, dtype=jnp.int32)
      valid = jnp.ones((self.out_features,), bool)
      slots = jnp.where((labels >= 0) & (labels < self.out_features), labels, -1)
      dropped = jnp.zeros((), jnp.int32)
      correction = None
    else:
      active = self.select(inputs, labels=labels_or_none, key=key)
      ids, valid = active.ids, active.valid
      slots = active.forced_slots if labels_or_none is not None else labels
      dropped = getattr(active, "forced_dropped", jnp.zeros((), jnp.int32))
      correction = self._logit_correction(active, slots.astype(jnp.int32))
    _capture.record(self, ids.shape)
    gathered = jnp.where(valid, ids, self.out_features).astype(jnp.int32)
    if self.shards > 1:   # block by block: local to each model shard on a mesh
      gathered = self._block_local(gathered)
      rows = F.gather_block_rows(self.kernel[...], gathered)
      bias_rows = F.gather_block_rows(self.bias[...], gathered)
    else:
      rows = F.gather_rows(self.kernel[...], ids)
      bias_rows = F.gather_rows(self.bias[...], ids)
    if self.kernel_delta is not None:
      if self.bias_delta.shape != ids.shape:
        raise ValueError(f"SlideDense: row capture prepared for ids {self.bias_delta.shape}, "
                         f"this call gathers {ids.shape}")
      rows = rows + self.kernel_delta[...]
      bias_rows = bias_rows + self.bias_delta[...]
      self.active_ids.set_value(gathered)
    if ids.ndim == 1:
      logits = F.shared_logits(inputs, rows, bias_rows, valid)
    else:
      logits = F.per_sample_logits(inputs, rows, bias_rows, valid)
    return SlideOutput(logits, ids, valid, slots.astype(jnp.int32), dropped, correction)

  def _block_local(self, ids: jax.Array) -> jax.Array:
    """Global ids ``[M]`` in block order (padding ``N``) -> block-local ``[shards, M / shards]``
    (padding ``N / shards``)."""
    blocks = ids.reshape(self.shards, -1)
    first = (jnp.arange(self.shards, dtype=jnp.int32) * self.block_rows)[:, None]
    return jnp.where(blocks < self.out_features, blocks - first, self.block_rows)

  def attach_row_delta(self, ids_shape: tuple[int, ...]) -> None:
    """Prepares row-gradient capture for gathered ids of ``ids_shape`` (``[M]`` shared,
    ``[B, m]`` per-sample, ``[N]`` dense); see :func:`slidejax.nn.value_and_grad`. With
    blocks the gathered ids are kept block-local, ``[shards, M / shards]``."""
    shape = tuple(ids_shape)
    dtype = self.kernel.dtype
    self.kernel_delta = RowDelta(jnp.zeros(shape + (self.in_features,), dtype))
    self.bias_delta = RowDelta(jnp.zeros(shape, dtype))
    ids_kept = shape if self.shards == 1 else (self.shards, shape[0] // self.shards)
    self.active_ids = ActiveIds(jnp.zeros(ids_kept, jnp.int32))

  def detach_row_delta(self) -> None:
    self.kernel_delta = nnx.data(None)
    self.bias_delta = nnx.data(None)
    self.active_ids = nnx.data(None)

  # -- inference ----------------------------------------------------------------------------
  def top_k(self, inputs: jax.Array, k: int, *, exact: bool = True,
            chunk_size: int = 65536, extra: tuple[jax.Array, jax.Array] | None = None,
            normalizer: bool = False):
    """Top-``k`` neurons per sample: (scores ``[B, k]``, ids ``[B, k]``), best first.

    ``exact``: every neuron, chunked to bound memory. Otherwise (LSH tables only) each
    sample's own candidates: the union of the buckets its input hashes to, scored exactly,
    with no random ids, so a sample's result does not depend on its batch. Slots beyond a
    sample's candidates hold score ``-inf`` and id ``out_features``. ``extra``: (ids ``[B, E]``,
    -1 for none; scores ``[B, E]``) added to those neurons' scores (and, through the tables,
    made candidates), as :class:`slidejax.nn.LabelShortcut` gives them; one block only.
    ``normalizer``: also return each sample's log-sum-exp ``[B]`` of the scores it ranked
    (every neuron's when exact, its candidates' through the tables).
    """
    if self.shards > 1:
      if extra is not None or normalizer:
        raise ValueError("SlideDense.top_k: extra scores and the normalizer need a layer of "
                         "one block")
      return self._top_k_blocks(inputs, k, exact, chunk_size)
    if exact or not self.uses_tables:
      return F.top_k_chunked(inputs, self.kernel[...], self.bias[...], k, chunk_size, extra,
                             normalizer=normalizer)
    candidates = lsh.bucket_rows(self.tables.get_value(), self.hash_codes(inputs))
    return self._top_k_of(inputs, candidates.reshape(inputs.shape[0], -1), k, extra,
                          normalizer)

  def _top_k_blocks(self, inputs, k, exact, chunk_size):
    """:meth:`top_k` block by block (on a mesh: each shard its own), then merged."""
    rows, blocks = self.block_rows, jnp.arange(self.shards, dtype=jnp.int32)
    if exact or not self.uses_tables:
      def block(kernel, bias, index, inputs):
        scores, ids = F.top_k_chunked(inputs, kernel, bias, min(k, rows), chunk_size)
        return scores, jnp.where(ids < rows, ids + index * rows, self.out_features)
      kernel = self.kernel[...].reshape(self.shards, rows, -1)
      bias = self.bias[...].reshape(self.shards, rows)
      run = _on_blocks(jax.vmap(block, in_axes=(0, 0, 0, None)), self.model_mesh(), 3, 1)
      scores, ids = run(kernel, bias, blocks, inputs)      # [S, B, k']
      scores = jnp.moveaxis(scores, 0, 1).reshape(inputs.shape[0], -1)
      ids = jnp.moveaxis(ids, 0, 1).reshape(inputs.shape[0], -1)
      best, pos = jax.lax.top_k(scores, k)
      return best, jnp.take_along_axis(ids, pos, axis=1)

    def candidates_of(tables, hash_params, index, inputs):
      found = lsh.bucket_rows(tables, self.hash_codes(inputs, hash_params))
      return jnp.where(found >= 0, found + index * rows, -1)

    run = _on_blocks(jax.vmap(candidates_of, in_axes=(0, 0, 0, None)), self.model_mesh(), 3, 1)
    found = run(self.tables.get_value(), self.hash_params.get_value(), blocks, inputs)
    found = jnp.moveaxis(found, 0, 1).reshape(inputs.shape[0], -1)
    return self._top_k_of(inputs, found, k)

  def _top_k_of(self, inputs, candidates, k, extra=None, normalizer=False):
    """Top-``k`` of each sample's candidate ids ``[B, c]`` (-1: none), scored exactly, with
    ``extra`` (see :meth:`top_k`) among the candidates and added to their scores."""
    if extra is not None:
      candidates = jnp.concatenate([candidates, extra[0]], axis=1)
    # empty slots (-1) become out_features and sort last
    ids = jnp.sort(jnp.where(candidates < 0, self.out_features, candidates), axis=1)
    repeated = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] == ids[:, :-1]],
                               axis=1)
    valid = (ids < self.out_features) & ~repeated
    logits = F.per_sample_logits(inputs, F.gather_rows(self.kernel[...], ids),
                                 F.gather_rows(self.bias[...], ids), valid)
    if extra is not None:   # each extra id's first (kept) slot
      extra_ids, values = extra
      slots = jax.vmap(jnp.searchsorted)(ids, jnp.where(extra_ids >= 0, extra_ids,
                                                        self.out_features))
      slots = jnp.where(extra_ids >= 0, slots, ids.shape[1])
      logits = logits.at[jnp.arange(ids.shape[0])[:, None], slots].add(values, mode="drop")
    logits = jnp.where(valid, logits, -jnp.inf)
    if logits.shape[1] < k:
      pad = k - logits.shape[1]
      logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
      ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=self.out_features)
    scores, pos = jax.lax.top_k(logits, k)
    top = jnp.where(jnp.isfinite(scores), jnp.take_along_axis(ids, pos, axis=1),
                    self.out_features)
    if normalizer:
      return scores, top, jax.nn.logsumexp(logits, axis=1)
    return scores, top


def rebuild_tables(model: nnx.Module, key: jax.Array | None = None, *, redraw: bool = False,
                   free_old: bool = False) -> int:
  """Rebuilds the tables of every :class:`SlideDense` in ``model`` that hashes (see
  :meth:`SlideDense.rebuild`; with ``key``, layer ``i`` uses ``fold_in(key, i)``). Call it
  eagerly between steps, e.g. when a :class:`slidejax.train.RehashSchedule` says so.
  Returns the number of layers rebuilt."""
  count = 0
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, SlideDense) and layer.uses_tables:
      layer.rebuild(None if key is None else jax.random.fold_in(key, count), redraw=redraw,
                    free_old=free_old)
      count += 1
  return count
