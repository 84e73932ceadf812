"""Hash families: collision probabilities, code ranges, exact packing, chunked neuron codes."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from slidejax import lsh

_codes = jax.jit(lsh.HashFamily.codes, static_argnums=0)
_sparse_codes = jax.jit(lsh.HashFamily.sparse_codes, static_argnums=0)
_init = jax.jit(lsh.HashFamily.init, static_argnums=0)


def _pair_at_angle(rng, dim, angle):
  """Two unit vectors at ``angle`` radians in a random plane."""
  basis, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
  x = basis[:, 0]
  y = math.cos(angle) * basis[:, 0] + math.sin(angle) * basis[:, 1]
  return np.stack([x, y]).astype(np.float32)


def _collision_rate(fam, params, pairs):
  codes = np.asarray(_codes(fam, params, jnp.asarray(pairs)))   # [P, 2, l]
  return float(np.mean(codes[:, 0] == codes[:, 1]))


def _within_binomial(rate, p, trials, sigmas=4.0, slack=0.0):
  sigma = math.sqrt(max(p * (1 - p), 1e-4) / trials)
  return abs(rate - p) <= sigmas * sigma + slack


@pytest.mark.parametrize("sparsity", [None, 1 / 3])
def test_simhash_bit_collision_matches_angle(sparsity):
  rng = np.random.default_rng(0)
  fam = lsh.simhash(64, k=1, l=4000, sparsity=sparsity)
  params = fam.init(jax.random.key(1))
  for angle in (0.1 * math.pi, 0.25 * math.pi, 0.5 * math.pi, 0.8 * math.pi):
    pairs = _pair_at_angle(rng, 64, angle)[None]
    rate = _collision_rate(fam, params, pairs)
    expected = 1 - angle / math.pi
    # Sparse +-1 projections are only approximately rotation invariant.
    slack = 0.0 if sparsity is None else 0.03
    assert _within_binomial(rate, expected, fam.l, slack=slack), (angle, rate, expected)


def _sets_at_jaccard(rng, dim, union, shared):
  ids = rng.choice(dim, union, replace=False)
  only = (union - shared) // 2
  a = np.concatenate([ids[:shared], ids[shared:shared + only]])
  b = np.concatenate([ids[:shared], ids[shared + only:shared + 2 * only]])
  x = np.zeros((2, dim), np.float32)
  x[0, a] = 1.0
  x[1, b] = rng.uniform(0.5, 2.0, size=b.shape)   # values do not matter for MinHash
  return x, shared / (shared + 2 * only)


def test_minhash_collision_matches_jaccard():
  rng = np.random.default_rng(0)
  fam = lsh.minhash(2000, k=1, l=200)
  for union, shared in ((120, 100), (120, 60), (120, 20)):
    rates, jaccard = [], None
    for seed in range(6):
      x, jaccard = _sets_at_jaccard(rng, 2000, union, shared)
      params = _init(fam, jax.random.key(seed))
      rates.append(_collision_rate(fam, params, x[None]))
    rate = float(np.mean(rates))
    assert _within_binomial(rate, jaccard, 6 * fam.l, slack=0.02), (jaccard, rate)


def test_minhash_sparse_codes_equal_dense():
  rng = np.random.default_rng(1)
  fam = lsh.minhash(300, k=3, l=8)
  params = fam.init(jax.random.key(0))
  x, _ = _sets_at_jaccard(rng, 300, 40, 20)
  ids = np.argsort(x == 0, axis=1, kind="stable")[:, :48].astype(np.int32)
  values = np.take_along_axis(x, ids, axis=1)
  dense = _codes(fam, params, jnp.asarray(x))
  sparse = _sparse_codes(fam, params, jnp.asarray(ids), jnp.asarray(values))
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(sparse))


@pytest.mark.parametrize("make", [lsh.wta, lsh.dwta])
def test_wta_collision_rises_with_cosine(make):
  rng = np.random.default_rng(0)
  fam = make(32, k=1, l=400, bin_size=8)
  params = fam.init(jax.random.key(3))
  rates = []
  for angle in (0.05 * math.pi, 0.2 * math.pi, 0.35 * math.pi, 0.5 * math.pi):
    pairs = np.stack([_pair_at_angle(rng, 32, angle) for _ in range(20)])
    rates.append(_collision_rate(fam, params, pairs))
  assert all(a > b + 0.02 for a, b in zip(rates, rates[1:])), rates
  assert rates[0] > 0.8


@pytest.mark.parametrize("make,bin_size,k", [(lsh.wta, 2, 3), (lsh.wta, 3, 3), (lsh.wta, 5, 2),
                                              (lsh.wta, 8, 2), (lsh.wta, 16, 1),
                                              (lsh.dwta, 3, 3), (lsh.dwta, 8, 2)])
def test_wta_packing_is_injective(make, bin_size, k):
  """Every tuple of bin winners gets its own code (catches ``log`` used for ``log2``)."""
  fam = make(k * bin_size, k=k, l=1, bin_size=bin_size)
  assert fam.bits_per_hash == math.ceil(math.log2(bin_size))
  assert fam.range_bits == k * fam.bits_per_hash
  params = dict(fam.init(jax.random.key(0)))
  params["positions"] = jnp.arange(k * bin_size, dtype=jnp.int32).reshape(k, bin_size)
  outcomes = list(itertools.product(range(bin_size), repeat=k))
  x = np.full((len(outcomes), k * bin_size), 0.5, np.float32)
  for row, winners in enumerate(outcomes):
    for j, w in enumerate(winners):
      x[row, j * bin_size + w] = 2.0
  codes = np.asarray(_codes(fam, params, jnp.asarray(x)))[:, 0]
  assert len(set(codes.tolist())) == len(outcomes)
  assert codes.min() >= 0 and codes.max() < 2**fam.range_bits


def test_pack_codes_injective_and_fold_consistent():
  values = np.array(list(itertools.product(range(4), repeat=3)), np.int32)   # 2 bits each
  exact = np.asarray(lsh.pack_codes(jnp.asarray(values), 3, 2, 6))[:, 0]
  assert sorted(exact.tolist()) == list(range(64))
  folded = np.asarray(lsh.pack_codes(jnp.asarray(values), 3, 2, 4))
  assert folded.min() >= 0 and folded.max() < 16
  again = np.asarray(lsh.pack_codes(jnp.asarray(values[::-1]), 3, 2, 4))
  np.testing.assert_array_equal(folded, again[::-1])


_FAMILIES = {
    "simhash": lambda d, k, l, rb: lsh.simhash(d, k=k, l=l, range_bits=rb),
    "sparse_simhash": lambda d, k, l, rb: lsh.simhash(d, k=k, l=l, range_bits=rb,
                                                      sparsity=1 / 3),
    "wta": lambda d, k, l, rb: lsh.wta(d, k=k, l=l, bin_size=min(4, d), range_bits=rb),
    "dwta": lambda d, k, l, rb: lsh.dwta(d, k=k, l=l, bin_size=4, range_bits=rb),
    "minhash": lambda d, k, l, rb: lsh.minhash(d, k=k, l=l, range_bits=rb),
}


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(sorted(_FAMILIES)), dim=st.sampled_from([5, 24]),
       k=st.integers(1, 12), l=st.integers(1, 3),
       range_bits=st.one_of(st.none(), st.integers(1, 12)),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_codes_in_range_and_sparse_equals_dense(name, dim, k, l, range_bits, density, seed):
  fam = _FAMILIES[name](dim, k, l, range_bits)
  params = fam.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, dim)).astype(np.float32)
  x = np.where(rng.uniform(size=x.shape) < density, np.abs(x) + 0.1, 0.0).astype(np.float32)
  codes = np.asarray(_codes(fam, params, jnp.asarray(x)))
  assert codes.shape == (3, l) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 2**fam.range_bits
  nnz = dim + 2
  ids = np.zeros((3, nnz), np.int32)
  values = np.zeros((3, nnz), np.float32)
  for row in range(3):
    nz = np.flatnonzero(x[row])
    ids[row, :nz.size] = nz
    values[row, :nz.size] = x[row, nz]
  sparse = np.asarray(_sparse_codes(fam, params, jnp.asarray(ids), jnp.asarray(values)))
  np.testing.assert_array_equal(codes, sparse)


@pytest.mark.parametrize("name", ["dwta", "minhash", "simhash"])
def test_zero_vector_has_fixed_code(name):
  fam = _FAMILIES[name](16, 3, 4, None)
  codes = []
  for seed in range(2):
    params = _init(fam, jax.random.key(seed))
    codes.append(np.asarray(_codes(fam, params, jnp.zeros((2, 16), jnp.float32))))
  assert (codes[0] == codes[0][0, 0]).all() and (codes[0] == codes[1]).all()


def test_vmap_over_inputs(strict_promotion):
  fam = lsh.dwta(24, k=4, l=3, bin_size=4)
  params = fam.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 24), jnp.float32)
  batched = jax.vmap(lambda v: fam.codes(params, v))(x)
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(fam.codes(params, x)))


@pytest.mark.parametrize("loop", ["unrolled", "map"])
def test_neuron_codes_chunked_equals_direct(loop):
  fam = lsh.simhash(16, k=6, l=5)
  params = fam.init(jax.random.key(0))
  weights = jax.random.normal(jax.random.key(1), (300, 16), jnp.float32)
  chunked = jax.jit(lambda w: lsh.neuron_codes(fam, params, w, chunk_size=128, loop=loop))
  # 300 rows: two full chunks and a partial one
  np.testing.assert_array_equal(np.asarray(chunked(weights)),
                                np.asarray(fam.codes(params, weights)))


def test_default_range_bits_and_errors():
  assert lsh.default_range_bits(670_091, 128) == 12
  assert lsh.default_range_bits(10, 128) == 1
  assert lsh.default_range_bits(10**9, 1) == 20
  assert lsh.simhash(8, k=30, l=2).range_bits == 20
  with pytest.raises(ValueError, match="range_bits"):
    lsh.simhash(8, k=3, l=2, range_bits=31)
  with pytest.raises(ValueError, match="bin_size"):
    lsh.wta(8, k=3, l=2, bin_size=1)
  fam = lsh.simhash(8, k=3, l=2)
  assert hash(fam) == hash(lsh.simhash(8, k=3, l=2)) and fam.name == "simhash"
