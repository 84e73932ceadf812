"""Numba kernels that build and incrementally update LSH bucket tables.

Layout: ``buckets int32[l, num_buckets, capacity]`` (-1 = empty, each bucket's ids stored
first, compacted), ``counts int32[l, num_buckets]`` (neurons whose current code is the
bucket, stored or not), codes ``int32[l, n]`` (table-major: one contiguous row per table).

Insertion policies:
  * FIFO (``reservoir=False``): ids are offered in increasing neuron id order and a full
    bucket evicts its oldest id, so a bucket keeps the LAST ``capacity`` ids offered to it.
  * reservoir: Algorithm R; the i-th id offered to a bucket replaces a random slot with
    probability ``capacity / i``, so a bucket holds a uniform random subset.

Randomness is passed in as ``seeds uint64[l]`` drawn by the caller (from a JAX key); a
counter-based splitmix64 hash of (seed, draw index) gives each draw, so results do not depend
on thread scheduling. All outputs are freshly allocated.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(cache=True, inline="always")
def splitmix64(x):
  """A 64-bit mixing function (splitmix64 finaliser) of a uint64."""
  z = x + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


@nb.njit(cache=True, inline="always")
def random_below(seed, counter, bound):
  """Uniform int in ``[0, bound)`` from draw ``counter`` of stream ``seed``."""
  return np.int64(splitmix64(seed + np.uint64(counter) * _GOLDEN) % np.uint64(bound))


@nb.njit(cache=True)
def _fill_table(codes_t, num_buckets, capacity, reservoir, seed, bucket_out, count_out):
  """Fills one table: codes_t int32[n] -> bucket_out [num_buckets, capacity], count_out."""
  n = codes_t.shape[0]
  for i in range(n):
    count_out[codes_t[i]] += 1
  if reservoir:
    seen = np.zeros(num_buckets, np.int64)
    for i in range(n):
      b = codes_t[i]
      c = seen[b]
      seen[b] = c + 1
      if c < capacity:
        bucket_out[b, c] = i
      else:
        j = random_below(seed, i, c + 1)
        if j < capacity:
          bucket_out[b, j] = i
    return
  # FIFO: keep the last `capacity` ids of each bucket, stored in id order.
  rank = np.zeros(num_buckets, np.int64)
  for i in range(n):
    b = codes_t[i]
    r = rank[b]
    rank[b] = r + 1
    skip = count_out[b] - capacity
    if r >= skip:
      bucket_out[b, r - max(skip, 0)] = i


@nb.njit(cache=True, parallel=True)
def build_tables(codes_ln, num_buckets, capacity, reservoir, seeds):
  """Builds all tables from codes int32[l, n]; returns (buckets, counts)."""
  num_tables = codes_ln.shape[0]
  buckets = np.full((num_tables, num_buckets, capacity), -1, np.int32)
  counts = np.zeros((num_tables, num_buckets), np.int32)
  for t in nb.prange(num_tables):
    _fill_table(codes_ln[t], num_buckets, capacity, reservoir, seeds[t], buckets[t], counts[t])
  return buckets, counts


@nb.njit(cache=True, parallel=True)
def stream_fill(buckets, counts, codes_out, chunk_codes, first_id, skip, reservoir, seeds):
  """Offers one chunk of neurons to tables being built in place (a streamed build).

  Rows ``skip..c-1`` of ``chunk_codes int32[c, l]`` are the codes of neurons
  ``first_id + skip ..``; ids must arrive in increasing order across calls. ``counts`` counts
  the neurons offered so far. FIFO writes bucket ``b``'s ``k``-th id to slot
  ``k % capacity`` (a ring, put in order by :func:`stream_finish_fifo`); reservoir draws
  exactly as :func:`build_tables` does, so both give the same tables. Writes the codes to
  ``codes_out[n, l]`` (any integer dtype; ``[n, 0]``: not kept).
  """
  c, num_tables = chunk_codes.shape
  capacity = buckets.shape[2]
  if codes_out.shape[1] == num_tables:
    for j in nb.prange(skip, c):
      for t in range(num_tables):
        codes_out[first_id + j, t] = chunk_codes[j, t]
  for t in nb.prange(num_tables):
    table = buckets[t]
    count = counts[t]
    seed = seeds[t]
    for j in range(skip, c):
      i = first_id + j
      b = chunk_codes[j, t]
      seen = count[b]
      count[b] = seen + 1
      if seen < capacity:
        table[b, seen] = i
      elif reservoir:
        slot = random_below(seed, i, seen + 1)
        if slot < capacity:
          table[b, slot] = i
      else:
        table[b, seen % capacity] = i


@nb.njit(cache=True, parallel=True)
def stream_finish_fifo(buckets, counts):
  """Rotates each overflowed FIFO ring so its oldest id comes first (as :func:`build_tables`)."""
  num_tables, num_buckets, capacity = buckets.shape
  for t in nb.prange(num_tables):
    ring = np.empty(capacity, np.int32)
    for b in range(num_buckets):
      shift = counts[t, b] % capacity
      if counts[t, b] > capacity and shift:
        ring[:] = buckets[t, b]
        for s in range(capacity):
          buckets[t, b, s] = ring[(s + shift) % capacity]


@nb.njit(cache=True)
def _compact_without(bucket, is_updated):
  """Removes updated ids from a bucket row, keeping order; returns the new size."""
  size = 0
  for s in range(bucket.shape[0]):
    v = bucket[s]
    if v < 0:
      break
    if not is_updated[v]:
      bucket[size] = v
      size += 1
  for s in range(size, bucket.shape[0]):
    bucket[s] = -1
  return size


@nb.njit(cache=True)
def _update_table(bucket_t, count_t, old_codes_t, new_codes_t, ids, is_updated, reservoir,
                  seed):
  """Re-inserts ``ids`` (unique, increasing) into one table, in place on fresh copies."""
  r = ids.shape[0]
  num_buckets, capacity = bucket_t.shape
  compacted = np.zeros(num_buckets, np.bool_)
  size = np.zeros(num_buckets, np.int64)
  for j in range(r):
    b = old_codes_t[j]
    count_t[b] -= 1
    if not compacted[b]:
      compacted[b] = True
      size[b] = _compact_without(bucket_t[b], is_updated)
  for j in range(r):
    b = new_codes_t[j]
    if not compacted[b]:
      compacted[b] = True
      size[b] = _compact_without(bucket_t[b], is_updated)
  for j in range(r):
    b = new_codes_t[j]
    c = count_t[b]          # neurons in the bucket before this one
    count_t[b] = c + 1
    s = size[b]
    if s < capacity:
      bucket_t[b, s] = ids[j]
      size[b] = s + 1
    elif reservoir:
      slot = random_below(seed, j, c + 1)
      if slot < capacity:
        bucket_t[b, slot] = ids[j]
    else:  # FIFO: evict the oldest (first) entry
      for q in range(capacity - 1):
        bucket_t[b, q] = bucket_t[b, q + 1]
      bucket_t[b, capacity - 1] = ids[j]


@nb.njit(cache=True, parallel=True)
def update_tables(buckets, counts, neuron_codes, ids, new_codes, reservoir, seeds):
  """Incrementally re-inserts neurons; returns fresh (buckets, counts, neuron_codes).

  Args:
    buckets: int32[l, num_buckets, capacity]; counts: int32[l, num_buckets].
    neuron_codes: int32[n, l], the codes the neurons are currently inserted with.
    ids: int32[r] neuron ids (-1 or out of range = padding; duplicates use the first).
    new_codes: int32[r, l]; seeds: uint64[l].
  """
  n, num_tables = neuron_codes.shape
  buckets = buckets.copy()
  counts = counts.copy()
  codes_out = neuron_codes.copy()
  is_updated = np.zeros(max(n, 1), np.bool_)
  order = np.argsort(ids, kind="mergesort")
  keep = np.empty(ids.shape[0], np.int64)
  r = 0
  for q in range(order.shape[0]):
    j = order[q]
    i = ids[j]
    if 0 <= i < n and not is_updated[i]:
      is_updated[i] = True
      keep[r] = j
      r += 1
  kept_ids = np.empty(r, np.int32)
  old_ln = np.empty((num_tables, r), np.int32)
  new_ln = np.empty((num_tables, r), np.int32)
  for q in range(r):
    j = keep[q]
    i = ids[j]
    kept_ids[q] = i
    for t in range(num_tables):
      old_ln[t, q] = neuron_codes[i, t]
      new_ln[t, q] = new_codes[j, t]
      codes_out[i, t] = new_codes[j, t]
  for t in nb.prange(num_tables):
    _update_table(buckets[t], counts[t], old_ln[t], new_ln[t], kept_ids, is_updated,
                  reservoir, seeds[t])
  return buckets, counts, codes_out


@nb.njit(cache=True)
def _kept_ids(ids, num_neurons, is_updated):
  """First occurrence of each valid id, in increasing id order.

  Returns (``keep int64[r']`` their positions in ``ids``, ``first int64[r]`` the position
  whose row each position uses); marks the kept ids in ``is_updated bool[num_neurons]``.
  """
  order = np.argsort(ids, kind="mergesort")
  keep = np.empty(ids.shape[0], np.int64)
  first = np.arange(ids.shape[0])
  r = 0
  for q in range(order.shape[0]):
    j = order[q]
    i = ids[j]
    if not 0 <= i < num_neurons:
      continue
    if not is_updated[i]:
      is_updated[i] = True
      keep[r] = j
      r += 1
    first[j] = keep[r - 1]
  return keep[:r], first


@nb.njit(cache=True)
def _update_rows_table(rows, counts, old_rows_t, new_rows_t, ids, keep, is_updated,
                       compacted, size, reservoir, seed):
  """One table: the edit of :func:`_update_table` on gathered rows.

  ``old_rows_t``/``new_rows_t`` int64[r] index the table's rows of ``rows int32[T, capacity]``
  (and ``counts``, ``compacted``, ``size`` ``[T]``) holding each position's old/new bucket.
  """
  capacity = rows.shape[1]
  for q in range(keep.shape[0]):
    counts[old_rows_t[keep[q]]] -= 1
  for q in range(2 * keep.shape[0]):
    k = old_rows_t[keep[q]] if q < keep.shape[0] else new_rows_t[keep[q - keep.shape[0]]]
    if not compacted[k]:
      compacted[k] = True
      size[k] = _compact_without(rows[k], is_updated)
  for q in range(keep.shape[0]):
    k = new_rows_t[keep[q]]
    c = counts[k]           # neurons in the bucket before this one
    counts[k] = c + 1
    s = size[k]
    if s < capacity:
      rows[k, s] = ids[keep[q]]
      size[k] = s + 1
    elif reservoir:
      slot = random_below(seed, q, c + 1)
      if slot < capacity:
        rows[k, slot] = ids[keep[q]]
    else:  # FIFO: evict the oldest (first) entry
      for p in range(capacity - 1):
        rows[k, p] = rows[k, p + 1]
      rows[k, capacity - 1] = ids[keep[q]]


@nb.njit(cache=True, parallel=True)
def update_rows(rows, counts, old_rows, new_rows, ids, new_codes, num_neurons, reservoir,
                seeds):
  """Incremental update on gathered bucket rows; returns fresh (rows, counts, codes).

  Gives, on the rows it is given, the result of :func:`update_tables` on whole tables.

  Args:
    rows: int32[T, capacity] bucket rows; counts: int32[T] their counts. Rows of different
      tables are distinct.
    old_rows, new_rows: int32[r, l] the row of each id's current / new bucket per table.
    ids: int32[r] neuron ids (``< 0`` or ``>= num_neurons`` = padding, any order; a repeated
      id uses its first row). new_codes: int32[r, l]; seeds: uint64[l].
  Returns:
    rows, counts, and ``codes int32[r, l]``: the code each position's id now has (the row of
    its first occurrence; undefined for padding).
  """
  num_tables = seeds.shape[0]
  rows = rows.copy()
  counts = counts.copy()
  is_updated = np.zeros(max(num_neurons, 1), np.bool_)
  keep, first = _kept_ids(ids, num_neurons, is_updated)
  codes = np.empty_like(new_codes)
  for j in range(ids.shape[0]):
    codes[j] = new_codes[first[j]]
  old_ln = np.ascontiguousarray(old_rows.T).astype(np.int64)
  new_ln = np.ascontiguousarray(new_rows.T).astype(np.int64)
  compacted = np.zeros(rows.shape[0], np.bool_)
  size = np.zeros(rows.shape[0], np.int64)
  for t in nb.prange(num_tables):
    _update_rows_table(rows, counts, old_ln[t], new_ln[t], ids, keep, is_updated, compacted,
                       size, reservoir, seeds[t])
  return rows, counts, codes


def warmup() -> None:
  """Compiles the table kernels on tiny inputs (cached on disk by Numba)."""
  codes = np.zeros((2, 3), np.int32)
  seeds = np.zeros(2, np.uint64)
  for reservoir in (False, True):
    b, c = build_tables(codes, 4, 2, reservoir, seeds)
    writable = np.ascontiguousarray(codes.T)
    readonly = writable.copy()
    readonly.setflags(write=False)   # as np.asarray of a jax.Array arrives
    for chunk in (readonly, writable):
      for codes_out in (np.zeros((3, 2), np.uint16), np.zeros((3, 2), np.int32),
                        np.zeros((3, 0), np.uint16), np.zeros((3, 0), np.int32)):
        sb, sc = np.full_like(b, -1), np.zeros_like(c)
        stream_fill(sb, sc, codes_out, chunk, 0, 0, reservoir, seeds)
    stream_finish_fifo(sb, sc)
    update_tables(b, c, np.ascontiguousarray(codes.T), np.array([1], np.int32),
                  np.ones((1, 2), np.int32), reservoir, seeds)
    update_rows(b.reshape(8, 2), c.reshape(8), np.array([[1, 5]], np.int32),
                np.array([[2, 6]], np.int32), np.array([1], np.int32),
                np.ones((1, 2), np.int32), 3, reservoir, seeds)
