"""Queries: LSH bucket lookups turned into fixed-size active sets (host Numba or pure JAX).

Contract (both backends): every row of ``ids`` holds exactly ``num_active`` unique ids in
``[0, num_neurons)``; forced ids come first and are always present (per-sample); candidates
are the ids stored in the buckets the sample falls in, chosen by ``policy``:

  * ``vanilla``: a random subset of the candidate union;
  * ``topk``: candidates found in the most tables (shared: most (sample, table) hits) first,
    ties broken at random;
  * ``threshold``: only candidates found in at least ``threshold`` tables (random order).

Room left is filled with random ids not already chosen. When ``num_active > num_neurons``
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

POLICIES = ("vanilla", "topk", "threshold")
_FORCED_SCORE = 1e5   # above any candidate score (hits <= B * l)
_CAND_SCORE = 2.0


class ActiveSet(NamedTuple):
  """Per-sample active sets.

  Attributes:
    ids: int32 ``[B, m]`` unique per row; padding slots hold ``num_neurons``.
    valid: bool ``[B, m]``.
    forced_slots: int32 ``[B, f]`` position of each forced id in its row (-1: padding id).
  """
  ids: jax.Array
  valid: jax.Array
  forced_slots: jax.Array


class SharedActiveSet(NamedTuple):
  """One active set for a whole batch.

  Attributes:
    ids: int32 ``[M]`` unique; padding slots hold ``num_neurons``.
    valid: bool ``[M]``.
    forced_slots: int32 ``[B, f]`` position of each forced id in ``ids`` (-1: padding or
      dropped because the distinct forced ids exceeded ``M``).
    forced_dropped: int32 ``[]`` valid forced entries left without a slot.
  """
  ids: jax.Array
  valid: jax.Array
  forced_slots: jax.Array
  forced_dropped: jax.Array


def _check_args(tables, codes, num_active, num_neurons, policy, forced_ids, per_sample):
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  if num_active < 1 or num_neurons < 1:
    raise ValueError(f"num_active and num_neurons must be positive, got {num_active}, "
                     f"{num_neurons}")
  if codes.ndim != 2 or codes.shape[1] != tables.num_tables:
    raise ValueError(f"codes must be [B, l={tables.num_tables}], got {codes.shape}")
  batch = codes.shape[0]
  if forced_ids is None:
    return jnp.full((batch, 0), -1, jnp.int32)
  if forced_ids.ndim != 2 or forced_ids.shape[0] != batch:
    raise ValueError(f"forced_ids must be [B={batch}, f], got {forced_ids.shape}")
  if per_sample and forced_ids.shape[1] > num_active:
    raise ValueError(f"query: {forced_ids.shape[1]} forced ids per row do not fit into "
                     f"num_active={num_active} slots; raise num_active or pass fewer")
  return forced_ids.astype(jnp.int32)


def _bucket_ids(buckets, codes, num_neurons):
  """int32 ``[B, l * capacity]`` ids in each sample's buckets (``num_neurons`` = none)."""
  tables = jnp.arange(buckets.shape[0])[None, :]
  ids = buckets[tables, codes].reshape(codes.shape[0], -1)
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


def _select_jax(forced, cand, fill, key, size, num_neurons, policy, threshold):
  """Picks ``size`` distinct ids from proposals (1-D arrays; ``num_neurons`` = none).

  Returns (ids int32 ``[size]``, valid bool ``[size]``).
  """
  ids = jnp.concatenate([forced, cand, fill])
  kind = jnp.concatenate([jnp.zeros(forced.shape, jnp.int32), jnp.ones(cand.shape, jnp.int32),
                          jnp.full(fill.shape, 2, jnp.int32)])
  ids, kind = jax.lax.sort((ids, kind), num_keys=2)
  first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
  run = jnp.cumsum(first.astype(jnp.int32)) - 1
  hits = jnp.zeros(ids.shape, jnp.int32).at[run].add((kind == 1).astype(jnp.int32))[run]
  noise = jax.random.uniform(key, ids.shape, jnp.float32)
  if policy == "topk":
    cand_score = _CAND_SCORE + hits.astype(jnp.float32) + noise
  elif policy == "threshold":
    cand_score = jnp.where(hits >= threshold, _CAND_SCORE + noise, noise)
  else:
    cand_score = _CAND_SCORE + noise
  score = jnp.where(kind == 1, cand_score, noise)
  score = jnp.where(kind == 0, _FORCED_SCORE * (1.0 + noise), score)
  score = jnp.where(first & (ids < num_neurons), score, -jnp.inf)
  top_score, pos = jax.lax.top_k(score, size)
  return ids[pos], top_score > -jnp.inf


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


def _query_jax(tables, codes, forced, num_active, num_neurons, policy, threshold, key):
  size = min(num_active, num_neurons)
  cand = _bucket_ids(tables.buckets, codes, num_neurons)
  forced_ok = jnp.where((forced >= 0) & (forced < num_neurons), forced, num_neurons)
  keys = jax.random.split(key, codes.shape[0])

  def row(forced_row, cand_row, row_key):
    k_fill, k_rank = jax.random.split(row_key)
    fill = _fill_ids(k_fill, size, num_neurons)
    return _select_jax(forced_row, cand_row, fill, k_rank, size, num_neurons, policy,
                       threshold)

  ids, valid = jax.vmap(row)(forced_ok, cand, keys)
  ids, valid = _pad_slots(ids, valid, num_active, num_neurons)
  slots = jax.vmap(_slots_of, in_axes=(0, 0, 0, None))(ids, valid, forced, num_neurons)
  return ActiveSet(ids, valid, slots)


def query(tables: LSHTables, codes: jax.Array, *, num_active: int, num_neurons: int,
          key: jax.Array, policy: str = "vanilla", threshold: int = 2,
          forced_ids: jax.Array | None = None, backend: str | None = None) -> ActiveSet:
  """Per-sample active sets of ``num_active`` ids for codes int32 ``[B, l]``.

  ``forced_ids`` int32 ``[B, f]`` (-1 padding) are always included (a repeated forced id
  takes one slot; both ``forced_slots`` point to it); ``f > num_active`` raises ValueError.
  """
  forced = _check_args(tables, codes, num_active, num_neurons, policy, forced_ids, True)
  codes = codes.astype(jnp.int32)
  if resolve_backend(backend) == "host":
    ids, valid, slots = _host.select_per_sample(
        tables.buckets, codes, forced, num_neurons=num_neurons, num_active=num_active,
        policy=policy, threshold=threshold, key=key)
    return ActiveSet(ids, valid, slots)
  return _query_jax(tables, codes, forced, num_active, num_neurons, policy, threshold, key)


def _query_shared_jax(tables, codes, forced, num_active, num_neurons, policy, threshold, key):
  size = min(num_active, num_neurons)
  k_fill, k_rank = jax.random.split(key)
  cand = _bucket_ids(tables.buckets, codes, num_neurons).reshape(-1)
  forced_ok = jnp.where((forced >= 0) & (forced < num_neurons), forced, num_neurons)
  fill = _fill_ids(k_fill, size, num_neurons)
  ids, valid = _select_jax(forced_ok.reshape(-1), cand, fill, k_rank, size, num_neurons,
                           policy, threshold)
  ids, valid = _pad_slots(ids, valid, num_active, num_neurons)
  # slots by binary search over the sorted selection
  sorted_ids, order = jax.lax.sort((ids, jnp.arange(num_active, dtype=jnp.int32)), num_keys=1)
  at = jnp.clip(jnp.searchsorted(sorted_ids, forced_ok), 0, num_active - 1)
  found = (sorted_ids[at] == forced_ok) & (forced_ok < num_neurons)
  slots = jnp.where(found, order[at], -1).astype(jnp.int32)
  dropped = jnp.sum((forced_ok < num_neurons) & ~found, dtype=jnp.int32)
  return SharedActiveSet(ids, valid, slots, dropped)


def query_shared(tables: LSHTables, codes: jax.Array, *, num_active: int, num_neurons: int,
                 key: jax.Array, policy: str = "vanilla", threshold: int = 2,
                 forced_ids: jax.Array | None = None,
                 backend: str | None = None) -> SharedActiveSet:
  """One active set of ``num_active`` ids for the batch of codes int32 ``[B, l]``.

  All distinct forced ids come first; if they exceed ``num_active``, a random subset is
  kept, the others get ``forced_slots`` -1 and are counted in ``forced_dropped``.
  """
  forced = _check_args(tables, codes, num_active, num_neurons, policy, forced_ids, False)
  codes = codes.astype(jnp.int32)
  if resolve_backend(backend) == "host":
    return SharedActiveSet(*_host.select_shared(
        tables.buckets, codes, forced, num_neurons=num_neurons, num_active=num_active,
        policy=policy, threshold=threshold, key=key))
  return _query_shared_jax(tables, codes, forced, num_active, num_neurons, policy, threshold,
                           key)
