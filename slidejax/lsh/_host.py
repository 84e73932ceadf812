"""Every ``jax.pure_callback`` of slidejax: JAX wrappers of the Numba kernels in ``hostops``.

Each wrapper draws its randomness from a JAX key (as uint32 words, turned into uint64 seeds
on the host), works inside jit, and under vmap runs the kernel once per mapped element
(``vmap_method="sequential"``). The Numba kernels are compiled (or loaded from Numba's disk
cache) at trace time, by :func:`warmup`, so compilation never lands inside a timed step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_VMAP_METHOD = "sequential"


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

  def host(codes_ln, words):
    return ops.build_tables(np.ascontiguousarray(np.asarray(codes_ln)), num_buckets, capacity,
                            reservoir, _seeds(words))

  shapes = (jax.ShapeDtypeStruct((num_tables, num_buckets, capacity), jnp.int32),
            jax.ShapeDtypeStruct((num_tables, num_buckets), jnp.int32))
  return jax.pure_callback(host, shapes, codes_ln, words, vmap_method=_VMAP_METHOD)


def update_tables(buckets: jax.Array, counts: jax.Array, neuron_codes: jax.Array,
                  neuron_ids: jax.Array, new_codes: jax.Array, *, reservoir: bool,
                  key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Host incremental update of whole tables; returns fresh (buckets, counts, neuron_codes).

  Costs a copy of the whole state; :func:`update_rows` only moves the touched rows.
  """
  ops = _hostops()
  words = _seed_words(key, (buckets.shape[0],))

  def host(buckets, counts, neuron_codes, neuron_ids, new_codes, words):
    return ops.update_tables(np.asarray(buckets), np.asarray(counts), np.asarray(neuron_codes),
                             np.asarray(neuron_ids), np.asarray(new_codes), reservoir,
                             _seeds(words))

  shapes = (jax.ShapeDtypeStruct(buckets.shape, jnp.int32),
            jax.ShapeDtypeStruct(counts.shape, jnp.int32),
            jax.ShapeDtypeStruct(neuron_codes.shape, jnp.int32))
  return jax.pure_callback(host, shapes, buckets, counts, neuron_codes,
                           neuron_ids.astype(jnp.int32), new_codes.astype(jnp.int32), words,
                           vmap_method=_VMAP_METHOD)


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

  def host(rows, counts, old_rows, new_rows, ids, new_codes, words):
    return ops.update_rows(np.asarray(rows), np.asarray(counts), np.asarray(old_rows),
                           np.asarray(new_rows), np.asarray(ids), np.asarray(new_codes),
                           num_neurons, reservoir, _seeds(words))

  shapes = (jax.ShapeDtypeStruct(rows.shape, jnp.int32),
            jax.ShapeDtypeStruct(counts.shape, jnp.int32),
            jax.ShapeDtypeStruct(new_codes.shape, jnp.int32))
  return jax.pure_callback(host, shapes, rows, counts, old_rows, new_rows, ids, new_codes,
                           words, vmap_method=_VMAP_METHOD)


def _bucket_rows(buckets: jax.Array, codes: jax.Array) -> jax.Array:
  """int32 ``[B, l, capacity]``: each sample's bucket in each table (gathered in XLA, so only
  these rows, not the whole table, are handed to the host)."""
  return buckets[jnp.arange(buckets.shape[0])[None, :], codes]


def select_per_sample(buckets: jax.Array, codes: jax.Array, forced: jax.Array, *,
                      num_neurons: int, num_active: int, policy: str, threshold: int,
                      key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Host per-sample selection -> (ids ``[B, m]``, valid ``[B, m]``, forced_slots ``[B, f]``)."""
  ops = _hostops()
  import numba  # pylint: disable=import-outside-toplevel
  batch = codes.shape[0]
  words = _seed_words(key, (batch,))
  policy_id = ops.POLICIES[policy]

  def host(rows, forced, words):
    return ops.select_per_sample(np.asarray(rows), np.asarray(forced),
                                 num_neurons, num_active, policy_id, threshold, _seeds(words),
                                 numba.get_num_threads())

  shapes = (jax.ShapeDtypeStruct((batch, num_active), jnp.int32),
            jax.ShapeDtypeStruct((batch, num_active), jnp.bool_),
            jax.ShapeDtypeStruct(forced.shape, jnp.int32))
  return jax.pure_callback(host, shapes, _bucket_rows(buckets, codes), forced, words,
                           vmap_method=_VMAP_METHOD)


def select_shared(buckets: jax.Array, codes: jax.Array, forced: jax.Array, *,
                  num_neurons: int, num_active: int, policy: str, threshold: int,
                  key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Host batch-shared selection -> (ids ``[M]``, valid ``[M]``, slots ``[B, f]``, dropped)."""
  ops = _hostops()
  words = _seed_words(key, ())
  policy_id = ops.POLICIES[policy]

  def host(rows, forced, words):
    return ops.select_shared(np.asarray(rows), np.asarray(forced),
                             num_neurons, num_active, policy_id, threshold,
                             _seeds(words)[()])

  shapes = (jax.ShapeDtypeStruct((num_active,), jnp.int32),
            jax.ShapeDtypeStruct((num_active,), jnp.bool_),
            jax.ShapeDtypeStruct(forced.shape, jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
  return jax.pure_callback(host, shapes, _bucket_rows(buckets, codes), forced, words,
                           vmap_method=_VMAP_METHOD)
