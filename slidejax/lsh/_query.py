"""Queries: LSH bucket lookups turned into fixed-size active sets (host Numba or pure JAX).

Contract (both backends): every row of ``ids`` holds exactly ``num_active`` unique ids in
``[0, num_neurons)``; forced ids come first and are always present (per-sample); candidates
are the ids stored in the buckets the sample falls in, chosen by ``policy``:

  * ``vanilla``: a random subset of the candidate union;
  * ``topk``: candidates found in the most tables (shared: most (sample, table) hits) first,
    ties broken at random;
  * ``threshold``: only candidates found in at least ``threshold`` tables (random order);
  * ``sample_topk`` (batch-shared; per-sample it is ``topk``): each sample ranks its own
    candidates by its own table hits; the batch takes them rank by rank over the samples.

``uniform_share`` of the slots left after the forced (and preferred) ids is kept for uniform
random ids (a mixture of LSH and uniform negatives); room left is filled with random ids not already chosen.

``select``/``select_shared`` take the candidates directly (int32 ``[B, l, c]``, -1 none):
:func:`query` and :func:`query_shared` pass each sample's buckets, samplers without hashing
pass their draws. When ``num_active > num_neurons``
the extra slots hold the out-of-range id ``num_neurons`` with ``valid=False``.

The JAX twin dedupes by sorting and ranks with ``lax.top_k`` (fast on accelerators, slow on
CPU); its random fill is random draws backed by a random affine progression ``(start + j *
stride) mod n`` (``stride`` coprime to ``n``) that guarantees enough distinct ids.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from slidejax.lsh import _host
from slidejax.lsh._tables import LSHTables
from slidejax.lsh._tables import resolve_backend

POLICIES = ("vanilla", "topk", "threshold", "sample_topk")
_FORCED_SCORE = 1e9   # above any preferred score
_PREFERRED_SCORE = 1e8   # above any candidate score (hits <= B * l)
_CAND_SCORE = 2.0
_FORCED, _PREFERRED, _CANDIDATE, _FILL = 0, 1, 2, 3   # proposal kinds, in priority order


class ActiveSet(NamedTuple):
  """Per-sample active sets.

  Attributes:
    ids: int32 ``[B, m]`` unique per row; padding slots hold ``num_neurons``.
    valid: bool ``[B, m]``.
    forced_slots: int32 ``[B, f]`` position of each forced id in its row (-1: padding id).
    num_fixed: int32 ``[B]``: slots before it hold forced ids and candidates, the valid
      slots from it on uniformly random ids (the random fill).
  """
  ids: jax.Array
  valid: jax.Array
  forced_slots: jax.Array
  num_fixed: jax.Array


class SharedActiveSet(NamedTuple):
  """One active set for a whole batch.

  Attributes:
    ids: int32 ``[M]`` unique; padding slots hold ``num_neurons``.
    valid: bool ``[M]``.
    forced_slots: int32 ``[B, f]`` position of each forced id in ``ids`` (-1: padding or
      dropped because the distinct forced ids exceeded ``M``).
    forced_dropped: int32 ``[]`` valid forced entries left without a slot.
    num_fixed: int32 ``[]``: as in :class:`ActiveSet`.
  """
  ids: jax.Array
  valid: jax.Array
  forced_slots: jax.Array
  forced_dropped: jax.Array
  num_fixed: jax.Array


def _check_args(candidates, num_active, num_neurons, policy, forced_ids, per_sample,
                uniform_share, batch):
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  if num_active < 1 or num_neurons < 1:
    raise ValueError(f"num_active and num_neurons must be positive, got {num_active}, "
                     f"{num_neurons}")
  if not 0.0 <= uniform_share <= 1.0:
    raise ValueError(f"uniform_share must be in [0, 1], got {uniform_share}")
  if candidates.ndim != 3 or (per_sample and candidates.shape[0] != batch):
    raise ValueError(f"candidates must be [B{'=' + str(batch) if per_sample else ''}, l, c], "
                     f"got {candidates.shape}")
  if forced_ids is None:
    return jnp.full((batch, 0), -1, jnp.int32)
  if forced_ids.ndim != 2 or forced_ids.shape[0] != batch:
    raise ValueError(f"forced_ids must be [B={batch}, f], got {forced_ids.shape}")
  if per_sample and forced_ids.shape[1] > num_active:
    raise ValueError(f"query: {forced_ids.shape[1]} forced ids per row do not fit into "
                     f"num_active={num_active} slots; raise num_active or pass fewer")
  return forced_ids.astype(jnp.int32)


def _candidate_ids(candidates, num_neurons):
  """int32 ``[B, l * c]`` candidate ids (``num_neurons`` = none)."""
  ids = candidates.reshape(candidates.shape[0], -1)
  return jnp.where((ids >= 0) & (ids < num_neurons), ids, num_neurons)


@functools.lru_cache(maxsize=64)
def _strides(num_neurons: int) -> tuple[int, ...]:
  """Primes coprime to ``num_neurons`` small enough that ``j * stride`` fits in int32."""
  limit = min((2**31 - 1) // max(num_neurons, 1), 4096)
  primes = [p for p in range(2, limit + 1) if all(p % q for q in range(2, int(p**0.5) + 1))]
  return (1,) + tuple(p for p in primes if num_neurons % p)


def _fill_ids(key, size, num_neurons):
  """int32 ``[2 * size]``: ``size`` random draws, then ``size`` distinct affine ids."""
  k_draw, k_start, k_stride = jax.random.split(key, 3)
  draws = jax.random.randint(k_draw, (size,), 0, num_neurons, jnp.int32)
  strides = jnp.asarray(_strides(num_neurons), jnp.int32)
  stride = strides[jax.random.randint(k_stride, (), 0, strides.shape[0])]
  start = jax.random.randint(k_start, (), 0, num_neurons, jnp.int32)
  steps = jnp.arange(size, dtype=jnp.int32) * stride % num_neurons
  return jnp.concatenate([draws, (start + steps) % num_neurons])


def _select_jax(forced, cand, fill, key, size, num_neurons, policy, threshold, uniform_share,
                preferred=None):
  """Picks ``size`` distinct ids from proposals (1-D arrays; ``num_neurons`` = none):
  forced, then preferred (random order), then candidates by ``policy``, then fill.

  Returns (ids int32 ``[size]``, valid bool ``[size]``, num_fixed int32: forced, preferred
  ids and candidates come first, random fill from this slot on).
  """
  if preferred is None:
    preferred = jnp.zeros((0,), jnp.int32)
  parts = (forced, preferred, cand, fill)
  ids = jnp.concatenate(parts)
  kind = jnp.concatenate([jnp.full(p.shape, k, jnp.int32) for k, p in enumerate(parts)])
  ids, kind = jax.lax.sort((ids, kind), num_keys=2)
  first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
  run = jnp.cumsum(first.astype(jnp.int32)) - 1
  hits = jnp.zeros(ids.shape, jnp.int32).at[run].add(
      (kind == _CANDIDATE).astype(jnp.int32))[run]
  noise = jax.random.uniform(key, ids.shape, jnp.float32)
  if policy == "topk":
    cand_score = _CAND_SCORE + hits.astype(jnp.float32) + noise
  elif policy == "threshold":
    cand_score = jnp.where(hits >= threshold, _CAND_SCORE + noise, noise)
  else:
    cand_score = _CAND_SCORE + noise
  score = jnp.where(kind == _CANDIDATE, cand_score, noise)
  score = jnp.where(kind == _PREFERRED, _PREFERRED_SCORE * (1.0 + noise), score)
  score = jnp.where(kind == _FORCED, _FORCED_SCORE * (1.0 + noise), score)
  score = jnp.where(first & (ids < num_neurons), score, -jnp.inf)
  if uniform_share > 0.0:   # keep a share of the room for fill: demote the weaker proposals
    is_cand = (kind == _CANDIDATE) & (score >= _CAND_SCORE)
    num_forced = jnp.sum(first & (kind <= _PREFERRED) & (ids < num_neurons))
    room = size - jnp.minimum(num_forced, size)
    budget = room - jnp.floor(room * uniform_share + 0.5).astype(room.dtype)
    best = jax.lax.top_k(jnp.where(is_cand, score, -jnp.inf), size)[0]
    cutoff = jnp.where(budget > 0, best[jnp.clip(budget - 1, 0, size - 1)], jnp.inf)
    # below the random fill: a demoted candidate is taken only as often as a random id
    score = jnp.where(is_cand & (score < cutoff), noise - 1.0, score)
  top_score, pos = jax.lax.top_k(score, size)
  num_fixed = jnp.sum(top_score >= _CAND_SCORE, dtype=jnp.int32)
  return ids[pos], top_score > -jnp.inf, num_fixed


def _pad_slots(ids, valid, num_active, num_neurons):
  pad = num_active - ids.shape[-1]
  if pad == 0:
    return ids, valid
  widths = [(0, 0)] * (ids.ndim - 1) + [(0, pad)]
  return (jnp.pad(ids, widths, constant_values=num_neurons), jnp.pad(valid, widths))


def _slots_of(ids, valid, forced, num_neurons):
  """Position of each forced id in ``ids`` ``[m]`` (-1 when absent or padding)."""
  eq = (forced[..., None] == ids) & valid & (forced[..., None] < num_neurons)
  eq = eq & (forced[..., None] >= 0)
  return jnp.where(jnp.any(eq, axis=-1), jnp.argmax(eq, axis=-1), -1).astype(jnp.int32)


def _valid_or_none(ids, num_neurons):
  return jnp.where((ids >= 0) & (ids < num_neurons), ids, num_neurons)


def _select_per_sample_jax(candidates, forced, preferred, num_active, num_neurons, policy,
                           threshold, uniform_share, key):
  size = min(num_active, num_neurons)
  cand = _candidate_ids(candidates, num_neurons)
  forced_ok = _valid_or_none(forced, num_neurons)
  preferred = _valid_or_none(preferred, num_neurons)
  keys = jax.random.split(key, candidates.shape[0])

  def row(forced_row, cand_row, row_key):
    k_fill, k_rank = jax.random.split(row_key)
    fill = _fill_ids(k_fill, size, num_neurons)
    return _select_jax(forced_row, cand_row, fill, k_rank, size, num_neurons, policy,
                       threshold, uniform_share, preferred)

  ids, valid, fixed = jax.vmap(row)(forced_ok, cand, keys)
  ids, valid = _pad_slots(ids, valid, num_active, num_neurons)
  slots = jax.vmap(_slots_of, in_axes=(0, 0, 0, None))(ids, valid, forced, num_neurons)
  return ActiveSet(ids, valid, slots, fixed)


def query(tables: LSHTables, codes: jax.Array, *, num_active: int, num_neurons: int,
          key: jax.Array, policy: str = "vanilla", threshold: int = 2,
          forced_ids: jax.Array | None = None, backend: str | None = None,
          uniform_share: float = 0.0, preferred_ids: jax.Array | None = None) -> ActiveSet:
  """Per-sample active sets of ``num_active`` ids for codes int32 ``[B, l]``.

  ``forced_ids`` int32 ``[B, f]`` (-1 padding) are always included (a repeated forced id
  takes one slot; both ``forced_slots`` point to it); ``f > num_active`` raises ValueError.
  ``preferred_ids``: see :func:`select`.
  """
  return select(bucket_rows(tables, codes), num_active=num_active, num_neurons=num_neurons,
                key=key, policy=policy, threshold=threshold, forced_ids=forced_ids,
                backend=backend, uniform_share=uniform_share, preferred_ids=preferred_ids)


def bucket_rows(tables: LSHTables, codes: jax.Array) -> jax.Array:
  """int32 ``[B, l, capacity]``: the bucket each sample of codes ``[B, l]`` falls in, per
  table (-1: empty slot)."""
  if codes.ndim != 2 or codes.shape[1] != tables.num_tables:
    raise ValueError(f"codes must be [B, l={tables.num_tables}], got {codes.shape}")
  return _host.bucket_rows(tables.buckets, codes.astype(jnp.int32))


def select(candidates: jax.Array, *, num_active: int, num_neurons: int, key: jax.Array,
           policy: str = "vanilla", threshold: int = 2, forced_ids: jax.Array | None = None,
           backend: str | None = None, uniform_share: float = 0.0,
           preferred_ids: jax.Array | None = None) -> ActiveSet:
  """Per-sample active sets from candidate ids int32 ``[B, l, c]`` (-1: none), as
  :func:`query` (which passes each sample's ``l`` buckets).

  ``preferred_ids`` int32 ``[P]`` (-1 padding) go into every row after its forced ids and
  before its candidates, in random order, as far as room is left (e.g. the batch's labels:
  the in-batch negatives a shared set has by construction); ``uniform_share`` applies to the
  room left after them.
  """
  batch = candidates.shape[0]
  forced = _check_args(candidates, num_active, num_neurons, policy, forced_ids, True,
                       uniform_share, batch)
  candidates = candidates.astype(jnp.int32)
  if preferred_ids is None:
    preferred_ids = jnp.full((0,), -1, jnp.int32)
  elif preferred_ids.ndim != 1:
    raise ValueError(f"preferred_ids must be [P], got {preferred_ids.shape}")
  preferred_key, key = jax.random.split(key)
  preferred = jax.random.permutation(preferred_key, preferred_ids.astype(jnp.int32))
  if resolve_backend(backend) == "host":
    return ActiveSet(*_host.select_per_sample(
        candidates, forced, preferred, num_neurons=num_neurons, num_active=num_active,
        policy=policy, threshold=threshold, uniform_share=uniform_share, key=key))
  return _select_per_sample_jax(candidates, forced, preferred, num_active, num_neurons,
                                "topk" if policy == "sample_topk" else policy, threshold,
                                uniform_share, key)


def _select_shared_jax(candidates, forced, num_active, num_neurons, policy, threshold,
                       uniform_share, key):
  size = min(num_active, num_neurons)
  k_fill, k_rank = jax.random.split(key)
  if policy == "sample_topk":
    cand, policy = _sample_rankings_jax(candidates, num_neurons, size, k_rank), "topk"
  else:
    cand = _candidate_ids(candidates, num_neurons).reshape(-1)
  forced_ok = _valid_or_none(forced, num_neurons)
  fill = _fill_ids(k_fill, size, num_neurons)
  ids, valid, fixed = _select_jax(forced_ok.reshape(-1), cand, fill, k_rank, size,
                                  num_neurons, policy, threshold, uniform_share)
  ids, valid = _pad_slots(ids, valid, num_active, num_neurons)
  # slots by binary search over the sorted selection
  sorted_ids, order = jax.lax.sort((ids, jnp.arange(num_active, dtype=jnp.int32)), num_keys=1)
  at = jnp.clip(jnp.searchsorted(sorted_ids, forced_ok), 0, num_active - 1)
  found = (sorted_ids[at] == forced_ok) & (forced_ok < num_neurons)
  slots = jnp.where(found, order[at], -1).astype(jnp.int32)
  dropped = jnp.sum((forced_ok < num_neurons) & ~found, dtype=jnp.int32)
  return SharedActiveSet(ids, valid, slots, dropped, fixed)


def _sample_rankings_jax(candidates, num_neurons, size, key):
  """``sample_topk``'s proposals: each sample's best ``ceil(size / B)`` candidates by its own
  table hits (ties random), flattened so that a candidate appears once per sample that ranks
  it there: the shared ``topk`` ranking then prefers ids many samples rank high."""
  batch = candidates.shape[0]
  per_sample = -(-size // batch)
  cand = _candidate_ids(candidates, num_neurons)
  none = jnp.full((0,), num_neurons, jnp.int32)

  def best(row, row_key):
    top, _, _ = _select_jax(none, row, none, row_key, min(per_sample, row.shape[0]),
                            num_neurons, "topk", 0, 0.0)
    return top

  return jax.vmap(best)(cand, jax.random.split(key, batch)).reshape(-1)


def query_shared(tables: LSHTables, codes: jax.Array, *, num_active: int, num_neurons: int,
                 key: jax.Array, policy: str = "vanilla", threshold: int = 2,
                 forced_ids: jax.Array | None = None, backend: str | None = None,
                 uniform_share: float = 0.0) -> SharedActiveSet:
  """One active set of ``num_active`` ids for the batch of codes int32 ``[B, l]``.

  All distinct forced ids come first; if they exceed ``num_active``, a random subset is
  kept, the others get ``forced_slots`` -1 and are counted in ``forced_dropped``.
  """
  return select_shared(bucket_rows(tables, codes), num_active=num_active,
                       num_neurons=num_neurons, key=key, policy=policy, threshold=threshold,
                       forced_ids=forced_ids, backend=backend, uniform_share=uniform_share)


def select_shared(candidates: jax.Array, *, num_active: int, num_neurons: int, key: jax.Array,
                  policy: str = "vanilla", threshold: int = 2,
                  forced_ids: jax.Array | None = None, backend: str | None = None,
                  uniform_share: float = 0.0) -> SharedActiveSet:
  """One active set from candidate ids int32 ``[B', l, c]`` (-1: none; ``B'`` need not be
  the batch of ``forced_ids``), as :func:`query_shared`."""
  batch = forced_ids.shape[0] if forced_ids is not None else candidates.shape[0]
  forced = _check_args(candidates, num_active, num_neurons, policy, forced_ids, False,
                       uniform_share, batch)
  candidates = candidates.astype(jnp.int32)
  if resolve_backend(backend) == "host":
    return SharedActiveSet(*_host.select_shared(
        candidates, forced, num_neurons=num_neurons, num_active=num_active, policy=policy,
        threshold=threshold, uniform_share=uniform_share, key=key))
  return _select_shared_jax(candidates, forced, num_active, num_neurons, policy, threshold,
                            uniform_share, key)
