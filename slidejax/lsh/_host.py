"""Every ``jax.pure_callback`` of slidejax: JAX wrappers of the Numba kernels in ``hostops``.

(Plus the eager calls of the streamed table build, which runs outside jit: see
:func:`slidejax.lsh.build_tables_streamed`.)

Each wrapper draws its randomness from a JAX key (as uint32 words, turned into uint64 seeds
on the host), works inside jit, and under vmap runs the kernel once per mapped element
(``vmap_method="sequential"``). The Numba kernels are compiled (or loaded from Numba's disk
cache) at trace time, by :func:`warmup`, so compilation never lands inside a timed step.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

_VMAP_METHOD = "sequential"

# One host kernel at a time: on a mesh, every device's program calls back from its own
# thread, and Numba's workqueue threading layer (its fallback where neither TBB nor OpenMP is
# installed) must not be entered by two threads at once. Each kernel already uses every core:
# a data=2,model=2 step measured the same with and without the lock (2.71x and 2.74x one
# device). (The hang a mesh step showed was another cause: see slidejax.nn._slide_dense.)
_KERNEL_LOCK = threading.Lock()


def _serialized(host):
  """``host`` (a callback body) run under :data:`_KERNEL_LOCK`."""
  @functools.wraps(host)
  def locked(*args):
    with _KERNEL_LOCK:
      return host(*args)
  return locked


@functools.cache
def warmup() -> None:
  """Compiles the Numba table and selection kernels once per process."""
  import hostops  # pylint: disable=import-outside-toplevel
  hostops.warmup_lsh_kernels()


def _hostops():
  warmup()
  import hostops  # pylint: disable=import-outside-toplevel
  return hostops


def _seeds(words) -> np.ndarray:
  """uint32 ``[..., 2]`` random words -> uint64 ``[...]`` seeds."""
  words = np.asarray(words).astype(np.uint64)
  return (words[..., 0] << np.uint64(32)) | words[..., 1]


def _seed_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.bits(key, shape + (2,), jnp.uint32)


def build_tables(codes: jax.Array, *, num_buckets: int, capacity: int, reservoir: bool,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Host build from codes int32 ``[n, l]`` -> (buckets ``[l, nb, cap]``, counts ``[l, nb]``)."""
  ops = _hostops()
  num_tables = codes.shape[1]
  codes_ln = codes.T                  # table-major: the kernel reads one row per table
  words = _seed_words(key, (num_tables,))

  @_serialized
  def host(codes_ln, words):
    return ops.build_tables(np.ascontiguousarray(np.asarray(codes_ln)), num_buckets, capacity,
                            reservoir, _seeds(words))

  shapes = (jax.ShapeDtypeStruct((num_tables, num_buckets, capacity), jnp.int32),
            jax.ShapeDtypeStruct((num_tables, num_buckets), jnp.int32))
  return jax.pure_callback(host, shapes, codes_ln, words, vmap_method=_VMAP_METHOD)


# Initial values of the streamed build's (buckets, counts, neuron codes).
STREAM_FILLS = (-1, 0, 0)


def stream_shapes(num_neurons: int, num_tables: int, num_buckets: int, capacity: int,
                  codes_dtype, keep_codes: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of a streamed build's (buckets, counts, neuron codes)."""
  return (jax.ShapeDtypeStruct((num_tables, num_buckets, capacity), np.int32),
          jax.ShapeDtypeStruct((num_tables, num_buckets), np.int32),
          jax.ShapeDtypeStruct((num_neurons, num_tables if keep_codes else 0), codes_dtype))


def writable_view(array: jax.Array) -> np.ndarray:
  """A writable NumPy view of a fresh, unshared CPU ``array``'s buffer (row-major).

  ``np.asarray`` gives read-only views; the streamed build owns the arrays it creates and
  fills them in place through this view before anyone else sees them.
  """
  array.block_until_ready()
  dtype = np.dtype(array.dtype)
  if array.size == 0:
    return np.empty(array.shape, dtype)
  raw = (ctypes.c_byte * (array.size * dtype.itemsize)).from_address(
      array.unsafe_buffer_pointer())
  return np.frombuffer(raw, dtype).reshape(array.shape)


def stream_seeds(key: jax.Array, num_tables: int) -> np.ndarray:
  """The per-table seeds :func:`build_tables` draws from ``key`` (so both builds agree)."""
  return _seeds(_seed_words(key, (num_tables,)))


def stream_fill(buffers, chunk_codes: np.ndarray, first_id: int, skip: int, reservoir: bool,
                seeds: np.ndarray) -> None:
  """Offers one chunk of codes int32 ``[c, l]`` (neurons ``first_id + skip ..``) in place."""
  buckets, counts, codes = buffers
  _hostops().stream_fill(buckets, counts, codes, chunk_codes, first_id, skip, reservoir, seeds)


def wta_codes(family, params, weights: np.ndarray, start: int, out: np.ndarray) -> None:
  """WTA/DWTA codes of rows ``start .. start + len(out) - 1`` of a host float32 ``weights``
  ``[n, dim]`` into ``out`` int32 ``[count, l]`` (Numba; equal to ``family.codes``)."""
  from slidejax.lsh._families import probe_sequence  # pylint: disable=import-outside-toplevel
  densified = family.name == "dwta"
  probes = (probe_sequence(family.num_hashes) if densified
            else np.zeros((1, family.num_hashes), np.int32))
  _hostops().wta_codes(weights, start, out.shape[0], np.asarray(params["positions"]), probes,
                       densified, family.k, family.bits_per_hash, family.range_bits, out)


def stream_finish(buffers, reservoir: bool) -> None:
  """Puts FIFO buckets in oldest-first order once every neuron has been offered."""
  if not reservoir:
    _hostops().stream_finish_fifo(buffers[0], buffers[1])


def update_tables(buckets: jax.Array, counts: jax.Array, neuron_codes: jax.Array,
                  neuron_ids: jax.Array, new_codes: jax.Array, *, reservoir: bool,
                  key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Host incremental update of whole tables; returns fresh (buckets, counts, neuron_codes).

  Costs a copy of the whole state; :func:`update_rows` only moves the touched rows.
  """
  ops = _hostops()
  words = _seed_words(key, (buckets.shape[0],))

  @_serialized
  def host(buckets, counts, neuron_codes, neuron_ids, new_codes, words):
    return ops.update_tables(np.asarray(buckets), np.asarray(counts), np.asarray(neuron_codes),
                             np.asarray(neuron_ids), np.asarray(new_codes), reservoir,
                             _seeds(words))

  shapes = (jax.ShapeDtypeStruct(buckets.shape, jnp.int32),
            jax.ShapeDtypeStruct(counts.shape, jnp.int32),
            jax.ShapeDtypeStruct(neuron_codes.shape, jnp.int32))
  buckets, counts, codes = jax.pure_callback(
      host, shapes, buckets, counts, neuron_codes.astype(jnp.int32),
      neuron_ids.astype(jnp.int32), new_codes.astype(jnp.int32), words,
      vmap_method=_VMAP_METHOD)
  return buckets, counts, codes.astype(neuron_codes.dtype)


def update_rows(rows: jax.Array, counts: jax.Array, old_rows: jax.Array, new_rows: jax.Array,
                ids: jax.Array, new_codes: jax.Array, *, num_neurons: int, reservoir: bool,
                key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Host incremental update of gathered bucket rows -> fresh (rows, counts, codes ``[r, l]``).

  ``rows`` int32 ``[T, cap]``, ``counts`` ``[T]``: the touched buckets; ``old_rows``,
  ``new_rows`` int32 ``[r, l]``: the row of each id's old / new bucket; ``ids`` int32 ``[r]``;
  ``new_codes`` int32 ``[r, l]``. Only these arrays cross to the host (see
  ``hostops.update_rows``).
  """
  ops = _hostops()
  num_tables = new_codes.shape[1]
  words = _seed_words(key, (num_tables,))

  @_serialized
  def host(rows, counts, old_rows, new_rows, ids, new_codes, words):
    return ops.update_rows(np.asarray(rows), np.asarray(counts), np.asarray(old_rows),
                           np.asarray(new_rows), np.asarray(ids), np.asarray(new_codes),
                           num_neurons, reservoir, _seeds(words))

  shapes = (jax.ShapeDtypeStruct(rows.shape, jnp.int32),
            jax.ShapeDtypeStruct(counts.shape, jnp.int32),
            jax.ShapeDtypeStruct(new_codes.shape, jnp.int32))
  return jax.pure_callback(host, shapes, rows, counts, old_rows, new_rows, ids, new_codes,
                           words, vmap_method=_VMAP_METHOD)


def bucket_rows(buckets: jax.Array, codes: jax.Array) -> jax.Array:
  """int32 ``[B, l, capacity]``: each sample's bucket in each table (gathered in XLA, so only
  these rows, not the whole table, are handed to the host)."""
  return buckets[jnp.arange(buckets.shape[0])[None, :], codes]


def select_per_sample(rows: jax.Array, forced: jax.Array, preferred: jax.Array, *,
                      num_neurons: int, num_active: int, policy: str, threshold: int,
                      uniform_share: float, key: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Host per-sample selection from candidate rows int32 ``[B, l, c]`` -> (ids ``[B, m]``,
  valid ``[B, m]``, forced_slots ``[B, f]``, num_fixed ``[B]``)."""
  ops = _hostops()
  import numba  # pylint: disable=import-outside-toplevel
  batch = rows.shape[0]
  words = _seed_words(key, (batch,))
  policy_id = ops.POLICIES[policy]

  @_serialized
  def host(rows, forced, preferred, words):
    return ops.select_per_sample(np.asarray(rows), np.asarray(forced), np.asarray(preferred),
                                 num_neurons, num_active, policy_id, threshold,
                                 float(uniform_share), _seeds(words), numba.get_num_threads())

  shapes = (jax.ShapeDtypeStruct((batch, num_active), jnp.int32),
            jax.ShapeDtypeStruct((batch, num_active), jnp.bool_),
            jax.ShapeDtypeStruct(forced.shape, jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32))
  return jax.pure_callback(host, shapes, rows, forced, preferred, words,
                           vmap_method=_VMAP_METHOD)


def select_shared(rows: jax.Array, forced: jax.Array, *, num_neurons: int, num_active: int,
                  policy: str, threshold: int, uniform_share: float,
                  key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Host batch-shared selection from candidate rows int32 ``[B, l, c]`` -> (ids ``[M]``,
  valid ``[M]``, slots ``[B, f]``, dropped, num_fixed)."""
  ops = _hostops()
  words = _seed_words(key, ())
  policy_id = ops.POLICIES[policy]

  @_serialized
  def host(rows, forced, words):
    return ops.select_shared(np.asarray(rows), np.asarray(forced),
                             num_neurons, num_active, policy_id, threshold,
                             float(uniform_share), _seeds(words)[()])

  shapes = (jax.ShapeDtypeStruct((num_active,), jnp.int32),
            jax.ShapeDtypeStruct((num_active,), jnp.bool_),
            jax.ShapeDtypeStruct(forced.shape, jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
  return jax.pure_callback(host, shapes, rows, forced, words, vmap_method=_VMAP_METHOD)


def neighbour_votes(query_ids: jax.Array, query_values: jax.Array, *index: jax.Array,
                    num_labels: int, k: int, power: float, width: int, max_list: int
                    ) -> tuple[jax.Array, jax.Array]:
  """Host :func:`hostops.neighbour_votes` of queries ``[B, F]`` over ``index`` (its seven
  arrays, from post_indptr to label_ids) -> (label ids int32 ``[B, width]``, votes float32
  ``[B, width]``); see :class:`slidejax.nn.NeighbourVotes`."""
  ops = _hostops()
  import numba  # pylint: disable=import-outside-toplevel

  @_serialized
  def host(*arrays):
    return ops.neighbour_votes(*(np.asarray(a) for a in arrays), num_labels, k, float(power),
                               width, max_list, numba.get_num_threads())

  batch = query_ids.shape[0]
  shapes = (jax.ShapeDtypeStruct((batch, width), jnp.int32),
            jax.ShapeDtypeStruct((batch, width), jnp.float32))
  return jax.pure_callback(host, shapes, query_ids, query_values, *index,
                           vmap_method=_VMAP_METHOD)
