"""A model-parallel SLIDE output layer over a ``("data", "model")`` device mesh.

Layout (``S`` model shards, ``D`` data replicas, ``N`` labels padded to ``S * Ns``)::

  embed_kernel [num_features, H], embed_bias [H]      replicated        P()
  kernel [S, Ns, H], bias [S, Ns]                       one shard/model   P("model")
  hash_params, tables (leaves [S, ...])                 one shard/model   P("model")
  out_opt: row-sparse Adam state (leaves [S, ...])      one shard/model   P("model")
  embed_opt, embed_bias_opt                             replicated        P()
  batch [B, ...]                                        split over data   P("data")

Shard ``s`` owns the contiguous labels ``[s * Ns, (s + 1) * Ns)``; padding labels ``>= N`` are
dead neurons (zero kernel row, bias ``PAD_LOGIT``, always masked). Each shard selects its own
batch-shared active set of ``num_active_per_shard`` local ids with its own LSH tables, the true
labels that fall in the shard forced in. The softmax normalizer is combined across shards with
``pmax`` (max logit) and ``psum`` (sum of exponentials, target-logit term, label counts) over
``model``; the loss is the weighted mean over the global batch (``psum`` over ``data``).

How row gradients are combined over ``data``:

* Output layer: the active set of a model shard is chosen from the LSH codes and labels of the
  *whole* global batch (codes and labels, ``B x (L + f)`` int32, are all-gathered over
  ``data``), with the same key on every data replica. All replicas of a shard therefore gather
  the same ``M`` rows, and the row gradient is a ``psum`` over ``data`` of an ``[M, H]`` block
  (inserted by ``shard_map``'s autodiff: the rows are data-invariant and meet data-varying
  activations). The row-sparse Adam update then runs on identical ids and gradients in every
  replica, which keeps the replicas bit-identical with no further traffic. The alternative,
  all-gathering (ids, row grads) from per-replica active sets, costs ``D`` times the traffic
  and memory and differs from the single-device semantics (one shared set per batch).
* Input layer: the embedding rows a replica touches are its own samples' features, so they
  differ between replicas: their ``(ids, row grads)`` are all-gathered over ``data`` and
  the duplicates summed by :func:`slidejax.optim.row_sparse`, again identically everywhere.
  Gradients w.r.t. the hidden activations are summed over ``model`` by the autodiff of the
  collectives (every shard's logits depend on them). The embedding bias (dense) is averaged
  automatically the same way: the loss is already the global mean.

No ``[N, H]`` (or ``[num_features, H]``) gradient is ever formed in a training step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slidejax import lsh
from slidejax import optim
from slidejax.nn import PAD_LOGIT
from slidejax.nn import embedding_bag
from slidejax.nn import gather_rows
from slidejax.nn import shared_logits
from slidejax.nn import top_k_chunked

DATA = "data"
MODEL = "model"
_SHARD = P(MODEL)
_REPL = P()
_BATCH = P(DATA)


@dataclasses.dataclass(frozen=True)
class ShardedSlideConfig:
  """Options of the sharded output layer (hashable: part of the compiled step's identity).

  Attributes:
    num_active_per_shard: batch-shared active neurons each model shard computes (``M``).
    hash: LSH family: ``simhash`` | ``wta`` | ``dwta`` | ``minhash``.
    k, l: hashes per table (``None``: by family, as :class:`slidejax.nn.SlideDense`), tables.
    range_bits: bucket-id bits (``None``: sized for the shard's ``Ns`` neurons, so the tables
      shrink with the shard count like the kernel).
    bucket_capacity, insertion, policy, threshold: as :class:`slidejax.nn.SlideDense`.
    bin_size: for wta/dwta.
    lr: Adam learning rate (row-sparse Adam for the kernels, Adam for the embedding bias).
    all_active: every neuron of every shard is active (exact full softmax; the reference).
    chunk_size: rows per chunk of the exact top-k in each shard.
  """
  num_active_per_shard: int = 1024
  hash: str = "simhash"
  k: int | None = None
  l: int = 50
  range_bits: int | None = None
  bucket_capacity: int = 128
  insertion: str = "fifo"
  policy: str = "vanilla"
  threshold: int = 2
  bin_size: int = 8
  lr: float = 1e-3
  all_active: bool = False
  chunk_size: int = 65536


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """Static facts of a sharded model: sizes, mesh and configuration (hashable)."""
  mesh: Mesh
  config: ShardedSlideConfig
  num_features: int
  num_labels: int
  hidden: int
  num_shards: int
  rows_per_shard: int
  range_bits: int
  k: int

  @property
  def num_data(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def padded_labels(self) -> int:
    return self.num_shards * self.rows_per_shard

  @property
  def num_active(self) -> int:
    """Active columns per shard (all ``Ns`` rows when ``config.all_active``)."""
    if self.config.all_active:
      return self.rows_per_shard
    return self.config.num_active_per_shard

  def family(self):
    return _make_family(self.config, self.hidden, self.k, self.range_bits)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("embed_kernel", "embed_bias", "kernel", "bias", "hash_params",
                                "tables", "embed_opt", "embed_bias_opt", "out_opt", "step"),
                   meta_fields=("layout",))
@dataclasses.dataclass(frozen=True)
class ShardedSlideState:
  """Parameters, tables and optimizer state of a sharded SLIDE network (a pytree).

  Attributes:
    embed_kernel: float32 ``[num_features, H]``, replicated.
    embed_bias: float32 ``[H]``, replicated.
    kernel: float32 ``[S, Ns, H]``, sharded over ``model``: label ``s * Ns + i`` is row
      ``kernel[s, i]``.
    bias: float32 ``[S, Ns]``, sharded over ``model``.
    hash_params, tables: per-shard LSH state, every leaf ``[S, ...]``, sharded over ``model``
      (``tables`` is None with ``all_active``).
    embed_opt: row-sparse Adam state of ``embed_kernel`` (replicated).
    embed_bias_opt: Adam state of ``embed_bias`` (replicated).
    out_opt: row-sparse Adam state of ``{"kernel", "bias"}`` per shard (leaves ``[S, ...]``).
    step: int32 scalar.
    layout: the static :class:`ShardLayout`.
  """
  embed_kernel: jax.Array
  embed_bias: jax.Array
  kernel: jax.Array
  bias: jax.Array
  hash_params: Any
  tables: Any
  embed_opt: Any
  embed_bias_opt: Any
  out_opt: Any
  step: jax.Array
  layout: ShardLayout


class ShardedBatch(NamedTuple):
  """A global training batch (the same fields as :class:`slidejax.train.TrainBatch`)."""
  feature_ids: jax.Array     # int32 [B, F]
  feature_values: jax.Array  # float32 [B, F], 0 = padding
  label_ids: jax.Array       # int32 [B, f], -1 = padding
  rows: jax.Array            # int32 [B], -1 = padding row (no loss)


class ShardedGrads(NamedTuple):
  """Dense gradients for checking (:func:`sharded_loss_and_grads`); never used to train."""
  embed_kernel: jax.Array  # [num_features, H]
  embed_bias: jax.Array    # [H]
  kernel: jax.Array        # [num_labels, H]
  bias: jax.Array          # [num_labels]


# -- construction -----------------------------------------------------------------------------

def _make_family(config: ShardedSlideConfig, dim: int, k: int, range_bits: int):
  if config.hash == "simhash":
    return lsh.simhash(dim, k=k, l=config.l, range_bits=range_bits)
  if config.hash == "wta":
    return lsh.wta(dim, k=k, l=config.l, bin_size=config.bin_size, range_bits=range_bits)
  if config.hash == "dwta":
    return lsh.dwta(dim, k=k, l=config.l, bin_size=config.bin_size, range_bits=range_bits)
  if config.hash == "minhash":
    return lsh.minhash(dim, k=k, l=config.l, range_bits=range_bits)
  raise ValueError(f"unknown hash family {config.hash!r}; expected simhash, wta, dwta or minhash")


def make_layout(mesh: Mesh, num_features: int, num_labels: int, hidden: int = 128,
                config: ShardedSlideConfig | None = None) -> ShardLayout:
  """Checks sizes against ``mesh`` and fixes the static layout."""
  config = config or ShardedSlideConfig()
  if tuple(mesh.axis_names) != (DATA, MODEL):
    raise ValueError(f"mesh axes must be {(DATA, MODEL)}, got {mesh.axis_names}")
  if min(num_features, num_labels, hidden) <= 0:
    raise ValueError(f"sizes must be positive: num_features={num_features}, "
                     f"num_labels={num_labels}, hidden={hidden}")
  shards = mesh.shape[MODEL]
  rows = -(-num_labels // shards)
  if not config.all_active and not 0 < config.num_active_per_shard <= rows:
    raise ValueError(f"num_active_per_shard={config.num_active_per_shard} must be in "
                     f"[1, {rows}] (labels per shard: {num_labels} over {shards} shards)")
  range_bits = config.range_bits
  if range_bits is None:
    range_bits = lsh.default_range_bits(rows, config.bucket_capacity)
  k = config.k
  if k is None:
    k = {"simhash": range_bits, "wta": 6, "dwta": 6, "minhash": 4}.get(config.hash, 6)
  return ShardLayout(mesh, config, num_features, num_labels, hidden, shards, rows,
                     int(range_bits), int(k))


def _specs(layout: ShardLayout) -> ShardedSlideState:
  """Partition-spec prefixes of every state field."""
  return ShardedSlideState(
      embed_kernel=_REPL, embed_bias=_REPL, kernel=_SHARD, bias=_SHARD, hash_params=_SHARD,
      tables=_SHARD, embed_opt=_REPL, embed_bias_opt=_REPL, out_opt=_SHARD, step=_REPL,
      layout=layout)


def _shardings(layout: ShardLayout, specs: Any) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(layout.mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def _tx(layout: ShardLayout) -> optax.GradientTransformation:
  return optax.adam(layout.config.lr)


def _init_params(layout: ShardLayout, key: jax.Array) -> dict:
  """Every state field but the tables; the same values whatever the mesh (same ``N``, ``H``)."""
  k_embed, k_out, k_hash = jax.random.split(key, 3)
  hidden, shards, rows = layout.hidden, layout.num_shards, layout.rows_per_shard
  embed = jax.random.normal(k_embed, (layout.num_features, hidden), jnp.float32)
  embed = embed * (0.1 / hidden ** 0.5)  # as slidejax.nn.SparseInput
  embed_bias = jnp.zeros((hidden,), jnp.float32)
  kernel = jax.nn.initializers.lecun_normal()(k_out, (layout.num_labels, hidden), jnp.float32)
  dead = layout.padded_labels - layout.num_labels
  kernel = jnp.pad(kernel, ((0, dead), (0, 0))).reshape(shards, rows, hidden)
  bias = jnp.where(jnp.arange(layout.padded_labels) < layout.num_labels, 0.0, PAD_LOGIT)
  bias = bias.astype(jnp.float32).reshape(shards, rows)
  family = layout.family()
  hash_params = jax.vmap(family.init)(jax.random.split(k_hash, shards))
  row_tx = optim.row_sparse(_tx(layout))
  return dict(
      embed_kernel=embed, embed_bias=embed_bias, kernel=kernel, bias=bias,
      hash_params=hash_params, embed_opt=row_tx.init({"kernel": embed}),
      embed_bias_opt=_tx(layout).init({"bias": embed_bias}),
      out_opt=jax.vmap(row_tx.init)({"kernel": kernel, "bias": bias}),
      step=jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=None)
def _init_program(layout: ShardLayout):
  """Jitted ``key -> {field: array}`` (all fields but the tables), placed on the mesh."""
  specs = _specs(layout)
  field_specs = {f: getattr(specs, f) for f in specs.__dataclass_fields__
                 if f not in ("tables", "layout")}
  return jax.jit(functools.partial(_init_params, layout),
                 out_shardings=_shardings(layout, field_specs))


def init_sharded(key: jax.Array, mesh: Mesh, num_features: int, num_labels: int,
                 hidden: int = 128, config: ShardedSlideConfig | None = None
                 ) -> ShardedSlideState:
  """A freshly initialised sharded network, every array placed on ``mesh``.

  Parameters are drawn at their global shapes (the kernel as ``[num_labels, H]``, then padded
  and split), so the same ``key`` gives the same network on any mesh with the same sizes; each
  shard's hash functions come from ``fold``-ed keys and differ between shards. Works with
  several processes (each builds its addressable part).
  """
  layout = make_layout(mesh, num_features, num_labels, hidden, config)
  k_params, k_tables = jax.random.split(key)
  params = _init_program(layout)(k_params)
  tables = None  # every neuron active: no tables to query
  if not layout.config.all_active:
    tables = _build_tables_program(layout, False)(params["kernel"], params["hash_params"],
                                                  k_tables)[1]
  return ShardedSlideState(tables=tables, layout=layout, **params)


# -- per-shard pieces (run inside shard_map) ---------------------------------------------------

def _local(tree: Any) -> Any:
  """Drops the leading shard axis (size 1 inside ``shard_map``)."""
  return jax.tree.map(lambda x: x[0], tree)


def _stacked(tree: Any) -> Any:
  return jax.tree.map(lambda x: x[None], tree)


def _shard_index() -> tuple[jax.Array, jax.Array]:
  return lax.axis_index(MODEL), lax.axis_index(DATA)


def _live_ids(layout: ShardLayout, local_ids: jax.Array, shard: jax.Array) -> jax.Array:
  """bool mask of local ids that are real labels (not dead padding, not ``Ns`` padding)."""
  return (local_ids < layout.rows_per_shard) & (
      shard * layout.rows_per_shard + local_ids < layout.num_labels)


def local_labels(layout: ShardLayout, label_ids: jax.Array, shard: jax.Array) -> jax.Array:
  """Global label ids ``[B, f]`` -> this shard's local ids, -1 where not in the shard."""
  offset = shard * layout.rows_per_shard
  inside = ((label_ids >= offset) & (label_ids < offset + layout.rows_per_shard)
            & (label_ids < layout.num_labels))
  return jnp.where(inside, label_ids - offset, -1).astype(jnp.int32)


class _Active(NamedTuple):
  ids: jax.Array        # int32 [M] local, Ns = padding
  valid: jax.Array      # bool [M]
  slots: jax.Array      # int32 [b, f] column of each of this replica's labels, -1 if absent
  dropped: jax.Array    # int32 [] labels of the global batch that did not fit


def select_shard_active(layout: ShardLayout, hash_params: Any, tables: Any, hidden: jax.Array,
                        label_ids: jax.Array, key: jax.Array) -> _Active:
  """This shard's active set, shared by the whole global batch (call inside ``shard_map``).

  The codes and labels of every data replica are all-gathered, so every replica of a model
  shard selects the same ids (the key is folded with the shard index only).

  Args:
    hidden: float32 ``[b, H]``, this replica's hidden activations.
    label_ids: int32 ``[b, f]`` global label ids, -1 padding.
  """
  shard, data = _shard_index()
  rows = layout.rows_per_shard
  if layout.config.all_active:
    ids = jnp.arange(rows, dtype=jnp.int32)
    valid = _live_ids(layout, ids, shard)
    return _Active(ids, valid, local_labels(layout, label_ids, shard), jnp.zeros((), jnp.int32))
  codes = layout.family().codes(hash_params, hidden)
  all_codes = lax.all_gather(codes, DATA, axis=0, tiled=True, to="invarying")
  all_labels = lax.all_gather(label_ids, DATA, axis=0, tiled=True, to="invarying")
  cfg = layout.config
  options = dict(num_active=cfg.num_active_per_shard, num_neurons=rows,
                 key=jax.random.fold_in(key, shard), policy=cfg.policy,
                 forced_ids=local_labels(layout, all_labels, shard), backend="jax")
  if cfg.policy == "threshold":
    options["threshold"] = cfg.threshold
  active = lsh.query_shared(tables, all_codes, **options)
  ids = active.ids.astype(jnp.int32)
  valid = active.valid & _live_ids(layout, ids, shard)
  ids = jnp.where(valid, ids, rows)
  batch = label_ids.shape[0]
  slots = lax.dynamic_slice_in_dim(active.forced_slots, data * batch, batch, axis=0)
  return _Active(ids, valid, slots.astype(jnp.int32), active.forced_dropped.astype(jnp.int32))


def sharded_softmax_loss(logits: jax.Array, label_slots: jax.Array,
                         sample_weight: jax.Array) -> jax.Array:
  """The multi-label softmax cross-entropy of a batch split over ``data``, classes over ``model``.

  Call inside ``shard_map``. The normalizer runs over every shard's columns: max by ``pmax``,
  sum of exponentials by ``psum``; the target mass (spread evenly over each sample's labels
  present in any shard) and the target-logit term are ``psum``-ed too.

  Args:
    logits: float32 ``[b, M]``, this shard's columns (padding at ``PAD_LOGIT``).
    label_slots: int32 ``[b, f]``, column of each label in this shard, -1 if not here.
    sample_weight: float32 ``[b]`` (0 for padding rows).
  Returns:
    float32 scalar, the weighted mean over the global batch (the same on every device).
  """
  local_max = lax.stop_gradient(jnp.max(logits, axis=1))
  global_max = lax.pmax(local_max, MODEL)
  sum_exp = lax.psum(jnp.sum(jnp.exp(logits - global_max[:, None]), axis=1), MODEL)
  log_norm = global_max + jnp.log(sum_exp)
  present = label_slots >= 0
  count = lax.psum(jnp.sum(present, axis=1).astype(jnp.float32), MODEL)
  mass = jnp.where(present, 1.0 / jnp.maximum(count, 1.0)[:, None], 0.0)
  picked = jnp.take_along_axis(logits, jnp.where(present, label_slots, 0), axis=1)
  target = lax.psum(jnp.sum(mass * picked, axis=1), MODEL)
  weight = sample_weight * (count > 0).astype(jnp.float32)
  total = lax.psum(jnp.sum((log_norm - target) * weight), DATA)
  return total / jnp.maximum(lax.psum(jnp.sum(weight), DATA), 1.0)


def _hidden(feature_values: jax.Array, embed_rows: jax.Array, embed_bias: jax.Array):
  return jax.nn.relu(embedding_bag(embed_rows, feature_values, embed_bias))


class _LocalGrads(NamedTuple):
  loss: jax.Array
  embed_ids: jax.Array    # int32 [B * F], global batch (all-gathered), num_features = padding
  embed_rows: jax.Array   # float32 [B * F, H]
  embed_bias: jax.Array   # float32 [H]
  out_ids: jax.Array      # int32 [M] local ids, Ns = padding
  out_kernel: jax.Array   # float32 [M, H]
  out_bias: jax.Array     # float32 [M]


def _local_grads(state: ShardedSlideState, batch: ShardedBatch, key: jax.Array) -> _LocalGrads:
  """Loss and row gradients on one device (inside ``shard_map``), combined as documented."""
  layout = state.layout
  kernel, bias = state.kernel[0], state.bias[0]
  embed_rows = gather_rows(state.embed_kernel, batch.feature_ids)       # [b, F, H]
  hidden, hidden_vjp = jax.vjp(functools.partial(_hidden, batch.feature_values), embed_rows,
                               state.embed_bias)
  active = select_shard_active(layout, _local(state.hash_params), _local(state.tables),
                               hidden, batch.label_ids, key)
  weight = (batch.rows >= 0).astype(jnp.float32)

  def loss_fn(h, rows, bias_rows):
    return sharded_softmax_loss(shared_logits(h, rows, bias_rows, active.valid), active.slots,
                                weight)

  loss, (g_hidden, g_rows, g_bias) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
      hidden, gather_rows(kernel, active.ids), gather_rows(bias, active.ids))
  g_embed_rows, g_embed_bias = hidden_vjp(g_hidden)
  used = jnp.where(batch.feature_values != 0, batch.feature_ids, layout.num_features)
  embed_ids = lax.all_gather(used.reshape(-1).astype(jnp.int32), DATA, axis=0, tiled=True,
                             to="invarying")
  embed_grads = lax.all_gather(g_embed_rows.reshape(-1, layout.hidden), DATA, axis=0,
                               tiled=True, to="invarying")
  return _LocalGrads(loss, embed_ids, embed_grads, g_embed_bias, active.ids,
                     g_rows, g_bias)


def _step_local(state: ShardedSlideState, batch: ShardedBatch, key: jax.Array):
  layout = state.layout
  grads = _local_grads(state, batch, key)
  row_tx = optim.row_sparse(_tx(layout))
  updates, ids, embed_opt = row_tx.update({"kernel": grads.embed_rows}, state.embed_opt,
                                          {"kernel": state.embed_kernel},
                                          row_ids=grads.embed_ids)
  embed_kernel = optim.apply_row_updates({"kernel": state.embed_kernel}, ids, updates)["kernel"]
  updates, embed_bias_opt = _tx(layout).update({"bias": grads.embed_bias}, state.embed_bias_opt,
                                               {"bias": state.embed_bias})
  embed_bias = optax.apply_updates({"bias": state.embed_bias}, updates)["bias"]
  out_params = {"kernel": state.kernel[0], "bias": state.bias[0]}
  updates, ids, out_opt = row_tx.update({"kernel": grads.out_kernel, "bias": grads.out_bias},
                                        _local(state.out_opt), out_params,
                                        row_ids=grads.out_ids, assume_unique=True)
  out_params = optim.apply_row_updates(out_params, ids, updates)
  new_state = dataclasses.replace(
      state, embed_kernel=embed_kernel, embed_bias=embed_bias,
      kernel=out_params["kernel"][None], bias=out_params["bias"][None], embed_opt=embed_opt,
      embed_bias_opt=embed_bias_opt, out_opt=_stacked(out_opt), step=state.step + 1)
  return new_state, grads.loss


_BATCH_SPECS = ShardedBatch(_BATCH, _BATCH, _BATCH, _BATCH)


@functools.partial(jax.jit, donate_argnums=(0,))
def _train_step(state: ShardedSlideState, batch: ShardedBatch, key: jax.Array):
  specs = _specs(state.layout)
  return jax.shard_map(_step_local, mesh=state.layout.mesh,
                       in_specs=(specs, _BATCH_SPECS, _REPL),
                       out_specs=(specs, _REPL))(state, batch, key)


def shard_batch(layout_or_state, batch) -> ShardedBatch:
  """Places a global numpy batch (``feature_ids``, ``feature_values``, ``label_ids``, ``rows``)
  on the mesh, split over ``data``.

  Every process must pass the same global batch (each keeps its addressable part). The batch
  size must be a multiple of the ``data`` axis size.
  """
  layout = getattr(layout_or_state, "layout", layout_or_state)
  arrays = ShardedBatch(np.asarray(batch.feature_ids, np.int32),
                        np.asarray(batch.feature_values, np.float32),
                        np.asarray(batch.label_ids, np.int32),
                        np.asarray(batch.rows).astype(np.int32))
  if arrays.feature_ids.shape[0] % layout.num_data:
    raise ValueError(f"batch size {arrays.feature_ids.shape[0]} is not a multiple of the data "
                     f"axis ({layout.num_data})")
  sharding = NamedSharding(layout.mesh, _BATCH)
  return ShardedBatch(*(jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
                        for a in arrays))


def sharded_train_step(state: ShardedSlideState, batch, key: jax.Array
                       ) -> tuple[ShardedSlideState, jax.Array]:
  """One row-sparse training step (jitted; ``state`` is donated: do not reuse it).

  Args:
    state: from :func:`init_sharded`.
    batch: a :class:`ShardedBatch` already on the mesh (:func:`shard_batch`), or any object
      with numpy ``feature_ids [B, F]``, ``feature_values [B, F]``, ``label_ids [B, f]``,
      ``rows [B]`` (placed here).
    key: PRNG key of the LSH selection (the same on every process).
  Returns:
    (new state, loss float32 scalar replicated on every device).
  """
  if not isinstance(batch, ShardedBatch) or not isinstance(batch.feature_ids, jax.Array):
    batch = shard_batch(state, batch)
  return _train_step(state, batch, key)


def _grads_local(state: ShardedSlideState, batch: ShardedBatch, key: jax.Array):
  layout = state.layout
  g = _local_grads(state, batch, key)
  embed = jnp.zeros((layout.num_features, layout.hidden), jnp.float32)
  embed = embed.at[g.embed_ids].add(g.embed_rows, mode="drop")
  rows = layout.rows_per_shard
  kernel = jnp.zeros((rows, layout.hidden), jnp.float32).at[g.out_ids].add(g.out_kernel,
                                                                           mode="drop")
  bias = jnp.zeros((rows,), jnp.float32).at[g.out_ids].add(g.out_bias, mode="drop")
  return g.loss, ShardedGrads(embed, g.embed_bias, kernel[None], bias[None])


@jax.jit
def _loss_and_grads(state: ShardedSlideState, batch: ShardedBatch, key: jax.Array):
  specs = _specs(state.layout)
  out = jax.shard_map(_grads_local, mesh=state.layout.mesh,
                      in_specs=(specs, _BATCH_SPECS, _REPL),
                      out_specs=(_REPL, ShardedGrads(_REPL, _REPL, _SHARD, _SHARD)))(
                          state, batch, key)
  loss, g = out
  n, h = state.layout.num_labels, state.layout.hidden
  return loss, g._replace(kernel=g.kernel.reshape(-1, h)[:n], bias=g.bias.reshape(-1)[:n])


def sharded_loss_and_grads(state: ShardedSlideState, batch, key: jax.Array
                           ) -> tuple[jax.Array, ShardedGrads]:
  """The training loss and its gradients, scattered into dense arrays (for checks only:
  this forms ``[N, H]`` and ``[num_features, H]`` arrays, which a training step never does)."""
  if not isinstance(batch, ShardedBatch) or not isinstance(batch.feature_ids, jax.Array):
    batch = shard_batch(state, batch)
  return _loss_and_grads(state, batch, key)


# -- tables ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _build_tables_program(layout: ShardLayout, redraw: bool):
  """Jitted ``(kernel [S,Ns,H], hash_params, key) -> (hash_params, tables)``, per shard."""
  cfg = layout.config

  def build(kernel, hash_params, key):
    shard = lax.axis_index(MODEL)
    key = jax.random.fold_in(key, shard)
    build_key, draw_key = jax.random.split(key)
    family = layout.family()
    params = family.init(draw_key) if redraw else _local(hash_params)
    weights = kernel[0]
    # Dead padding neurons are hashed like the others (their rows stay zero); masked at use.
    codes = lsh.neuron_codes(family, params, weights)
    tables = lsh.build_tables(codes, range_bits=layout.range_bits,
                              bucket_capacity=cfg.bucket_capacity, insertion=cfg.insertion,
                              key=build_key, backend="jax")
    return _stacked(params), _stacked(tables)

  mapped = jax.shard_map(build, mesh=layout.mesh, in_specs=(_SHARD, _SHARD, _REPL),
                         out_specs=(_SHARD, _SHARD))
  return jax.jit(mapped)


def sharded_rebuild(state: ShardedSlideState, key: jax.Array, redraw: bool = False
                    ) -> ShardedSlideState:
  """Rebuilds every shard's LSH tables from its current kernel rows (each on its own devices).

  ``redraw``: draw new hash functions first (a different draw per shard). A no-op with
  ``all_active`` (no tables).
  """
  if state.layout.config.all_active:
    return state
  hash_params, tables = _build_tables_program(state.layout, bool(redraw))(
      state.kernel, state.hash_params, key)
  return dataclasses.replace(state, hash_params=hash_params, tables=tables)


# -- inference ---------------------------------------------------------------------------------

def _top_k_local(k: int, state: ShardedSlideState, feature_ids, feature_values):
  layout = state.layout
  shard, _ = _shard_index()
  hidden = _hidden(feature_values, gather_rows(state.embed_kernel, feature_ids),
                   state.embed_bias)
  rows = jnp.arange(layout.rows_per_shard, dtype=jnp.int32)
  bias = jnp.where(_live_ids(layout, rows, shard), state.bias[0], PAD_LOGIT)
  scores, ids = top_k_chunked(hidden, state.kernel[0], bias, k, layout.config.chunk_size)
  ids = ids + shard * layout.rows_per_shard
  all_scores = lax.all_gather(scores, MODEL, axis=1, tiled=True, to="invarying")  # [b, S*k]
  all_ids = lax.all_gather(ids, MODEL, axis=1, tiled=True, to="invarying")
  _, pos = lax.top_k(all_scores, k)
  return jnp.take_along_axis(all_ids, pos, axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _top_k(k: int, state: ShardedSlideState, feature_ids, feature_values):
  specs = _specs(state.layout)
  return jax.shard_map(functools.partial(_top_k_local, k), mesh=state.layout.mesh,
                       in_specs=(specs, _BATCH, _BATCH), out_specs=_BATCH)(
                           state, feature_ids, feature_values)


def sharded_top_k(state: ShardedSlideState, feature_ids, feature_values, k: int) -> np.ndarray:
  """Exact top-``k`` labels: each shard scores all its rows (chunked), then the ``S`` lists of
  ``k`` are all-gathered over ``model`` and merged.

  Args:
    feature_ids: int32 ``[B, F]``; feature_values: float32 ``[B, F]`` (numpy, global batch).
  Returns:
    int64 numpy ``[B, k]`` global label ids, best first.
  """
  layout = state.layout
  if not 0 < k <= layout.num_labels:
    raise ValueError(f"k={k} must be in [1, {layout.num_labels}]")
  feature_ids = np.asarray(feature_ids, np.int32)
  feature_values = np.asarray(feature_values, np.float32)
  batch = feature_ids.shape[0]
  padded = -(-batch // layout.num_data) * layout.num_data
  if padded != batch:
    pad = ((0, padded - batch), (0, 0))
    feature_ids, feature_values = np.pad(feature_ids, pad), np.pad(feature_values, pad)
  sharding = NamedSharding(layout.mesh, _BATCH)
  fids, fvals = (jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
                 for a in (feature_ids, feature_values))
  out = _top_k(int(k), state, fids, fvals)
  return np.asarray(multihost_utils.process_allgather(out, tiled=True)
                    if jax.process_count() > 1 else out)[:batch].astype(np.int64)


# -- memory ------------------------------------------------------------------------------------

def _device_bytes(tree: Any, device) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def per_device_bytes(state: ShardedSlideState, device=None) -> dict[str, int]:
  """Bytes each part of ``state`` occupies on ``device`` (default: the first addressable one).

  Keys: ``kernel`` (kernel + bias), ``optimizer`` (their row-sparse Adam state), ``tables``
  (LSH buckets, counts, neuron codes), ``hash_params`` (hash functions), ``replicated`` (input
  layer and its optimizer), ``total``.
  """
  device = device or state.kernel.addressable_shards[0].device
  parts = {
      "kernel": _device_bytes((state.kernel, state.bias), device),
      "optimizer": _device_bytes(state.out_opt, device),
      "tables": _device_bytes(state.tables, device),
      "hash_params": _device_bytes(state.hash_params, device),
      "replicated": _device_bytes((state.embed_kernel, state.embed_bias, state.embed_opt,
                                   state.embed_bias_opt, state.step), device),
  }
  parts["total"] = sum(parts.values())
  return parts


def estimate_bytes_per_device(num_labels: int, hidden: int, num_shards: int, *,
                              l: int = 50, range_bits: int | None = None,
                              bucket_capacity: int = 128) -> dict[str, int]:
  """Expected output-layer bytes per device (float32 kernel, bias, two Adam moments, int32
  tables ``[l, 2**range_bits, capacity]`` + counts + neuron codes ``[Ns, l]`` stored as
  :func:`slidejax.lsh.codes_dtype`)."""
  rows = -(-num_labels // num_shards)
  if range_bits is None:
    range_bits = lsh.default_range_bits(rows, bucket_capacity)
  kernel = rows * (hidden + 1) * 4
  code_bytes = np.dtype(lsh.codes_dtype(range_bits)).itemsize
  tables = l * (2 ** range_bits) * (bucket_capacity + 1) * 4 + rows * l * code_bytes
  return {"rows_per_shard": rows, "range_bits": int(range_bits), "kernel": kernel,
          "optimizer": 2 * kernel, "tables": tables, "total": 3 * kernel + tables}

