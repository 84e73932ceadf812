"""LSH engine speed: neuron codes, full and incremental table builds, per-step queries.

  python3 -m slidejax.bench.lsh_speed [--neurons 670091 --dim 128 --l 50 --k 6 --batch 128
                                       --json PATH]

Every number is the median of ``--repeats`` timed calls after one warm-up call (compile and
Numba warm-up excluded), each call jitted and blocked on. Heavy: run it alone.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np
import jax.numpy as jnp

from slidejax import lsh


class _Rows(list):
  """Result rows ``(name, ms)``, echoed as they are measured (long runs show progress)."""

  def append(self, row):
    super().append(row)
    name, ms = row
    print(f"  {name}: {'' if ms is None else f'{ms:.1f} ms'}", flush=True)


def _median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))             # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _bench_codes(fam, params, weights, repeats, rows):
  for loop in ("unrolled", "map"):
    fn = jax.jit(functools.partial(lsh.neuron_codes, fam, loop=loop))
    ms = _median_ms(fn, params, weights, repeats=repeats)
    rows.append((f"neuron codes, {fam.name} k={fam.k}, {loop} 4096-row chunks", ms))


def _bench_builds(codes, range_bits, capacity, label, repeats, rows):
  key = jax.random.key(0)
  tables = None
  for backend in ("host", "jax"):
    fn = jax.jit(functools.partial(lsh.build_tables, range_bits=range_bits,
                                   bucket_capacity=capacity, backend=backend))
    ms = _median_ms(lambda c, k: fn(c, key=k), codes, key,
                    repeats=repeats if backend == "host" else max(1, repeats // 2))
    rows.append((f"full build {label}, {backend}", ms))
    tables = fn(codes, key=key)
  return tables


def _bench_updates(tables, codes, repeats, rows):
  n = codes.shape[0]
  for backend in ("host", "jax"):
    fn = jax.jit(functools.partial(lsh.update_tables, backend=backend))
    for percent in (1, 5, 10):
      r = n * percent // 100
      ids = jax.random.permutation(jax.random.key(percent), n)[:r].astype(jnp.int32)
      new_codes = jnp.roll(codes[ids], 1, axis=1)
      ms = _median_ms(lambda t, i, c, k: fn(t, i, c, key=k), tables, ids, new_codes,
                      jax.random.key(1), repeats=repeats if backend == "host" else 1)
      rows.append((f"incremental update {percent}% ({r} rows), {backend}", ms))


def _bench_updates_donated(tables, codes, repeats, rows):
  """Host incremental updates as the training loop runs them: jitted, tables donated."""
  import time
  n = codes.shape[0]
  codes = np.array(codes)  # the tables own (and donate) their own copy
  fn = jax.jit(functools.partial(lsh.update_tables, backend="host"), donate_argnums=0)
  for percent in (0.1, 1, 5, 10):
    r = max(1, int(n * percent / 100))
    ids = jax.random.permutation(jax.random.key(int(percent * 10)), n)[:r].astype(jnp.int32)
    new_codes = jnp.roll(jnp.asarray(codes[np.asarray(ids)]), 1, axis=1)
    tables = jax.block_until_ready(fn(tables, ids, new_codes, key=jax.random.key(1)))
    times = []
    for i in range(repeats):
      t0 = time.perf_counter()
      tables = jax.block_until_ready(fn(tables, ids, new_codes, key=jax.random.key(i)))
      times.append(1e3 * (time.perf_counter() - t0))
    rows.append((f"incremental update {percent}% ({r} rows), host, donated",
                 sorted(times)[len(times) // 2]))
  return tables


def _bench_queries(fam, params, tables, n, batch, repeats, rows):
  h = jax.random.normal(jax.random.key(7), (batch, fam.dim), jnp.float32)
  labels = jax.random.randint(jax.random.key(8), (batch, 5), 0, n, jnp.int32)
  for shared, size in ((True, 8192), (False, 1024)):
    for backend in ("host", "jax"):
      for policy in ("vanilla", "topk"):
        query = lsh.query_shared if shared else lsh.query

        def step(tables, h, labels, key, query=query, size=size, backend=backend,
                 policy=policy):
          codes = fam.codes(params, h)
          return query(tables, codes, num_active=size, num_neurons=n, key=key, policy=policy,
                       forced_ids=labels, backend=backend)

        ms = _median_ms(jax.jit(step), tables, h, labels, jax.random.key(2),
                        repeats=repeats if backend == "host" else max(3, repeats // 3))
        mode = f"shared M={size}" if shared else f"per-sample m={size}"
        rows.append((f"codes + query, {mode}, {policy}, {backend}", ms))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--neurons", type=int, default=670_091)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--l", type=int, default=50)
  parser.add_argument("--k", type=int, default=6)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--capacity", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  parser.add_argument("--updates-only", action="store_true",
                      help="only the host incremental updates (SimHash tables, donated)")
  args = parser.parse_args(argv)
  n, rows = args.neurons, _Rows()
  range_bits = lsh.default_range_bits(n, args.capacity)
  lsh.warmup()
  weights = jax.random.normal(jax.random.key(0), (n, args.dim), jnp.float32)
  simhash = lsh.simhash(args.dim, k=range_bits, l=args.l)
  if args.updates_only:
    sh_params = simhash.init(jax.random.key(1))
    codes = jax.jit(functools.partial(lsh.neuron_codes, simhash, loop="map"))(sh_params, weights)
    tables = lsh.build_tables(codes, range_bits=range_bits, bucket_capacity=args.capacity,
                              key=jax.random.key(3))
    _bench_updates_donated(tables, codes, args.repeats, rows)
    return _report(args, n, range_bits, rows)
  _bench_codes(simhash, simhash.init(jax.random.key(1)), weights, args.repeats, rows)
  main_tables, main_fam, main_params = None, None, None
  for k in (args.k, args.k + 1, args.k + 2):
    fam = lsh.dwta(args.dim, k=k, l=args.l, bin_size=8, range_bits=range_bits)
    params = fam.init(jax.random.key(k))
    codes = jax.jit(functools.partial(lsh.neuron_codes, fam))(params, weights)
    if k == args.k:
      _bench_codes(fam, params, weights, args.repeats, rows)
    label = f"DWTA k={k} l={args.l} ({2**range_bits} buckets x {args.capacity})"
    tables = _bench_builds(codes, range_bits, args.capacity, label, args.repeats, rows)
    if k == args.k:
      main_tables, main_fam, main_params, main_codes = tables, fam, params, codes
      stats = {key: float(v) for key, v in lsh.table_stats(tables).items()}
      rows.append((f"table stats k={k}: " + ", ".join(f"{key}={v:.3g}"
                                                      for key, v in stats.items()), None))
  _bench_updates(main_tables, main_codes, args.repeats, rows)
  _bench_queries(main_fam, main_params, main_tables, n, args.batch, args.repeats * 2, rows)
  return _report(args, n, range_bits, rows)


def _report(args, n, range_bits, rows) -> dict:
  print(f"\nLSH engine, n={n}, dim={args.dim}, l={args.l}, batch={args.batch}, "
        f"range_bits={range_bits}, capacity={args.capacity}, backend={jax.default_backend()}")
  print("| measurement | ms |\n|---|---|")
  for name, ms in rows:
    print(f"| {name} | {'' if ms is None else f'{ms:.1f}'} |")
  result = {"config": vars(args), "range_bits": range_bits,
            "rows": [{"name": name, "ms": ms} for name, ms in rows]}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
