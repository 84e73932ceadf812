"""Bucket tables: host (Numba) vs pure-JAX builders, incremental updates, jit and vmap."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slidejax import lsh

RANGE_BITS = 4
NUM_BUCKETS = 2**RANGE_BITS


def _skewed_codes(seed, n, l):
  """int32 [n, l] codes crowding the low buckets, so some overflow and some stay empty."""
  rng = np.random.default_rng(seed)
  codes = np.minimum(rng.geometric(0.2, size=(n, l)) - 1, NUM_BUCKETS - 2)
  return jnp.asarray(codes.astype(np.int32))


@functools.partial(jax.jit, static_argnames=("capacity", "insertion", "backend"))
def _build(codes, key, *, capacity, insertion, backend):
  return lsh.build_tables(codes, range_bits=RANGE_BITS, bucket_capacity=capacity,
                          insertion=insertion, key=key, backend=backend)


@functools.partial(jax.jit, static_argnames=("insertion", "backend"))
def _update(tables, ids, codes, key, *, insertion, backend):
  return lsh.update_tables(tables, ids, codes, key=key, insertion=insertion, backend=backend)


def _fifo_reference(codes, capacity):
  """Per table and bucket: the last ``capacity`` ids in increasing order."""
  n, l = codes.shape
  table = np.full((l, NUM_BUCKETS, capacity), -1, np.int32)
  for t in range(l):
    for b in range(NUM_BUCKETS):
      members = np.flatnonzero(codes[:, t] == b)[-capacity:]
      table[t, b, :members.size] = members
  return table


def _check_consistent(tables):
  """No duplicates per table, every stored id's current code is its bucket, sizes right."""
  buckets = np.asarray(tables.buckets)
  codes = np.asarray(tables.neuron_codes)
  counts = np.asarray(tables.counts)
  for t in range(buckets.shape[0]):
    stored = buckets[t][buckets[t] >= 0]
    assert np.unique(stored).size == stored.size
    for b in range(buckets.shape[1]):
      row = buckets[t, b]
      size = int(np.sum(row >= 0))
      assert (row[:size] >= 0).all() and (row[size:] == -1).all()      # compacted
      assert (codes[row[:size], t] == b).all()                          # never stale
      assert size <= min(counts[t, b], buckets.shape[2])
  np.testing.assert_array_equal(counts, _counts_of(codes, buckets.shape[1]))


def _counts_of(codes, num_buckets):
  return np.stack([np.bincount(codes[:, t], minlength=num_buckets)
                   for t in range(codes.shape[1])]).astype(np.int32)


@pytest.mark.parametrize("capacity", [1, 5])
def test_fifo_host_and_jax_identical_and_match_reference(capacity):
  codes = _skewed_codes(0, 300, 3)
  key = jax.random.key(0)
  host = _build(codes, key, capacity=capacity, insertion="fifo", backend="host")
  pure = _build(codes, key, capacity=capacity, insertion="fifo", backend="jax")
  expected = _fifo_reference(np.asarray(codes), capacity)
  np.testing.assert_array_equal(np.asarray(host.buckets), expected)
  np.testing.assert_array_equal(np.asarray(pure.buckets), expected)
  np.testing.assert_array_equal(np.asarray(host.counts), np.asarray(pure.counts))
  _check_consistent(host)


def test_reservoir_statistics_agree():
  codes = _skewed_codes(1, 2000, 4)
  capacity = 8
  host = _build(codes, jax.random.key(0), capacity=capacity, insertion="reservoir",
                backend="host")
  pure = _build(codes, jax.random.key(0), capacity=capacity, insertion="reservoir",
                backend="jax")
  for tables in (host, pure):
    _check_consistent(tables)
  stats_host = {k: float(v) for k, v in lsh.table_stats(host).items()}
  stats_pure = {k: float(v) for k, v in lsh.table_stats(pure).items()}
  assert stats_host == stats_pure
  assert stats_host["overflow"] > 0 and stats_host["empty_buckets"] > 0
  # A reservoir holds a uniform subset: ids of an overflowing bucket are not just the last.
  buckets = np.asarray(host.buckets)
  c = np.asarray(codes)
  members = np.flatnonzero(c[:, 0] == 0)
  assert members.size > 4 * capacity
  mean_rank = np.mean(np.searchsorted(members, buckets[0, 0]))
  assert 0.2 * members.size < mean_rank < 0.8 * members.size
  # Different keys give different subsets.
  other = _build(codes, jax.random.key(5), capacity=capacity, insertion="reservoir",
                 backend="host")
  assert not np.array_equal(np.asarray(other.buckets), buckets)


def _bucket_sets(tables):
  buckets = np.asarray(tables.buckets)
  return [[set(row[row >= 0].tolist()) for row in table] for table in buckets]


@pytest.mark.parametrize("backend", ["host", "jax"])
def test_update_equals_rebuild_without_overflow(backend):
  n, l, capacity = 200, 3, 200
  codes = _skewed_codes(2, n, l)
  rng = np.random.default_rng(3)
  ids = rng.choice(n, 30, replace=False).astype(np.int32)
  ids = np.concatenate([ids, [-1, ids[0]]]).astype(np.int32)   # padding and a repeat
  new_rows = np.array(_skewed_codes(4, ids.size, l))
  new_rows[-1] = new_rows[0]       # the repeated id's rows agree (first one is used anyway)
  key = jax.random.key(0)
  tables = _build(codes, key, capacity=capacity, insertion="fifo", backend=backend)
  updated = _update(tables, jnp.asarray(ids), jnp.asarray(new_rows), key, insertion="fifo",
                    backend=backend)
  final = np.asarray(codes).copy()
  final[ids[:30]] = new_rows[:30]
  rebuilt = _build(jnp.asarray(final), key, capacity=capacity, insertion="fifo",
                   backend=backend)
  assert _bucket_sets(updated) == _bucket_sets(rebuilt)
  np.testing.assert_array_equal(np.asarray(updated.counts), np.asarray(rebuilt.counts))
  np.testing.assert_array_equal(np.asarray(updated.neuron_codes), final)
  _check_consistent(updated)


@pytest.mark.parametrize("insertion", ["fifo", "reservoir"])
def test_update_with_overflow_never_stale(insertion):
  n, l, capacity = 400, 3, 6
  codes = _skewed_codes(5, n, l)
  key = jax.random.key(1)
  results = {}
  for backend in ("host", "jax"):
    tables = _build(codes, key, capacity=capacity, insertion=insertion, backend=backend)
    for step in range(3):
      rng = np.random.default_rng(10 + step)
      ids = jnp.asarray(rng.choice(n, 40, replace=False).astype(np.int32))
      rows = _skewed_codes(20 + step, 40, l)
      tables = _update(tables, ids, rows, jax.random.key(step), insertion=insertion,
                       backend=backend)
      _check_consistent(tables)
    results[backend] = tables
  np.testing.assert_array_equal(np.asarray(results["host"].counts),
                                np.asarray(results["jax"].counts))
  if insertion == "fifo":      # the FIFO update is deterministic: both backends agree exactly
    np.testing.assert_array_equal(np.asarray(results["host"].buckets),
                                  np.asarray(results["jax"].buckets))


@functools.partial(jax.jit, static_argnames=("reservoir",))
def _update_whole_tables(tables, ids, codes, key, *, reservoir):
  """The previous host update (whole tables through the callback): the reference."""
  from slidejax.lsh import _host  # pylint: disable=import-outside-toplevel
  return lsh.LSHTables(*_host.update_tables(tables.buckets, tables.counts, tables.neuron_codes,
                                            ids, codes, reservoir=reservoir, key=key))


def _random_update(rng, codes, r, num_buckets):
  """ids int32 [r] with padding, repeats and unchanged codes; rows int32 [r, l] (skewed)."""
  n, l = codes.shape
  ids = rng.integers(-2, n + 2, size=r).astype(np.int32)      # out of range = padding
  if r > 2:
    ids[1] = ids[0]                                           # a repeated id
  rows = np.minimum(rng.geometric(0.3, size=(r, l)) - 1, num_buckets - 1).astype(np.int32)
  same = (rng.random(r) < 0.3) & (ids >= 0) & (ids < n)
  rows[same] = codes[ids[same]]                               # new code == old code
  rows[same, 0] = (rows[same, 0] + 1) % num_buckets           # ... in all tables but one
  return jnp.asarray(ids), jnp.asarray(rows)


@pytest.mark.parametrize("insertion", ["fifo", "reservoir"])
@pytest.mark.parametrize("range_bits,capacity", [(4, 3), (7, 1), (7, 4), (8, 16)])
def test_host_row_update_equals_whole_table_update(insertion, range_bits, capacity):
  n, l = 500, 4
  num_buckets = 1 << range_bits
  rng = np.random.default_rng(range_bits * 100 + capacity)
  codes = np.minimum(rng.geometric(0.15, size=(n, l)) - 1, num_buckets - 1).astype(np.int32)
  build = jax.jit(functools.partial(lsh.build_tables, range_bits=range_bits,
                                    bucket_capacity=capacity, insertion=insertion,
                                    backend="host"))
  update = jax.jit(functools.partial(lsh.update_tables, insertion=insertion, backend="host"),
                   donate_argnums=0)
  tables = build(jnp.asarray(codes), key=jax.random.key(0))
  reference = jax.tree.map(jnp.copy, tables)
  assert float(lsh.table_stats(tables)["overflow"]) > 0
  # r = 0, a few rows (touched rows gathered), 2r >= num_buckets (whole tables), all rows.
  for step, r in enumerate([0, 1, 3, 9, 60, 2 * n]):
    ids, rows = _random_update(rng, np.asarray(reference.neuron_codes), r, num_buckets)
    key = jax.random.key(step)
    reference = _update_whole_tables(reference, ids, rows, key,
                                     reservoir=insertion == "reservoir")
    tables = update(tables, ids, rows, key=key)
    for got, want in zip(tables, reference):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _check_consistent(tables)


def test_host_build_under_vmap_and_jit():
  codes = jnp.stack([_skewed_codes(6, 100, 2), _skewed_codes(7, 100, 2)])
  keys = jax.random.split(jax.random.key(0), 2)
  build = jax.jit(jax.vmap(lambda c, k: lsh.build_tables(
      c, range_bits=RANGE_BITS, bucket_capacity=4, insertion="fifo", key=k, backend="host")))
  batched = build(codes, keys)
  for i in range(2):
    single = _build(codes[i], keys[i], capacity=4, insertion="fifo", backend="jax")
    np.testing.assert_array_equal(np.asarray(batched.buckets[i]), np.asarray(single.buckets))
  update = jax.vmap(lambda t, k: lsh.update_tables(
      t, jnp.array([0, 1], jnp.int32), jnp.zeros((2, 2), jnp.int32), key=k, backend="host"))
  updated = update(batched, keys)
  assert updated.buckets.shape == batched.buckets.shape
  _check_consistent(jax.tree.map(lambda a: a[1], updated))


def test_stats_and_errors():
  codes = jnp.zeros((10, 2), jnp.int32)       # identical weights: one bucket per table
  tables = lsh.build_tables(codes, range_bits=2, bucket_capacity=4, backend="host")
  stats = {k: float(v) for k, v in lsh.table_stats(tables).items()}
  assert stats["stored"] == 8 and stats["overflow"] == 12 and stats["empty_buckets"] == 0.75
  np.testing.assert_array_equal(np.asarray(tables.buckets[0, 0]), [6, 7, 8, 9])  # last 4
  with pytest.raises(ValueError, match="insertion"):
    lsh.build_tables(codes, range_bits=2, bucket_capacity=4, insertion="lru")
  with pytest.raises(ValueError, match="backend"):
    lsh.build_tables(codes, range_bits=2, bucket_capacity=4, backend="gpu")
  assert lsh.resolve_backend(None) == "host"       # tests run on CPU


@pytest.mark.parametrize("insertion", ["fifo", "reservoir"])
@pytest.mark.parametrize("n,chunk_size", [(1000, 128), (1000, 1000), (1000, 4096), (257, 1)])
def test_streamed_build_equals_full_build(insertion, n, chunk_size):
  fam = lsh.simhash(24, k=5, l=6, range_bits=5)
  params = fam.init(jax.random.key(0))
  weights = jax.random.normal(jax.random.key(1), (n, 24))
  key = jax.random.key(2)
  full = lsh.build_tables(lsh.neuron_codes(fam, params, weights), range_bits=5,
                          bucket_capacity=8, insertion=insertion, key=key, backend="host")
  assert float(lsh.table_stats(full)["overflow"]) > 0       # FIFO rings wrap around
  streamed = lsh.build_tables_streamed(fam, params, weights, bucket_capacity=8,
                                       insertion=insertion, key=key, chunk_size=chunk_size)
  for a, b in zip(full, streamed):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lean = lsh.build_tables_streamed(fam, params, weights, bucket_capacity=8,
                                   insertion=insertion, key=key, chunk_size=chunk_size,
                                   keep_codes=False)
  np.testing.assert_array_equal(np.asarray(lean.buckets), np.asarray(full.buckets))
  assert lean.neuron_codes.shape == (n, 0) and lean.num_neurons == n


def test_streamed_tables_are_ordinary_donatable_arrays():
  fam = lsh.simhash(16, k=4, l=3, range_bits=4)
  params = fam.init(jax.random.key(0))
  weights = jax.random.normal(jax.random.key(1), (300, 16))
  tables = lsh.build_tables_streamed(fam, params, weights, bucket_capacity=4, chunk_size=64)
  expected = np.asarray(tables.buckets).copy()
  passthrough = jax.jit(lambda t: t, donate_argnums=0)
  moved = passthrough(tables)
  np.testing.assert_array_equal(np.asarray(moved.buckets), expected)
  with pytest.raises(TypeError, match="eagerly"):
    jax.jit(lambda w: lsh.build_tables_streamed(fam, params, w, bucket_capacity=4))(weights)


def test_codes_are_stored_compactly_and_updates_need_them():
  assert lsh.codes_dtype(12) == jnp.uint16 and lsh.codes_dtype(17) == jnp.int32
  codes = _skewed_codes(3, 40, 2)
  tables = lsh.build_tables(codes, range_bits=RANGE_BITS, bucket_capacity=4)
  assert tables.neuron_codes.dtype == jnp.uint16
  lean = lsh.build_tables(codes, range_bits=RANGE_BITS, bucket_capacity=4, keep_codes=False)
  with pytest.raises(ValueError, match="keep_codes"):
    lsh.update_tables(lean, jnp.array([1], jnp.int32), jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("name,k,bin_size,range_bits", [
    ("dwta", 6, 8, 12),     # folded (18 bits > 12)
    ("dwta", 3, 4, 12),     # exact packing
    ("dwta", 12, 8, 14),    # 36 bits: the mixing path
    ("wta", 4, 8, 10),
    ("wta", 2, 3, 4),
])
def test_host_wta_codes_equal_jax_codes(name, k, bin_size, range_bits):
  from slidejax.lsh import _host  # pylint: disable=import-outside-toplevel
  make = lsh.dwta if name == "dwta" else lsh.wta
  fam = make(32, k=k, l=5, bin_size=bin_size, range_bits=range_bits)
  params = fam.init(jax.random.key(k))
  rng = np.random.default_rng(k)
  w = rng.normal(size=(700, 32)).astype(np.float32)
  w[rng.random(w.shape) < 0.6] = 0       # empty DWTA bins: densified along the probes
  w[3] = 0                               # every bin empty
  w[5] = 1.0                             # ties everywhere
  out = np.empty((650, 5), np.int32)
  _host.wta_codes(fam, params, w, 50, out)
  np.testing.assert_array_equal(out, np.asarray(fam.codes(params, jnp.asarray(w)))[50:])


@pytest.mark.parametrize("insertion", ["fifo", "reservoir"])
def test_streamed_dwta_build_uses_host_codes_and_equals_full_build(insertion):
  from slidejax.lsh import _stream  # pylint: disable=import-outside-toplevel
  assert "dwta" in _stream.HOST_CODE_FAMILIES
  fam = lsh.dwta(24, k=4, l=6, bin_size=8, range_bits=7)
  params = fam.init(jax.random.key(0))
  w = jax.random.normal(jax.random.key(1), (1000, 24))
  w = jnp.where(jax.random.uniform(jax.random.key(2), w.shape) < 0.5, 0.0, w)
  key = jax.random.key(3)
  full = lsh.build_tables(lsh.neuron_codes(fam, params, w), range_bits=7, bucket_capacity=8,
                          insertion=insertion, key=key, backend="host")
  streamed = lsh.build_tables_streamed(fam, params, w, bucket_capacity=8, insertion=insertion,
                                       key=key, chunk_size=128)
  for a, b in zip(full, streamed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
