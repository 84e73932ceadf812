"""Queries: active-set contract on random cases, host vs JAX agreement, degenerate inputs,
and retrieval quality of LSH against random sets."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from slidejax import lsh


def _tables_from_buckets(buckets, num_neurons):
  """LSHTables around hand-made buckets (codes only matter for updates)."""
  buckets = jnp.asarray(np.asarray(buckets, np.int32))
  counts = jnp.sum(buckets >= 0, axis=-1, dtype=jnp.int32)
  codes = jnp.zeros((num_neurons, buckets.shape[0]), jnp.int32)
  return lsh.LSHTables(buckets, counts, codes)


def _random_tables(rng, num_neurons, l, range_bits, capacity):
  codes = rng.integers(0, 2**range_bits, size=(num_neurons, l)).astype(np.int32)
  return lsh.build_tables(jnp.asarray(codes), range_bits=range_bits, bucket_capacity=capacity,
                          backend="jax")


@functools.partial(jax.jit, static_argnames=("shared", "num_active", "num_neurons", "policy",
                                             "threshold", "backend"))
def _query(tables, codes, forced, key, *, shared=False, num_active, num_neurons,
           policy="vanilla", threshold=2, backend):
  query = lsh.query_shared if shared else lsh.query
  return query(tables, codes, num_active=num_active, num_neurons=num_neurons, key=key,
               policy=policy, threshold=threshold, forced_ids=forced, backend=backend)


def _check_row(ids, valid, forced, slots, num_active, num_neurons):
  assert ids.shape == (num_active,) and valid.shape == (num_active,)
  size = min(num_active, num_neurons)
  assert valid[:size].all() and not valid[size:].any()
  assert (ids[size:] == num_neurons).all()
  real = ids[valid]
  assert np.unique(real).size == real.size
  assert ((real >= 0) & (real < num_neurons)).all()
  for v, s in zip(forced, slots):
    if 0 <= v < num_neurons:
      if s >= 0:
        assert ids[s] == v and valid[s]
    else:
      assert s == -1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), num_neurons=st.sampled_from([3, 300]),
       num_active=st.sampled_from([2, 64]), num_forced=st.sampled_from([0, 3]),
       policy=st.sampled_from(lsh.POLICIES), backend=st.sampled_from(lsh.BACKENDS),
       shared=st.booleans())
def test_active_set_contract(seed, num_neurons, num_active, num_forced, policy, backend,
                             shared):
  rng = np.random.default_rng(seed)
  batch, l = 3, 4
  tables = _random_tables(rng, num_neurons, l, 3, 4)
  codes = jnp.asarray(rng.integers(0, 8, size=(batch, l)).astype(np.int32))
  forced = rng.integers(-1, num_neurons + 2, size=(batch, num_forced)).astype(np.int32)
  if num_forced > 1:
    forced[0, 1] = forced[0, 0]                         # a repeated forced id
  options = dict(num_active=num_active, num_neurons=num_neurons, policy=policy,
                 backend=backend)
  args = (tables, codes, jnp.asarray(forced), jax.random.key(seed))
  if shared:
    out = _query(*args, shared=True, **options)
    ids, valid, slots = (np.asarray(a) for a in out[:3])
    _check_row(ids, valid, forced.ravel(), slots.ravel(), num_active, num_neurons)
    in_range = (forced >= 0) & (forced < num_neurons)
    assert int(out.forced_dropped) == int(np.sum(in_range & (slots < 0)))
    if np.unique(forced[in_range]).size <= num_active:
      assert int(out.forced_dropped) == 0
    assert (slots[slots >= 0] < int(out.num_fixed)).all() and out.num_fixed <= valid.sum()
  else:
    if num_forced > num_active:
      with pytest.raises(ValueError, match="forced"):
        _query(*args, **options)
      return
    out = _query(*args, **options)
    for b in range(batch):
      ids, valid, slots, fixed = (np.asarray(a[b]) for a in out)
      _check_row(ids, valid, forced[b], slots, num_active, num_neurons)
      in_range = (forced[b] >= 0) & (forced[b] < num_neurons)
      assert (slots[in_range] >= 0).all()                # forced ids are always present
      assert (slots[in_range] < fixed).all() and fixed <= valid.sum()   # fill comes last
  if num_forced > 1 and 0 <= forced[0, 0] < num_neurons:
    slots = np.asarray(out.forced_slots)
    assert slots[0, 0] == slots[0, 1]


def _layered_buckets():
  """4 tables whose bucket 0 holds ids 0..9, 0..6, 0..3, 0..1: hits 4,4,3,3,2,2,2,1,1,1."""
  buckets = np.full((4, 2, 10), -1, np.int32)
  for t, size in enumerate((10, 7, 4, 2)):
    buckets[t, 0, :size] = np.arange(size)
  return _tables_from_buckets(buckets, 50)


@pytest.mark.parametrize("shared", [False, True])
def test_topk_host_and_jax_agree(shared):
  tables = _layered_buckets()
  codes = jnp.zeros((2, 4), jnp.int32)
  forced = jnp.array([[20, -1], [21, -1]], jnp.int32)
  results = {}
  for backend in lsh.BACKENDS:
    num_active = 6 if shared else 5     # room for exactly the 4 ids with >= 3 hits
    out = _query(tables, codes, forced, jax.random.key(1), shared=shared,
                 num_active=num_active, num_neurons=50, policy="topk", backend=backend)
    rows = [np.asarray(out.ids)] if shared else list(np.asarray(out.ids))
    results[backend] = [set(r.tolist()) for r in rows]
  assert results["host"] == results["jax"]
  if shared:   # (sample, table) hits: ids 0,1: 8, ids 2,3: 6, ids 4..6: 4
    assert results["host"] == [{0, 1, 2, 3, 20, 21}]
  else:        # one forced id + the 4 ids found in >= 3 tables
    assert results["host"] == [{0, 1, 2, 3, 20}, {0, 1, 2, 3, 21}]


@pytest.mark.parametrize("backend", lsh.BACKENDS)
def test_threshold_keeps_only_frequent_candidates(backend):
  tables = _layered_buckets()
  codes, none = jnp.zeros((1, 4), jnp.int32), jnp.full((1, 1), -1, jnp.int32)
  out = _query(tables, codes, none, jax.random.key(0), num_active=5, num_neurons=50,
               policy="threshold", threshold=2, backend=backend)
  ids = set(np.asarray(out.ids[0]).tolist())
  assert len(ids) == 5 and ids <= set(range(7))   # 7 ids found in >= 2 tables, 5 slots
  out = _query(tables, codes, none, jax.random.key(0), num_active=20, num_neurons=50,
               policy="threshold", threshold=3, backend=backend)
  ids = set(np.asarray(out.ids[0]).tolist())
  assert len(ids) == 20 and set(range(4)) <= ids   # eligible first, then random fill


@pytest.mark.parametrize("backend", lsh.BACKENDS)
def test_degenerate_inputs(backend):
  empty = _tables_from_buckets(np.full((3, 4, 2), -1, np.int32), 10)
  codes = jnp.zeros((2, 3), jnp.int32)
  none = jnp.full((2, 1), -1, jnp.int32)
  key = jax.random.key(0)
  # all buckets empty: pure random fill, still exact and unique
  out = _query(empty, codes, none, key, num_active=4, num_neurons=10, backend=backend)
  for row in np.asarray(out.ids):
    assert np.unique(row).size == 4 and row.max() < 10
  # num_active > num_neurons: padding id num_neurons, invalid
  out = _query(empty, codes, none, key, shared=True, num_active=12, num_neurons=10,
               backend=backend)
  assert sorted(np.asarray(out.ids)[:10].tolist()) == list(range(10))
  assert (np.asarray(out.ids)[10:] == 10).all() and not np.asarray(out.valid)[10:].any()
  # identical weights: every neuron in one bucket of every table
  full = lsh.build_tables(jnp.zeros((30, 3), jnp.int32), range_bits=2, bucket_capacity=8,
                          backend=backend)
  out = _query(full, codes, none, key, num_active=8, num_neurons=30, policy="topk",
               backend=backend)
  assert set(np.asarray(out.ids[0]).tolist()) == set(range(22, 30))   # FIFO keeps the last 8
  # forced ids exceeding the shared set are dropped, and counted
  forced = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  out = _query(empty, codes, forced, key, shared=True, num_active=5, num_neurons=10,
               backend=backend)
  assert int(out.forced_dropped) == 3 and int(np.sum(np.asarray(out.forced_slots) >= 0)) == 5
  with pytest.raises(ValueError, match="num_active=2"):
    lsh.query(empty, codes, num_active=2, num_neurons=10, key=key, forced_ids=forced,
              backend=backend)
  with pytest.raises(ValueError, match="policy"):
    lsh.query(empty, codes, num_active=2, num_neurons=10, key=key, policy="best")


@pytest.mark.parametrize("shared", [False, True])
def test_host_query_under_jit_and_vmap(shared):
  rng = np.random.default_rng(0)
  tables = _random_tables(rng, 100, 3, 3, 4)
  codes = jnp.asarray(rng.integers(0, 8, size=(2, 5, 3)).astype(np.int32))
  forced = jnp.full((2, 5, 1), 7, jnp.int32)
  query = lsh.query_shared if shared else lsh.query
  run = jax.jit(jax.vmap(lambda c, f, k: query(tables, c, num_active=16, num_neurons=100,
                                               key=k, forced_ids=f, backend="host")))
  out = run(codes, forced, jax.random.split(jax.random.key(0), 2))
  slots = np.asarray(out.forced_slots)
  ids = np.asarray(out.ids)
  assert (slots >= 0).all()
  for g in range(2):
    row = ids[g] if shared else ids[g, 0]
    assert row[slots[g, 0, 0]] == 7


@functools.partial(jax.jit, static_argnames=("fam", "num_active"))
def _retrieve(fam, params, weights, queries, key, *, num_active):
  codes = lsh.neuron_codes(fam, params, weights)
  tables = lsh.build_tables(codes, range_bits=fam.range_bits, bucket_capacity=128, key=key)
  return lsh.query(tables, fam.codes(params, queries), num_active=num_active,
                   num_neurons=weights.shape[0], key=key, policy="topk")


def test_retrieval_recall_beats_random():
  """SimHash k=9, l=24, capacity 128 on 50K random neurons (d=128), m=1000 (2%)."""
  n, dim, batch, num_active = 50_000, 128, 64, 1000
  weights = jax.random.normal(jax.random.key(1), (n, dim), jnp.float32)
  rng = np.random.default_rng(0)
  planted = rng.choice(n, batch, replace=False)
  queries = weights[planted] + jax.random.normal(jax.random.key(2), (batch, dim), jnp.float32)
  top10 = np.asarray(jax.lax.top_k(queries @ weights.T, 10)[1])
  fam = lsh.simhash(dim, k=9, l=24)
  active = _retrieve(fam, fam.init(jax.random.key(3)), weights, queries, jax.random.key(4),
                     num_active=num_active)
  ids = np.asarray(active.ids)
  lsh_recall = float(np.mean([np.isin(top10[b], ids[b]).mean() for b in range(batch)]))
  random_ids = [rng.choice(n, num_active, replace=False) for _ in range(batch)]
  random_recall = float(np.mean([np.isin(top10[b], random_ids[b]).mean()
                                 for b in range(batch)]))
  planted_found = float(np.mean([planted[b] in ids[b] for b in range(batch)]))
  print(f"\ntop-10 recall: LSH {lsh_recall:.3f}, random {random_recall:.3f}, "
        f"planted neuron found {planted_found:.3f}")
  assert lsh_recall >= 3 * max(random_recall, num_active / n)
  assert lsh_recall >= 0.12
  assert planted_found >= 10 * num_active / n


def test_warmup_compiles_what_a_training_run_calls(tmp_path):
  """After ``lsh.warmup()`` a short host-backend training run (tables built and updated,
  batch-shared and per-sample selection, the neighbour votes' grid) compiles no new Numba
  signature: a kernel compiled
  inside the first steps (seconds with a cold cache) made a fresh machine plan a time budget
  at a third of its steps. A fresh process and an empty cache, so no earlier call hides one."""
  import subprocess
  import sys
  code = """
import hostops, numba
from hostops import _codes, _neighbours, _select, _tables
from slidejax import data, lsh, train
kernels = {f"{m.__name__}.{n}": k for m in (_codes, _neighbours, _select, _tables)
           for n, k in vars(m).items() if isinstance(k, numba.core.registry.CPUDispatcher)}
lsh.warmup()
before = {n: len(k.signatures) for n, k in kernels.items()}
trn, tst = data.synthesize_split(num_points=600, num_features=200, num_labels=300, seed=0)
for mode in ("shared", "per_sample"):
  train.fit(train.TrainConfig(hidden=8, l=2, num_active=32, batch_size=64, epochs=2, mode=mode,
                              rebuild_first=3, shortcut=0, validation=0.2, rerank="none"),
            trn, tst, progress=False, log=lambda *a: None)
print({n: len(k.signatures) for n, k in kernels.items() if len(k.signatures) != before[n]})
"""
  env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == "{}"
