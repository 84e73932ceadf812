"""Numba kernels that turn LSH bucket lookups into fixed-size active sets.

Policies (``POLICY_*``): vanilla (a random subset of the candidate union), topk (candidates
found in the most tables first, ties random), threshold (only candidates found in at least
``threshold`` tables, random among them), sample_topk (batch-shared: each sample ranks its
own candidates by its own table hits and the batch takes them round-robin, rank by rank;
per-sample it is topk). Forced ids always come first; a ``uniform_share`` of the room left
after them is kept for uniform random ids, the rest goes to candidates, and any room still
left is filled with random ids not yet chosen. Slots past ``num_neurons`` hold id ``num_neurons``
and are invalid. Randomness comes from ``seeds uint64`` arrays drawn by the caller.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from hostops import _codes
from hostops import _neighbours
from hostops import _tables
from hostops._tables import random_below

POLICY_VANILLA = 0
POLICY_TOPK = 1
POLICY_THRESHOLD = 2
POLICY_SAMPLE_TOPK = 3
POLICIES = {"vanilla": POLICY_VANILLA, "topk": POLICY_TOPK, "threshold": POLICY_THRESHOLD,
            "sample_topk": POLICY_SAMPLE_TOPK}

_UNSEEN = -1


@nb.njit(cache=True)
def _gather_candidates(rows, num_neurons, seen, cand, hits, num_cand, offset):
  """Adds the ids of one sample's bucket rows ``[l, capacity]`` to ``cand``.

  Marks seen[id] = offset + candidate index.
  """
  num_tables, capacity = rows.shape
  for t in range(num_tables):
    for s in range(capacity):
      v = rows[t, s]
      if v < 0:
        break
      if v >= num_neurons:
        continue
      mark = seen[v]
      if mark == _UNSEEN:
        seen[v] = offset + num_cand
        cand[num_cand] = v
        hits[num_cand] = 1
        num_cand += 1
      elif mark >= offset:
        hits[mark - offset] += 1
  return num_cand


@nb.njit(cache=True)
def _rank_candidates(cand, hits, num_cand, policy, threshold, max_hits, seed, counter):
  """Orders cand[:num_cand] by the policy (best first); returns how many are eligible."""
  for i in range(num_cand - 1, 0, -1):       # random order (ties of topk are random)
    j = random_below(seed, counter + i, i + 1)
    cand[i], cand[j] = cand[j], cand[i]
    hits[i], hits[j] = hits[j], hits[i]
  if policy == POLICY_VANILLA:
    return num_cand
  if policy == POLICY_SAMPLE_TOPK:
    policy = POLICY_TOPK
  if policy == POLICY_THRESHOLD:
    kept = 0                                 # partition: eligible ones first
    for i in range(num_cand):
      if hits[i] >= threshold:
        cand[kept], cand[i] = cand[i], cand[kept]
        hits[kept], hits[i] = hits[i], hits[kept]
        kept += 1
    return kept
  # topk: stable counting sort by hits, descending
  start = np.zeros(max_hits + 2, np.int64)
  for i in range(num_cand):
    start[max_hits - min(hits[i], max_hits) + 1] += 1
  for h in range(1, max_hits + 2):
    start[h] += start[h - 1]
  ordered = np.empty(num_cand, cand.dtype)
  for i in range(num_cand):
    h = max_hits - min(hits[i], max_hits)
    ordered[start[h]] = cand[i]
    start[h] += 1
  cand[:num_cand] = ordered
  return num_cand


@nb.njit(cache=True)
def _fill_random(out, filled, size, num_neurons, seen, mark, seed, counter):
  """Fills out[filled:size] with distinct random ids in [0, num_neurons) not yet seen."""
  tries = 0
  while filled < size and tries < 4 * size + 64:
    v = random_below(seed, counter + tries, num_neurons)
    tries += 1
    if seen[v] == _UNSEEN:
      seen[v] = mark
      out[filled] = v
      filled += 1
  if filled < size:                          # dense case: scan from a random start
    start = random_below(seed, counter + tries, num_neurons)
    for q in range(num_neurons):
      if filled >= size:
        break
      v = (start + q) % num_neurons
      if seen[v] == _UNSEEN:
        seen[v] = mark
        out[filled] = v
        filled += 1
  return filled


@nb.njit(cache=True)
def _candidate_room(size, filled, uniform_share):
  """Slots left for candidates after ``filled`` forced ids, keeping ``uniform_share`` of the
  rest for uniform random ids."""
  room = size - filled
  return room - int(room * uniform_share + 0.5)


@nb.njit(cache=True)
def _select_row(rows, forced_row, preferred, num_neurons, num_active, policy, threshold,
                uniform_share, seed, seen, cand, hits, ids_out, valid_out, slots_out):
  """One sample's active set; resets ``seen`` before returning. Returns the slot where the
  random fill starts (forced, preferred ids and candidates come before it)."""
  num_tables = rows.shape[0]
  size = min(num_active, num_neurons)
  filled = 0
  for j in range(forced_row.shape[0]):
    v = forced_row[j]
    if v < 0 or v >= num_neurons:
      slots_out[j] = -1
    elif seen[v] != _UNSEEN:
      slots_out[j] = seen[v]
    else:
      seen[v] = filled
      ids_out[filled] = v
      slots_out[j] = filled
      filled += 1
  for j in range(preferred.shape[0]):        # preferred ids (in order) while room is left
    if filled >= size:
      break
    v = preferred[j]
    if 0 <= v < num_neurons and seen[v] == _UNSEEN:
      seen[v] = filled
      ids_out[filled] = v
      filled += 1
  limit = filled + _candidate_room(size, filled, uniform_share)
  num_cand = _gather_candidates(rows, num_neurons, seen, cand, hits, 0, num_active)
  eligible = _rank_candidates(cand, hits, num_cand, policy, threshold, num_tables, seed,
                              np.uint64(0))
  take = min(eligible, limit - filled)
  for q in range(take):
    ids_out[filled + q] = cand[q]
  for q in range(take, num_cand):            # candidates not taken may be random fill
    seen[cand[q]] = _UNSEEN
  filled += take
  fixed = filled
  filled = _fill_random(ids_out, filled, size, num_neurons, seen, num_active, seed,
                        np.uint64(1 << 40))
  for q in range(filled):
    valid_out[q] = True
    seen[ids_out[q]] = _UNSEEN
  for q in range(num_cand):
    seen[cand[q]] = _UNSEEN
  for q in range(filled, num_active):
    ids_out[q] = num_neurons
    valid_out[q] = False
  return fixed


@nb.njit(cache=True, parallel=True)
def select_per_sample(bucket_rows, forced, preferred, num_neurons, num_active, policy,
                      threshold, uniform_share, seeds, num_chunks):
  """Per-sample active sets.

  Args:
    bucket_rows: int32[B, l, capacity], the bucket of each sample in each table (gathered
      by the caller, so only these rows cross to the host); forced: int32[B, f].
    preferred: int32[P] ids every row takes after its forced ones, in order, while room is
      left (-1: none; e.g. the batch's labels as in-batch negatives).
    uniform_share: float share of the slots left after forced and preferred ids that is kept
      for uniform random ids.
    seeds: uint64[B]; num_chunks: rows are split into this many parallel chunks (threads).
  Returns:
    ids int32[B, num_active], valid bool[B, num_active], forced_slots int32[B, f],
    num_fixed int32[B] (the slot where each row's random fill starts).
  """
  batch, num_tables, capacity = bucket_rows.shape
  ids = np.empty((batch, num_active), np.int32)
  valid = np.zeros((batch, num_active), np.bool_)
  slots = np.empty((batch, forced.shape[1]), np.int32)
  fixed = np.empty(batch, np.int32)
  num_chunks = max(1, min(batch, num_chunks))
  for c in nb.prange(num_chunks):
    seen = np.full(num_neurons + 1, _UNSEEN, np.int64)
    cand = np.empty(num_tables * capacity, np.int32)
    hits = np.empty(num_tables * capacity, np.int32)
    for b in range(c, batch, num_chunks):
      fixed[b] = _select_row(bucket_rows[b], forced[b], preferred, num_neurons, num_active,
                             policy, threshold, uniform_share, seeds[b], seen, cand, hits,
                             ids[b], valid[b], slots[b])
  return ids, valid, slots, fixed


@nb.njit(cache=True)
def select_shared(bucket_rows, forced, num_neurons, num_active, policy, threshold,
                  uniform_share, seed):
  """One active set for the whole batch.

  Distinct forced ids come first (a random subset of them if they exceed ``num_active``),
  then candidates from the union of all samples' buckets ranked by (sample, table) hits for
  topk, then random fill.

  Returns:
    ids int32[M], valid bool[M], forced_slots int32[B, f] (-1: padding or dropped),
    forced_dropped int32[] (valid forced entries that got no slot), num_fixed int32[] (the
    slot where the random fill starts).
  """
  batch, num_tables, capacity = bucket_rows.shape
  size = min(num_active, num_neurons)
  seen = np.full(num_neurons + 1, _UNSEEN, np.int64)
  ids = np.empty(num_active, np.int32)
  valid = np.zeros(num_active, np.bool_)
  slots = np.full(forced.shape, -1, np.int32)
  # distinct forced ids, in random order
  flat = forced.ravel()
  distinct = np.empty(flat.shape[0], np.int32)
  num_forced = 0
  for q in range(flat.shape[0]):
    v = flat[q]
    if 0 <= v < num_neurons and seen[v] == _UNSEEN:
      seen[v] = 0
      distinct[num_forced] = v
      num_forced += 1
  for i in range(num_forced - 1, 0, -1):
    j = random_below(seed, np.uint64(1 << 50) + np.uint64(i), i + 1)
    distinct[i], distinct[j] = distinct[j], distinct[i]
  filled = min(num_forced, size)
  for q in range(num_forced):
    seen[distinct[q]] = q if q < filled else num_active   # dropped: never re-enters
  ids[:filled] = distinct[:filled]
  dropped = 0
  for b in range(forced.shape[0]):
    for j in range(forced.shape[1]):
      v = forced[b, j]
      if 0 <= v < num_neurons:
        mark = seen[v]
        if 0 <= mark < filled and ids[mark] == v:
          slots[b, j] = mark
        else:
          dropped += 1
  room = _candidate_room(size, filled, uniform_share)
  if policy == POLICY_SAMPLE_TOPK:
    cand, num_cand = _merge_sample_rankings(bucket_rows, num_neurons, seen, seed)
    eligible = num_cand
  else:
    # candidates: union of all samples' buckets (offset keeps them apart from forced marks)
    offset = num_active + 1
    cand = np.empty(batch * num_tables * capacity, np.int32)
    hits = np.empty(batch * num_tables * capacity, np.int32)
    num_cand = 0
    for b in range(batch):
      num_cand = _gather_candidates(bucket_rows[b], num_neurons, seen, cand, hits, num_cand,
                                    offset)
    eligible = _rank_candidates(cand, hits, num_cand, policy, threshold, batch * num_tables,
                                seed, np.uint64(0))
  take = min(eligible, room)
  ids[filled:filled + take] = cand[:take]
  for q in range(take):
    seen[cand[q]] = filled + q
  for q in range(take, num_cand):            # candidates not taken may be random fill
    seen[cand[q]] = _UNSEEN
  filled += take
  fixed = filled
  filled = _fill_random(ids, filled, size, num_neurons, seen, num_active, seed,
                        np.uint64(1 << 40))
  valid[:filled] = True
  ids[filled:] = num_neurons
  return ids, valid, slots, np.int32(dropped), np.int32(fixed)


@nb.njit(cache=True)
def _merge_sample_rankings(bucket_rows, num_neurons, seen, seed):
  """Each sample's candidates ranked by its own table hits (ties random), merged rank by
  rank over the samples (in a random sample order): ``(ids, count)``, distinct, best first,
  none already marked in ``seen`` (which this leaves unchanged)."""
  batch, num_tables, capacity = bucket_rows.shape
  width = num_tables * capacity
  ranked = np.empty((batch, width), np.int32)
  lengths = np.zeros(batch, np.int64)
  local = np.full(num_neurons + 1, _UNSEEN, np.int64)
  hits = np.empty(width, np.int32)
  for b in range(batch):
    n = _gather_candidates(bucket_rows[b], num_neurons, local, ranked[b], hits, 0, 0)
    _rank_candidates(ranked[b], hits, n, POLICY_TOPK, 0, num_tables, seed,
                     np.uint64(b) * np.uint64(width))
    for q in range(n):
      local[ranked[b, q]] = _UNSEEN
    lengths[b] = n
  order = np.arange(batch)
  for i in range(batch - 1, 0, -1):
    j = random_below(seed, np.uint64(1 << 52) + np.uint64(i), i + 1)
    order[i], order[j] = order[j], order[i]
  out = np.empty(batch * width, np.int32)
  count = 0
  longest = lengths.max() if batch else 0
  for r in range(longest):
    for b in order:
      if r < lengths[b]:
        v = ranked[b, r]
        if seen[v] == _UNSEEN and local[v] == _UNSEEN:
          local[v] = 0
          out[count] = v
          count += 1
  return out, count


def warmup_lsh_kernels() -> None:
  """Compiles the table, selection and neighbour kernels on tiny inputs (cached on disk by
  Numba)."""
  rows = np.full((2, 2, 3), -1, np.int32)
  rows[:, :, 0] = 1
  forced = np.array([[0, -1], [2, 2]], np.int32)
  seeds = np.zeros(2, np.uint64)
  # writable arrays, and read-only ones as np.asarray of a jax.Array passes them to a
  # callback: each is its own Numba signature, compiled on first use (seconds, cold cache)
  frozen_rows, frozen_forced = rows.copy(), forced.copy()
  frozen_rows.setflags(write=False)
  frozen_forced.setflags(write=False)
  for policy in POLICIES.values():
    for r, f in ((rows, forced), (frozen_rows, frozen_forced)):
      select_per_sample(r, f, f[0], 5, 3, policy, 2, 0.0, seeds, 2)
      select_shared(r, f, 5, 3, policy, 2, 0.0, np.uint64(0))
  _tables.warmup()
  _codes.warmup()
  _neighbours.warmup()
