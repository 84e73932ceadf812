"""LSH hash families: SimHash, WTA, densified WTA and densified one-permutation MinHash.

A family is a :class:`HashFamily` (a hashable NamedTuple of static ints) whose methods are
pure JAX functions, jit- and vmap-safe::

  fam = simhash(128, k=9, l=50)
  params = fam.init(key)                    # pytree of arrays (the random hash functions)
  codes = fam.codes(params, x)              # int32[..., l] for dense x float32[..., dim]
  codes = fam.sparse_codes(params, ids, values)   # padded sparse input, padding value 0

Each table's code packs its ``k`` hash values with exactly ``bits_per_hash`` bits each
(``ceil(log2(bin_size))`` for WTA/DWTA, 1 for SimHash). When ``k * bits_per_hash`` exceeds
``range_bits`` the packed code is *folded* into ``range_bits`` bits with a fixed
multiply-shift hash: equal packed codes always fold to equal codes (no collision is lost);
unequal ones additionally collide with probability about ``2**-range_bits``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_DEFAULT_RANGE_BITS = 20
MAX_RANGE_BITS = 30
DENSIFY_ATTEMPTS = 32
_FOLD_MULTIPLIER = 0x9E3779B1  # odd: multiply-shift hashing (Dietzfelbinger et al.)
_MIX_MULTIPLIER = 0x85EBCA77   # odd: combines hash values when the packing exceeds 32 bits


class HashFamily(NamedTuple):
  """A hash family with ``l`` tables of ``k`` hashes each (static; hashable).

  Attributes:
    name: ``simhash`` | ``wta`` | ``dwta`` | ``minhash``.
    dim: input dimension.
    k: hashes per table.
    l: number of tables.
    range_bits: bits of a table code; codes lie in ``[0, 2**range_bits)``.
    bits_per_hash: bits used by one hash value in the packed code.
    bin_size: WTA/DWTA bin size (0 for the others).
    sparsity: SimHash fraction of nonzero +-1 projection entries, ``None`` for Gaussian.
  """
  name: str
  dim: int
  k: int
  l: int
  range_bits: int
  bits_per_hash: int
  bin_size: int = 0
  sparsity: float | None = None

  @property
  def num_hashes(self) -> int:
    return self.k * self.l

  def init(self, key: jax.Array) -> dict[str, jax.Array]:
    """Draws the hash functions: a pytree of arrays."""
    return _INIT[self.name](self, key)

  def codes(self, params: Any, x: jax.Array) -> jax.Array:
    """int32 ``[..., l]`` codes of dense inputs ``x`` float ``[..., dim]``."""
    values = _DENSE_VALUES[self.name](self, params, x)
    return pack_codes(values, self.k, self.bits_per_hash, self.range_bits)

  def sparse_codes(self, params: Any, ids: jax.Array, values: jax.Array) -> jax.Array:
    """int32 ``[..., l]`` codes of sparse inputs (``ids`` int32 / ``values`` ``[..., nnz]``).

    Padding entries have value 0 (their id is ignored, clipped into range).
    """
    ids = jnp.clip(ids.astype(jnp.int32), 0, self.dim - 1)
    hashes = _SPARSE_VALUES[self.name](self, params, ids, values)
    return pack_codes(hashes, self.k, self.bits_per_hash, self.range_bits)


# -- constructors ------------------------------------------------------------------------------
def _resolve_range_bits(k: int, bits_per_hash: int, range_bits: int | None) -> int:
  if range_bits is None:
    range_bits = min(k * bits_per_hash, MAX_DEFAULT_RANGE_BITS)
  if not 1 <= range_bits <= MAX_RANGE_BITS:
    raise ValueError(f"range_bits must be in [1, {MAX_RANGE_BITS}], got {range_bits}")
  return int(range_bits)


def _check_sizes(dim: int, k: int, l: int) -> None:
  if dim < 1 or k < 1 or l < 1:
    raise ValueError(f"dim, k and l must be positive, got dim={dim}, k={k}, l={l}")


def _bin_bits(bin_size: int) -> int:
  if bin_size < 2:
    raise ValueError(f"bin_size must be at least 2, got {bin_size}")
  return math.ceil(math.log2(bin_size))


def simhash(dim: int, *, k: int, l: int, range_bits: int | None = None,
            sparsity: float | None = None) -> HashFamily:
  """Signed random projections: ``k`` sign bits per table (angular distance).

  ``sparsity``: fraction of nonzero entries of SLIDE's sparse +-1 projections (e.g. 1/3);
  ``None`` draws Gaussian projections.
  """
  _check_sizes(dim, k, l)
  if sparsity is not None and not 0.0 < sparsity <= 1.0:
    raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
  return HashFamily("simhash", dim, k, l, _resolve_range_bits(k, 1, range_bits), 1, 0,
                    None if sparsity is None else float(sparsity))


def wta(dim: int, *, k: int, l: int, bin_size: int = 8,
        range_bits: int | None = None) -> HashFamily:
  """Winner-take-all: argmax position among ``bin_size`` randomly permuted coordinates."""
  _check_sizes(dim, k, l)
  if bin_size > dim:
    raise ValueError(f"wta: bin_size={bin_size} exceeds dim={dim}")
  bits = _bin_bits(bin_size)
  return HashFamily("wta", dim, k, l, _resolve_range_bits(k, bits, range_bits), bits, bin_size)


def dwta(dim: int, *, k: int, l: int, bin_size: int = 8,
         range_bits: int | None = None) -> HashFamily:
  """Densified WTA for sparse inputs: empty bins borrow from probed non-empty bins."""
  _check_sizes(dim, k, l)
  bits = _bin_bits(bin_size)
  return HashFamily("dwta", dim, k, l, _resolve_range_bits(k, bits, range_bits), bits, bin_size)


def minhash(dim: int, *, k: int, l: int, range_bits: int | None = None) -> HashFamily:
  """Densified one-permutation MinHash over the set of nonzero coordinates (Jaccard).

  The ``dim`` coordinates are ranked by one random permutation and split into ``k * l``
  bins of consecutive ranks; a bin's hash is the smallest global rank present in it, and an
  empty bin copies the hash of the first non-empty bin on its probe sequence (optimal
  densification), so each hash collides with probability equal to the Jaccard similarity.
  ``bits_per_hash = ceil(log2(dim))``, so codes with ``k > 1`` are usually folded.
  """
  _check_sizes(dim, k, l)
  bits = max(1, math.ceil(math.log2(dim)))
  return HashFamily("minhash", dim, k, l, _resolve_range_bits(k, bits, range_bits), bits)


def default_range_bits(num_neurons: int, bucket_capacity: int) -> int:
  """Bits per table so that ``num_neurons / 2**bits`` is nearest ``bucket_capacity``.

  Clamped to ``[1, 20]``. E.g. 670,091 neurons, capacity 128 -> 12 (about 164 per bucket).
  """
  if num_neurons < 1 or bucket_capacity < 1:
    raise ValueError("num_neurons and bucket_capacity must be positive")
  bits = round(math.log2(max(num_neurons / bucket_capacity, 1.0)))
  return int(min(max(bits, 1), MAX_DEFAULT_RANGE_BITS))


# -- packing and folding -----------------------------------------------------------------------
def pack_codes(hashes: jax.Array, k: int, bits_per_hash: int, range_bits: int) -> jax.Array:
  """Packs hash values int ``[..., l*k]`` (each ``< 2**bits_per_hash``) into int32 ``[..., l]``.

  Exact (injective) when ``k * bits_per_hash <= range_bits``; otherwise folded.
  """
  hashes = hashes.astype(jnp.uint32).reshape(hashes.shape[:-1] + (-1, k))
  total_bits = k * bits_per_hash
  if total_bits <= 32:
    shifts = jnp.arange(k, dtype=jnp.uint32) * jnp.uint32(bits_per_hash)
    packed = jnp.sum(hashes << shifts, axis=-1, dtype=jnp.uint32)
  else:  # polynomial combination mod 2**32; equal tuples give equal values
    packed = jnp.zeros(hashes.shape[:-1], jnp.uint32)
    for j in range(k):
      packed = (packed + hashes[..., j]) * jnp.uint32(_MIX_MULTIPLIER) + jnp.uint32(j + 1)
  if total_bits > range_bits:
    packed = (packed * jnp.uint32(_FOLD_MULTIPLIER)) >> jnp.uint32(32 - range_bits)
  return packed.astype(jnp.int32)


# -- densification (DWTA, MinHash) ------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def probe_sequence(num_bins: int, attempts: int = DENSIFY_ATTEMPTS) -> np.ndarray:
  """int32 ``[attempts, num_bins]``: bin probed by empty bin ``i`` at attempt ``t``.

  A fixed universal hash of ``(bin, attempt)`` (multiply-shift on 64 bits), as in optimal
  densification (Shrivastava 2017) and densified WTA (Chen & Shrivastava 2018).
  """
  bins = np.arange(num_bins, dtype=np.uint64)[None, :]
  tries = np.arange(1, attempts + 1, dtype=np.uint64)[:, None]
  with np.errstate(over="ignore"):
    mixed = (bins * np.uint64(0x9E3779B97F4A7C15) + tries * np.uint64(0xC2B2AE3D27D4EB4F)
             + np.uint64(0x165667B19E3779F9))
    mixed ^= mixed >> np.uint64(31)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(29)
  return (mixed % np.uint64(num_bins)).astype(np.int32)


def densify(values: jax.Array, empty: jax.Array) -> jax.Array:
  """Fills empty bins: ``values``/``empty`` ``[..., num_bins]`` -> int32 ``[..., num_bins]``.

  An empty bin takes the value of the first non-empty bin on its probe sequence; if all
  ``DENSIFY_ATTEMPTS`` probes are empty (e.g. an all-zero input) its value is 0. The loop
  stops as soon as no bin is unresolved (dense inputs: no iteration at all); bins are moved
  to the leading axis so each probe is a contiguous row gather.
  """
  probes = jnp.asarray(probe_sequence(values.shape[-1]))
  values = jnp.moveaxis(values.astype(jnp.int32), -1, 0)     # [num_bins, ...]
  empty = jnp.moveaxis(empty, -1, 0)

  def unfinished(carry):
    t, _, unresolved = carry
    return (t < probes.shape[0]) & jnp.any(unresolved)

  def attempt(carry):
    t, filled, unresolved = carry
    probe_empty = jnp.take(empty, probes[t], axis=0)
    probe_value = jnp.take(values, probes[t], axis=0)
    take = unresolved & ~probe_empty
    return t + 1, jnp.where(take, probe_value, filled), unresolved & ~take

  def fill(values):
    start = (jnp.int32(0), jnp.where(empty, 0, values), empty)
    return jax.lax.while_loop(unfinished, attempt, start)[1]

  filled = jax.lax.cond(jnp.any(empty), fill, lambda v: v, values)
  return jnp.moveaxis(filled, 0, -1)


# -- SimHash -----------------------------------------------------------------------------------
def _simhash_init(fam: HashFamily, key: jax.Array) -> dict[str, jax.Array]:
  shape = (fam.dim, fam.num_hashes)
  if fam.sparsity is None:
    return {"projections": jax.random.normal(key, shape, jnp.float32)}
  key_mask, key_sign = jax.random.split(key)
  nonzero = jax.random.bernoulli(key_mask, fam.sparsity, shape)
  signs = jnp.where(jax.random.bernoulli(key_sign, 0.5, shape), 1.0, -1.0)
  return {"projections": jnp.where(nonzero, signs, 0.0).astype(jnp.float32)}


def _simhash_dense(fam, params, x):
  return (x.astype(jnp.float32) @ params["projections"]) > 0


def _simhash_sparse(fam, params, ids, values):
  rows = jnp.take(params["projections"], ids, axis=0)   # [..., nnz, l*k]
  proj = jnp.einsum("...n,...nh->...h", values.astype(jnp.float32), rows)
  return proj > 0


# -- WTA and DWTA ------------------------------------------------------------------------------
def _permuted_slots(key: jax.Array, dim: int, num_slots: int) -> jax.Array:
  """int32 ``[num_slots]``: coordinates of concatenated independent random permutations."""
  copies = -(-num_slots // dim)
  keys = jax.random.split(key, copies)
  perms = jax.vmap(lambda kk: jax.random.permutation(kk, dim))(keys)
  return perms.reshape(-1)[:num_slots].astype(jnp.int32)


def _wta_init(fam, key):
  keys = jax.random.split(key, fam.num_hashes)
  firsts = jax.vmap(lambda kk: jax.random.permutation(kk, fam.dim)[:fam.bin_size])(keys)
  return {"positions": firsts.astype(jnp.int32)}                 # [l*k, bin_size]


def _gather_bins(x, positions):
  """x ``[..., dim]``, positions int32 ``[bins, bin_size]`` -> ``[bins, bin_size, ...]``.

  Coordinates first, so the gather copies contiguous rows (much faster on CPU).
  """
  rows = jnp.take(jnp.moveaxis(x.astype(jnp.float32), -1, 0), positions.reshape(-1), axis=0)
  return rows.reshape(positions.shape + x.shape[:-1])


def _slot_argmax(binned: jax.Array) -> jax.Array:
  """First argmax over axis 1 of ``[bins, bin_size, ...]`` as an unrolled compare chain.

  Same ties as ``jnp.argmax`` (first maximum) but elementwise, several times faster on CPU
  than XLA's variadic argmax reduction.
  """
  best = binned[:, 0]
  winner = jnp.zeros(best.shape, jnp.int32)
  for j in range(1, binned.shape[1]):
    better = binned[:, j] > best
    best = jnp.where(better, binned[:, j], best)
    winner = jnp.where(better, j, winner)
  return winner


def _wta_dense(fam, params, x):
  binned = _gather_bins(x, params["positions"])
  return jnp.moveaxis(_slot_argmax(binned), 0, -1)


def _wta_sparse(fam, params, ids, values):
  dense = _scatter_dense(ids, values, fam.dim)
  return _wta_dense(fam, params, dense)


def _scatter_dense(ids, values, dim):
  flat_ids = ids.reshape(-1, ids.shape[-1])
  flat_values = values.astype(jnp.float32).reshape(flat_ids.shape)
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  dense = jnp.zeros((flat_ids.shape[0], dim), jnp.float32).at[rows, flat_ids].add(flat_values)
  return dense.reshape(ids.shape[:-1] + (dim,))


def _dwta_init(fam, key):
  num_slots = fam.num_hashes * fam.bin_size
  slots = _permuted_slots(key, fam.dim, num_slots)
  copies = -(-num_slots // fam.dim)
  # slot_of[p, i]: flat slot of coordinate i in permutation copy p; -1 past the last bin.
  flat = jnp.arange(num_slots, dtype=jnp.int32)
  slot_of = jnp.full((copies, fam.dim), -1, jnp.int32).at[flat // fam.dim, slots].set(flat)
  return {"positions": slots.reshape(fam.num_hashes, fam.bin_size), "slot_of": slot_of}


def _dwta_from_bins(binned: jax.Array, axis: int = -1) -> jax.Array:
  """Bin values with the bin-slot axis ``axis`` (0 = absent) -> densified argmax.

  ``[..., bins, bin_size]`` (axis=-1) or ``[bins, bin_size, ...]`` (axis=1) -> ``[..., bins]``.
  """
  present = binned != 0
  scores = jnp.where(present, binned, -jnp.inf)
  if axis == 1:   # bins-first: unrolled chains beat XLA reductions over a middle axis
    winners = _slot_argmax(scores)
    empty = functools.reduce(jnp.logical_and, [~present[:, j] for j in range(present.shape[1])])
  else:
    winners = jnp.argmax(scores, axis=axis)
    empty = ~jnp.any(present, axis=axis)
  if axis != -1:
    winners, empty = jnp.moveaxis(winners, 0, -1), jnp.moveaxis(empty, 0, -1)
  return densify(winners, empty)


def _dwta_dense(fam, params, x):
  return _dwta_from_bins(_gather_bins(x, params["positions"]), axis=1)


def _dwta_sparse(fam, params, ids, values):
  num_slots = fam.num_hashes * fam.bin_size
  slot_of = params["slot_of"]                                     # [copies, dim]
  slots = jnp.take(slot_of, ids, axis=1)                          # [copies, ..., nnz]
  slots = jnp.moveaxis(slots, 0, -2).reshape(ids.shape[:-1] + (-1,))
  vals = jnp.repeat(values.astype(jnp.float32)[..., None, :], slot_of.shape[0], axis=-2)
  vals = vals.reshape(slots.shape)
  slots = jnp.where((slots >= 0) & (vals != 0), slots, num_slots)   # num_slots = dropped
  flat_slots = slots.reshape(-1, slots.shape[-1])
  rows = jnp.arange(flat_slots.shape[0])[:, None]
  binned = jnp.zeros((flat_slots.shape[0], num_slots), jnp.float32)
  binned = binned.at[rows, flat_slots].add(vals.reshape(flat_slots.shape), mode="drop")
  binned = binned.reshape(ids.shape[:-1] + (fam.num_hashes, fam.bin_size))
  return _dwta_from_bins(binned)


# -- MinHash -----------------------------------------------------------------------------------
def _minhash_width(dim: int, num_bins: int) -> int:
  return max(1, -(-dim // num_bins))


def _minhash_init(fam, key):
  width = _minhash_width(fam.dim, fam.num_hashes)
  rank = jax.random.permutation(key, fam.dim).astype(jnp.int32)   # rank of each coordinate
  by_rank = jnp.full((fam.num_hashes * width,), fam.dim, jnp.int32)
  by_rank = by_rank.at[rank].set(jnp.arange(fam.dim, dtype=jnp.int32))
  return {"rank": rank, "members": by_rank.reshape(fam.num_hashes, width)}


def _minhash_dense(fam, params, x):
  width = params["members"].shape[-1]
  padded = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
  present = jnp.take(padded, params["members"], axis=-1) != 0    # [..., bins, width]
  bin_start = jnp.arange(fam.num_hashes, dtype=jnp.int32) * width
  min_rank = jnp.argmax(present, axis=-1).astype(jnp.int32) + bin_start
  return densify(min_rank, ~jnp.any(present, axis=-1))


def _minhash_sparse(fam, params, ids, values):
  width = _minhash_width(fam.dim, fam.num_hashes)
  absent = fam.num_hashes * width
  rank = jnp.take(params["rank"], ids)
  bins = jnp.where(values != 0, rank // width, fam.num_hashes)
  flat_bins = bins.reshape(-1, bins.shape[-1])
  rows = jnp.arange(flat_bins.shape[0])[:, None]
  mins = jnp.full((flat_bins.shape[0], fam.num_hashes), absent, jnp.int32)
  mins = mins.at[rows, flat_bins].min(rank.reshape(flat_bins.shape), mode="drop")
  mins = mins.reshape(ids.shape[:-1] + (fam.num_hashes,))
  return densify(mins, mins == absent)


_INIT = {"simhash": _simhash_init, "wta": _wta_init, "dwta": _dwta_init,
         "minhash": _minhash_init}
_DENSE_VALUES = {"simhash": _simhash_dense, "wta": _wta_dense, "dwta": _dwta_dense,
                 "minhash": _minhash_dense}
_SPARSE_VALUES = {"simhash": _simhash_sparse, "wta": _wta_sparse, "dwta": _dwta_sparse,
                  "minhash": _minhash_sparse}


# -- all rows of a weight matrix ---------------------------------------------------------------
def neuron_codes(fam: HashFamily, params: Any, weights: jax.Array, *, chunk_size: int = 4096,
                 loop: str = "unrolled") -> jax.Array:
  """int32 ``[n, l]`` codes of the rows of ``weights`` float ``[n, dim]``, chunk by chunk.

  ``loop="unrolled"``: explicit static chunks (faster on CPU, larger program);
  ``loop="map"``: ``lax.map`` over chunks (small program). Works inside jit.
  """
  n = weights.shape[0]
  if loop == "map":
    return jax.lax.map(lambda w: fam.codes(params, w), weights, batch_size=chunk_size)
  if loop != "unrolled":
    raise ValueError(f"loop must be 'unrolled' or 'map', got {loop!r}")
  parts = [fam.codes(params, weights[start:start + chunk_size])
           for start in range(0, n, chunk_size)]
  return jnp.concatenate(parts, axis=0) if parts else jnp.zeros((0, fam.l), jnp.int32)
