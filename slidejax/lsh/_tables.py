"""LSH bucket tables: state, full builders and incremental updaters (host Numba and pure JAX).

Semantics shared by both backends:
  * Each neuron is offered to bucket ``codes[i, t]`` of every table ``t``.
  * FIFO: neurons are offered in increasing id order and a full bucket evicts its oldest
    entry, so a bucket keeps the LAST ``bucket_capacity`` ids hashed to it, stored oldest
    first. Host and JAX builders produce identical tables.
  * reservoir: a bucket keeps a uniform random subset of ``bucket_capacity`` of its ids
    (host: Algorithm R; JAX: smallest random priorities), so only statistics agree.
  * ``counts[t, b]`` is the number of neurons whose current code in table ``t`` is ``b``
    (stored or not): ``counts - stored`` is the overflow. Slots after the stored ids are -1.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from slidejax._dedup import MARKS_RATIO
from slidejax._dedup import unique_by_marks
from slidejax._dedup import unique_with_inverse
from slidejax.lsh import _host

INSERTIONS = ("fifo", "reservoir")
BACKENDS = ("host", "jax")


class LSHTables(NamedTuple):
  """Bucket tables of ``n`` neurons.

  Attributes:
    buckets: int32 ``[l, 2**range_bits, bucket_capacity]`` neuron ids, -1 = empty slot.
    counts: int32 ``[l, 2**range_bits]`` neurons hashed to each bucket (stored or not).
    neuron_codes: ``[n, l]`` the code each neuron is currently inserted with, stored as
      :func:`codes_dtype` (uint16 up to 2**16 buckets: half the memory of int32).
  """
  buckets: jax.Array
  counts: jax.Array
  neuron_codes: jax.Array

  @property
  def num_tables(self) -> int:
    return self.buckets.shape[0]

  @property
  def num_buckets(self) -> int:
    return self.buckets.shape[1]

  @property
  def bucket_capacity(self) -> int:
    return self.buckets.shape[2]

  @property
  def num_neurons(self) -> int:
    return self.neuron_codes.shape[0]


def codes_dtype(range_bits: int):
  """Storage dtype of ``neuron_codes`` for ``2**range_bits`` buckets: uint16 or int32."""
  return jnp.uint16 if range_bits <= 16 else jnp.int32


def _stored_codes(codes: jax.Array, num_buckets: int) -> jax.Array:
  return codes.astype(codes_dtype(max(0, (num_buckets - 1).bit_length())))


def resolve_backend(backend: str | None) -> str:
  """``None`` -> ``host`` on CPU (Numba beats XLA sorts), ``jax`` on accelerators."""
  if backend is None:
    return "host" if jax.default_backend() == "cpu" else "jax"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend


def _check_insertion(insertion: str) -> bool:
  if insertion not in INSERTIONS:
    raise ValueError(f"insertion must be one of {INSERTIONS}, got {insertion!r}")
  return insertion == "reservoir"


def _default_key(key):
  return jax.random.key(0) if key is None else key


# -- pure-JAX placement ------------------------------------------------------------------------
def _place(bucket_sorted, ids_sorted, totals, num_buckets, capacity, keep_last):
  """Writes entries sorted by bucket (sentinel bucket = ``num_buckets``) into a table.

  Args:
    bucket_sorted, ids_sorted: int32 ``[E]`` sorted by bucket, within a bucket by age.
    totals: int32 ``[num_buckets]`` entries per bucket among them.
    keep_last: keep each bucket's last ``capacity`` entries (FIFO), else its first.
  Returns:
    int32 ``[num_buckets, capacity]``.
  """
  starts = jnp.cumsum(totals) - totals
  safe_bucket = jnp.minimum(bucket_sorted, num_buckets - 1)
  rank = jnp.arange(bucket_sorted.shape[0], dtype=jnp.int32) - starts[safe_bucket]
  if keep_last:
    skip = totals[safe_bucket] - capacity
    slot = rank - jnp.maximum(skip, 0)
  else:
    slot = rank
  keep = (bucket_sorted < num_buckets) & (slot >= 0) & (slot < capacity)
  row = jnp.where(keep, bucket_sorted, num_buckets)
  table = jnp.full((num_buckets, capacity), -1, jnp.int32)
  return table.at[row, slot].set(ids_sorted, mode="drop")


def _bincount(bucket, weights, num_buckets):
  return jnp.zeros((num_buckets,), jnp.int32).at[bucket].add(weights, mode="drop")


def _build_table_jax(codes_t, priorities, num_buckets, capacity, reservoir):
  """One table from codes int32 ``[n]``: (bucket table, counts)."""
  n = codes_t.shape[0]
  ids = jnp.arange(n, dtype=jnp.int32)
  counts = _bincount(codes_t, jnp.ones((n,), jnp.int32), num_buckets)
  id_bits = max(1, (n - 1).bit_length())
  range_bits = max(1, (num_buckets - 1).bit_length())
  if reservoir:
    bucket_sorted, _, ids_sorted = jax.lax.sort((codes_t, priorities, ids), num_keys=2)
  elif id_bits + range_bits <= 32:   # one packed uint32 key: the fast XLA sort
    packed = (codes_t.astype(jnp.uint32) << jnp.uint32(id_bits)) | ids.astype(jnp.uint32)
    packed = jnp.sort(packed)
    bucket_sorted = (packed >> jnp.uint32(id_bits)).astype(jnp.int32)
    ids_sorted = (packed & jnp.uint32((1 << id_bits) - 1)).astype(jnp.int32)
  else:
    bucket_sorted, ids_sorted = jax.lax.sort((codes_t, ids), num_keys=1, is_stable=True)
  table = _place(bucket_sorted, ids_sorted, counts, num_buckets, capacity, not reservoir)
  return table, counts


def _build_jax(codes, num_buckets, capacity, reservoir, key):
  n, num_tables = codes.shape
  priorities = jax.random.bits(key, (num_tables, n), jnp.uint32)
  build = jax.vmap(lambda c, p: _build_table_jax(c, p, num_buckets, capacity, reservoir))
  return build(codes.T, priorities)


def build_tables(codes: jax.Array, *, range_bits: int, bucket_capacity: int,
                 insertion: str = "fifo", key: jax.Array | None = None,
                 backend: str | None = None, keep_codes: bool = True) -> LSHTables:
  """Builds the tables of all neurons from their codes int32 ``[n, l]``.

  ``keep_codes=False`` stores ``neuron_codes`` as an empty ``[n, 0]`` array (saves
  ``2 n l`` bytes; only :func:`update_tables` needs the codes).

  ``key`` drives reservoir insertion (FIFO is deterministic). ``backend``: ``host`` (Numba
  via a host callback), ``jax`` (sort-based), ``None`` (host on CPU, jax elsewhere). Works
  inside jit and under vmap.
  """
  reservoir = _check_insertion(insertion)
  if bucket_capacity < 1:
    raise ValueError(f"bucket_capacity must be positive, got {bucket_capacity}")
  codes = codes.astype(jnp.int32)
  num_buckets = 1 << range_bits
  key = _default_key(key)
  if resolve_backend(backend) == "host":
    buckets, counts = _host.build_tables(codes, num_buckets=num_buckets,
                                         capacity=bucket_capacity, reservoir=reservoir,
                                         key=key)
  else:
    buckets, counts = _build_jax(codes, num_buckets, bucket_capacity, reservoir, key)
  stored = _stored_codes(codes if keep_codes else codes[:, :0], num_buckets)
  return LSHTables(buckets, counts, stored)


# -- incremental update ------------------------------------------------------------------------
def _dedupe_ids(neuron_ids, num_neurons):
  """Sorted unique valid ids: (ids_sorted with ``num_neurons`` for invalid, source index)."""
  r = neuron_ids.shape[0]
  valid = (neuron_ids >= 0) & (neuron_ids < num_neurons)
  keys = jnp.where(valid, neuron_ids, num_neurons)
  ids_sorted, source = jax.lax.sort((keys, jnp.arange(r, dtype=jnp.int32)), num_keys=1,
                                    is_stable=True)
  first = jnp.concatenate([jnp.ones((1,), bool), ids_sorted[1:] != ids_sorted[:-1]])
  ids_sorted = jnp.where(first & (ids_sorted < num_neurons), ids_sorted, num_neurons)
  return ids_sorted, source


def _update_table_jax(table, counts_t, old_codes_t, new_codes_t, ids_sorted, is_updated,
                      priorities, reservoir):
  """One table: removes updated ids, re-inserts them with new codes (newest last)."""
  num_buckets, capacity = table.shape
  num_neurons = is_updated.shape[0]
  real = ids_sorted < num_neurons
  stored = table.reshape(-1)
  stored_ok = (stored >= 0) & ~is_updated[jnp.maximum(stored, 0)]
  stored_bucket = jnp.where(stored_ok,
                            jnp.arange(stored.shape[0], dtype=jnp.int32) // capacity,
                            num_buckets)
  new_bucket = jnp.where(real, new_codes_t, num_buckets)
  bucket = jnp.concatenate([stored_bucket, new_bucket])
  ids = jnp.concatenate([stored, ids_sorted])
  if reservoir:
    order = priorities[:bucket.shape[0]].astype(jnp.int32) & jnp.int32(0x7FFFFFFF)
  else:
    order = jnp.arange(bucket.shape[0], dtype=jnp.int32)   # old slots first, then new by id
  bucket_sorted, _, ids_s = jax.lax.sort((bucket, order, ids), num_keys=2)
  totals = _bincount(bucket, jnp.ones_like(bucket), num_buckets)
  new_table = _place(bucket_sorted, ids_s, totals, num_buckets, capacity, not reservoir)
  ones = real.astype(jnp.int32)
  counts_t = (counts_t - _bincount(jnp.where(real, old_codes_t, num_buckets), ones, num_buckets)
              + _bincount(new_bucket, ones, num_buckets))
  return new_table, counts_t


def _update_jax(tables, neuron_ids, new_codes, reservoir, key):
  n = tables.num_neurons
  ids_sorted, source = _dedupe_ids(neuron_ids, n)
  real = ids_sorted < n
  new_sorted = new_codes[source]                                     # [r, l]
  old_sorted = tables.neuron_codes[jnp.minimum(ids_sorted, n - 1)].astype(jnp.int32)
  is_updated = jnp.zeros((n,), bool).at[ids_sorted].set(True, mode="drop")
  entries = tables.buckets.shape[1] * tables.buckets.shape[2] + ids_sorted.shape[0]
  priorities = jax.random.bits(key, (tables.num_tables, entries), jnp.uint32)
  update = jax.vmap(
      lambda tb, ct, oc, nc, pr: _update_table_jax(tb, ct, oc, nc, ids_sorted, is_updated, pr,
                                                   reservoir))
  buckets, counts = update(tables.buckets, tables.counts, old_sorted.T, new_sorted.T,
                           priorities)
  codes = tables.neuron_codes.at[jnp.where(real, ids_sorted, n)].set(
      new_sorted.astype(tables.neuron_codes.dtype), mode="drop")
  return LSHTables(buckets, counts, codes)


def _touched_rows(old_codes, new_codes, valid, num_buckets):
  """The buckets an update edits, as rows of a gathered ``[T, capacity]`` block.

  Args:
    old_codes, new_codes: int32 ``[r, l]``; valid: bool ``[r]`` rows that are not padding.
  Returns:
    keys int32 ``[T = 2 r l]``: sorted unique ``table * num_buckets + bucket``, padded with
    ``l * num_buckets``; old_rows, new_rows int32 ``[r, l]``: each code's index in keys
    (rows that are padding: unspecified, never read).
  """
  r, num_tables = old_codes.shape
  sentinel = num_tables * num_buckets
  base = jnp.arange(num_tables, dtype=jnp.int32) * num_buckets
  coords = jnp.concatenate([old_codes + base, new_codes + base])          # [2r, l]
  coords = jnp.where(jnp.concatenate([valid, valid])[:, None], coords, sentinel).reshape(-1)
  if sentinel <= MARKS_RATIO * coords.shape[0]:     # padding's index is never read
    keys, index = unique_by_marks(coords, coords.shape[0], sentinel)
  else:
    keys, index = unique_with_inverse(coords, coords.shape[0], sentinel)
  index = index.reshape(2 * r, num_tables)
  return keys, index[:r], index[r:]


# Gathering a padded ``2 r l``-row block costs more per row than passing whole tables, and
# once it is this large a fraction of the tables nearly every bucket is touched anyway.
_WHOLE_TABLES_FRACTION = 1.0


def _whole_tables(r, num_buckets):
  """Whether an update of ``r`` ids passes whole tables instead of gathered rows."""
  return 2 * r >= _WHOLE_TABLES_FRACTION * num_buckets


def _update_host(tables, neuron_ids, new_codes, reservoir, key):
  """Host update of the touched bucket rows only, scattered back (in place when donated).

  Gathers the ``T = 2 r l`` possibly touched rows (or, once ``2 r`` reaches ``num_buckets``
  and nearly all are touched, passes whole tables), so the host traffic is
  ``O(min(r l, l num_buckets) * capacity + r l)`` and never includes ``neuron_codes``.
  """
  n, num_tables = tables.neuron_codes.shape
  num_buckets, capacity = tables.num_buckets, tables.bucket_capacity
  total = num_tables * num_buckets
  valid = (neuron_ids >= 0) & (neuron_ids < n)
  old_codes = tables.neuron_codes[jnp.where(valid, neuron_ids, 0)].astype(jnp.int32)  # [r, l]
  whole = _whole_tables(neuron_ids.shape[0], num_buckets)
  if whole:                                         # row = table * num_buckets + bucket
    base = jnp.arange(num_tables, dtype=jnp.int32) * num_buckets
    old_rows, new_rows = old_codes + base, new_codes + base
    rows, cnts = tables.buckets.reshape(total, capacity), tables.counts.reshape(total)
  else:
    keys, old_rows, new_rows = _touched_rows(old_codes, new_codes, valid, num_buckets)
    t, b = keys // num_buckets, keys % num_buckets                 # padding: t = l
    rows = tables.buckets[jnp.minimum(t, num_tables - 1), b]       # [T, capacity]
    cnts = tables.counts[jnp.minimum(t, num_tables - 1), b]        # [T]
  rows, cnts, codes = _host.update_rows(rows, cnts, old_rows, new_rows, neuron_ids, new_codes,
                                        num_neurons=n, reservoir=reservoir, key=key)
  if whole:
    buckets, counts = rows.reshape(tables.buckets.shape), cnts.reshape(tables.counts.shape)
  else:
    buckets = tables.buckets.at[t, b].set(rows, mode="drop")
    counts = tables.counts.at[t, b].set(cnts, mode="drop")
  # Repeated ids get their first row from the host, so the scatter is deterministic.
  neuron_codes = tables.neuron_codes.at[jnp.where(valid, neuron_ids, n)].set(
      codes.astype(tables.neuron_codes.dtype), mode="drop")
  return LSHTables(buckets, counts, neuron_codes)


def update_tables(tables: LSHTables, neuron_ids: jax.Array, new_codes: jax.Array, *,
                  key: jax.Array | None = None, insertion: str = "fifo",
                  backend: str | None = None) -> LSHTables:
  """Re-inserts only ``neuron_ids`` int32 ``[r]`` with ``new_codes`` int32 ``[r, l]``.

  Each neuron's old entries (found through ``tables.neuron_codes``) are removed, the buckets
  are compacted (order kept), and the neurons are appended in id order as the newest
  entries (FIFO evicts the oldest; reservoir keeps a random subset). Ids that are negative or
  ``>= n`` are padding; a repeated id uses its first row. Host cost: only the touched bucket
  rows (``2 * r * l`` rows, deduplicated in XLA) and the ``r`` ids' codes cross to the host,
  and the edited rows are scattered back (in place when the caller donates ``tables``):
  ``O(r * l * capacity)`` plus a small dedupe. Once ``2 * r`` reaches the buckets per table
  nearly every bucket is touched and whole tables (never ``neuron_codes``) are passed.
  The JAX twin re-sorts every table (``O(num_buckets * capacity + r)`` per table).

  After an update, ``counts`` and ``neuron_codes`` equal those of a full rebuild, and every
  bucket whose count stays ``<= bucket_capacity`` holds the same ids as a full FIFO rebuild
  (as a set; order within a bucket may differ). Ids that overflowed a bucket before are not
  brought back by removals.
  """
  reservoir = _check_insertion(insertion)
  if tables.neuron_codes.shape[1] != tables.num_tables:
    raise ValueError("update_tables needs each neuron's current codes, but these tables were "
                     "built without them (keep_codes=False; SlideDense(track_codes=True) "
                     "keeps them)")
  neuron_ids = neuron_ids.astype(jnp.int32)
  new_codes = new_codes.astype(jnp.int32)
  key = _default_key(key)
  if resolve_backend(backend) == "host":
    if tables.num_tables * tables.num_buckets >= 2**31 - 1:   # packed keys overflow int32
      return LSHTables(*_host.update_tables(tables.buckets, tables.counts,
                                            tables.neuron_codes, neuron_ids, new_codes,
                                            reservoir=reservoir, key=key))
    return _update_host(tables, neuron_ids, new_codes, reservoir, key)
  return _update_jax(tables, neuron_ids, new_codes, reservoir, key)


def table_stats(tables: LSHTables) -> dict[str, jax.Array]:
  """Occupancy statistics (jax scalars; ``float()`` them for reports).

  Keys: ``stored`` ids in buckets, ``offered`` (neurons x tables), ``overflow`` (offered but
  not stored), ``occupancy`` (stored / slots), ``empty_buckets`` (fraction with no id),
  ``full_buckets`` (fraction at capacity), ``max_count`` (largest bucket population).
  """
  stored_per_bucket = jnp.sum(tables.buckets >= 0, axis=-1, dtype=jnp.int32)
  stored = jnp.sum(stored_per_bucket, dtype=jnp.int32)
  offered = jnp.sum(tables.counts, dtype=jnp.int32)
  slots = tables.buckets.size
  return {
      "stored": stored,
      "offered": offered,
      "overflow": offered - stored,
      "occupancy": stored.astype(jnp.float32) / jnp.float32(slots),
      "empty_buckets": jnp.mean(stored_per_bucket == 0, dtype=jnp.float32),
      "full_buckets": jnp.mean(stored_per_bucket == tables.bucket_capacity, dtype=jnp.float32),
      "max_count": jnp.max(tables.counts),
  }
