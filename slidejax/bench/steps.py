"""Side-by-side step timings: dense JAX step vs slidejax sparse steps, in one process.

``slidejax bench [SCENARIO]`` runs this. Steps are timed alternately (dense, sparse mode 1,
sparse mode 2, ..., dense, ...), so drift of a shared machine hits all of them alike;
medians are reported with the speed-up ratios.
"""
from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from slidejax import nn
from slidejax import train


@dataclasses.dataclass(frozen=True)
class Scenario:
  name: str
  features: int
  labels: int
  hidden: int = 128
  batch_size: int = 128
  nnz: int = 75
  labels_per_point: int = 5
  max_features: int = 128
  max_labels: int = 8


SCENARIOS = {
    "amazon670k": Scenario("amazon670k", 135_909, 670_091, labels_per_point=5, max_labels=8),
    "delicious200k": Scenario("delicious200k", 782_585, 205_443, labels_per_point=75,
                              max_labels=128, max_features=256, nnz=300),
    "amazon67k": Scenario("amazon67k", 135_909, 67_009, labels_per_point=5, max_labels=8),
    "small": Scenario("small", 20_000, 20_000, batch_size=128, nnz=40, max_features=64),
}


# Rebuild cost per step is amortized over this many steps of the default schedule.
AMORTIZE_STEPS = 5000


def random_batches(s: Scenario, count: int, seed: int = 0) -> list[train.TrainBatch]:
  """``count`` fixed-shape batches with Zipf-distributed labels and features."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    nnz = min(s.nnz, s.max_features)
    f_ids = (rng.zipf(1.3, size=(s.batch_size, s.max_features)) - 1) % s.features
    f_vals = rng.random((s.batch_size, s.max_features), dtype=np.float32)
    f_vals[:, nnz:] = 0.0
    f_ids[:, nnz:] = 0
    l_ids = (rng.zipf(1.2, size=(s.batch_size, s.max_labels)) - 1) % s.labels
    l_ids[:, min(s.labels_per_point, s.max_labels):] = -1
    out.append(train.TrainBatch(f_ids.astype(np.int32), f_vals, l_ids.astype(np.int32),
                                np.arange(s.batch_size, dtype=np.int32)))
  return out


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


class _Runner:
  """A trainer (``step(batch) -> StepMetrics``), stepping through the shared batches."""

  def __init__(self, name, trainer, batches):
    self.name, self.trainer, self.batches = name, trainer, batches
    t0 = time.perf_counter()
    self.i = 0
    self.step_once()
    self.compile_seconds = time.perf_counter() - t0
    self.times: list[float] = []

  def step_once(self) -> float:
    batch = self.batches[self.i % len(self.batches)]
    t0 = time.perf_counter()
    out = self.trainer.step(batch)
    out.loss.block_until_ready()
    self.i += 1
    return time.perf_counter() - t0


class _PlainNNX:
  """The dense baseline as a Flax user writes it: ``nnx.value_and_grad`` and
  ``nnx.Optimizer`` over every parameter, one ``nnx.jit`` step with donation."""

  def __init__(self, model, tx):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def step(model, optimizer, batch):
      (loss, dropped), grads = nnx.value_and_grad(train.batch_loss, has_aux=True)(model, batch)
      optimizer.update(model, grads)
      return train.StepMetrics(loss, dropped)

    self._step = nnx.jit(step, donate_argnums=(0, 1))

  def step(self, batch):
    return self._step(self.model, self.optimizer, batch)


def _sampler_options(s: Scenario, batches, sampler: str, hash_name: str, l: int,
                     k: int | None) -> dict:
  """SlideDense options of ``sampler``: hash settings for LSH, the batches' label counts for
  unigram, nothing for uniform."""
  if sampler == "lsh":
    return dict(hash=hash_name, l=l, k=k)
  if sampler == "unigram":
    labels = np.concatenate([b.label_ids.ravel() for b in batches])
    return dict(sampler="unigram",
                label_counts=np.bincount(labels[labels >= 0], minlength=s.labels))
  return dict(sampler=sampler)


def _sparse_runner(s: Scenario, batches, *, mode: str, num_active: int, hash_name: str,
                   l: int, k: int | None, backend: str | None, sampler: str = "lsh") -> _Runner:
  model = nn.SlideMLP(s.features, s.labels, hidden=s.hidden, num_active=num_active, mode=mode,
                      backend=backend, rngs=nnx.Rngs(0),
                      **_sampler_options(s, batches, sampler, hash_name, l, k))
  name = f"{mode}:{num_active}" + ("" if sampler == "lsh" else f":{sampler}")
  return _Runner(name, train.Trainer(model, optax.adam(1e-4)), batches)


def _dense_runner(s: Scenario, batches) -> _Runner:
  model = nn.DenseMLP(s.features, s.labels, hidden=s.hidden, rngs=nnx.Rngs(0))
  return _Runner("dense", _PlainNNX(model, optax.adam(1e-4)), batches)


def _breakdown(runner: _Runner, s: Scenario, repeats: int = 5) -> dict:
  """Times of the step's parts, measured as separate programs on the same state."""
  trainer = runner.trainer
  model = trainer.model
  out_layer = model.output
  batch = runner.batches[0]
  h = nnx.jit(lambda m, ids, vals: m.hidden(ids, vals))(model, batch.feature_ids,
                                                         batch.feature_values)
  # jax.jit over the split state: nnx.jit of the layer hands its whole state (kernel
  # included) back out of the program on every call, which costs more than the query.
  graphdef, layer_state = nnx.split(out_layer)
  select = jax.jit(lambda st, h, labels, key: nnx.merge(graphdef, st).select(
      h, labels=labels, key=key))
  select = functools.partial(select, layer_state)
  _time(select, h, batch.label_ids, jax.random.key(0))
  query_ms = 1e3 * statistics.median(
      _time(select, h, batch.label_ids, jax.random.key(i)) for i in range(repeats))

  @jax.jit
  def grads(state, batch):   # the step without its optimizer update (not donating)
    m, _ = nnx.merge(trainer.graphdef, state)
    return nn.value_and_grad(train.batch_loss, has_aux=True)(m, batch)

  _time(grads, trainer.state, batch)
  grads_ms = 1e3 * statistics.median(
      _time(grads, trainer.state, runner.batches[i % len(runner.batches)])
      for i in range(repeats))
  probe = nn.selection_probe(out_layer, h, batch.label_ids, jax.random.key(2))
  for _ in range(2):  # the first call compiles; the second is timed
    r0 = time.perf_counter()
    trainer.rebuild()
    rebuild_s = time.perf_counter() - r0
  rebuilds = len(train.TrainConfig().rehash_schedule().rebuild_steps(AMORTIZE_STEPS))
  if not out_layer.uses_tables:
    rebuild_s = rebuilds = 0.0
  return {"query_ms": query_ms, "gradients_ms": grads_ms, "rebuild_seconds": rebuild_s,
          "rebuild_amortized_ms": 1e3 * rebuild_s * rebuilds / AMORTIZE_STEPS,
          "probe": probe}


def run(s: Scenario, *, modes=(("shared", 2048), ("shared", 8192), ("per_sample", 1024)),
        hash_name: str = "simhash", l: int = 50, k: int | None = None, repeats: int = 10,
        backend: str | None = None, with_dense: bool = True, sampler: str = "lsh",
        log=print) -> dict[str, Any]:
  """Times dense vs sparse steps for scenario ``s``; returns the result dictionary.

  ``with_dense=False`` times the sparse modes alone (to read their own peak RSS). Each mode
  also gets a :func:`slidejax.nn.selection_probe` of its (briefly trained) active sets.
  """
  batches = random_batches(s, 8)
  log(f"[{s.name}] {s.features} features, {s.labels} labels, hidden {s.hidden}, "
      f"batch {s.batch_size}; backend {jax.default_backend()}")
  runners = [_dense_runner(s, batches)] if with_dense else []
  if with_dense:
    log(f"  dense compiled in {runners[0].compile_seconds:.1f} s")
  for mode, m in modes:
    if m > s.labels:
      continue
    runners.append(_sparse_runner(s, batches, mode=mode, num_active=m, hash_name=hash_name,
                                  l=l, k=k, backend=backend, sampler=sampler))
    log(f"  {runners[-1].name} compiled in {runners[-1].compile_seconds:.1f} s")
  for _ in range(2):  # warm-up
    for r in runners:
      r.step_once()
  for _ in range(repeats):
    for r in runners:
      r.times.append(r.step_once())
  dense_ms = 1e3 * statistics.median(runners[0].times) if with_dense else float("nan")
  per_mode = {}
  for r in runners[int(with_dense):]:
    ms = 1e3 * statistics.median(r.times)
    parts = _breakdown(r, s)
    parts["layer_ms"] = parts["gradients_ms"] - parts["query_ms"]
    parts["optimizer_ms"] = ms - parts["gradients_ms"]
    per_mode[r.name] = {"step_ms": ms, "speedup": dense_ms / ms,
                        "samples_per_second": s.batch_size / (ms / 1e3),
                        "compile_seconds": r.compile_seconds, **parts}
    log(f"  {r.name:>18}: {ms:8.1f} ms/step  {dense_ms / ms:6.1f}x dense  "
        f"(hash+query {parts['query_ms']:.1f}, layers {parts['layer_ms']:.1f}, "
        f"optimizer {parts['optimizer_ms']:.1f}, rebuild {parts['rebuild_seconds']:.2f} s = "
        f"{parts['rebuild_amortized_ms']:.1f} ms/step amortized)")
  log(f"  {'dense':>18}: {dense_ms:8.1f} ms/step")
  log(probe_table({name: e["probe"] for name, e in per_mode.items()}))
  last = runners[-1].trainer
  params = sum(x.size for x in jax.tree.leaves(nnx.state(last.model, nnx.Param)))
  best = min(per_mode.values(), key=lambda e: e["step_ms"]) if per_mode else None
  return {"scenario": dataclasses.asdict(s), "backend": jax.default_backend(),
          "dense_step_ms": dense_ms,
          "dense_samples_per_second": s.batch_size / (dense_ms / 1e3),
          "dense_compile_seconds": runners[0].compile_seconds if with_dense else None,
          "parameters": int(params),
          "params_and_adam_mb": 3 * 4 * params / 2**20,
          "sparse_step_ms": None if best is None else best["step_ms"],
          "speedup": None if best is None else best["speedup"],
          "modes": per_mode, "peak_rss_mb": peak_rss_mb()}


PROBE_COLUMNS = ("recall@10", "recall@100", "table_share", "negative_logit", "uniform_logit",
                 "bucket_occupancy", "largest_bucket_share")


def probe_table(probes: dict[str, dict]) -> str:
  """Selection telemetry, one row per run (see :func:`slidejax.nn.selection_probe`)."""
  head = f"  {'selection':>24} " + " ".join(f"{c:>20}" for c in PROBE_COLUMNS)
  rows = [f"  {name:>24} " + " ".join(
      f"{probe[c]:>20.3f}" if c in probe else f"{'-':>20}" for c in PROBE_COLUMNS)
      for name, probe in probes.items() if probe]
  return "\n".join([head] + rows)


def run_label_scaling(s: Scenario, small_labels: int, *,
                      modes=(("shared", 2048), ("shared", 8192), ("per_sample", 1024)),
                      hash_name: str = "simhash", l: int = 50, k: int | None = None,
                      repeats: int = 10, backend: str | None = None, log=print) -> dict:
  """Sparse step time at ``s.labels`` and at ``small_labels``, alternating in one process.

  The same batches (labels folded into the smaller range) and modes; reports each mode's
  median at both sizes and their ratio (nothing O(labels) per step means a ratio near 1).
  """
  small = dataclasses.replace(s, name=f"{s.name}@{small_labels}", labels=small_labels)
  batches = random_batches(s, 8)
  small_batches = [b._replace(label_ids=np.where(b.label_ids >= 0, b.label_ids % small_labels,
                                                 -1).astype(np.int32)) for b in batches]
  pairs = []
  for mode, m in modes:
    if m > small_labels:
      continue
    pair = [_sparse_runner(scen, bs, mode=mode, num_active=m, hash_name=hash_name, l=l, k=k,
                           backend=backend)
            for scen, bs in ((s, batches), (small, small_batches))]
    pairs.append((f"{mode}:{m}", pair))
    log(f"  {mode}:{m} compiled ({pair[0].compile_seconds:.1f} / {pair[1].compile_seconds:.1f} s)")
  for _ in range(2):
    for _, pair in pairs:
      for r in pair:
        r.step_once()
  for _ in range(repeats):
    for _, pair in pairs:
      for r in pair:
        r.times.append(r.step_once())
  if not pairs:
    raise ValueError(f"no mode fits {small_labels} labels (each num_active must be at most that)")
  per_mode = {}
  for name, (big_r, small_r) in pairs:
    big_ms, small_ms = (1e3 * statistics.median(r.times) for r in (big_r, small_r))
    per_mode[name] = {"step_ms": big_ms, "small_step_ms": small_ms, "ratio": big_ms / small_ms}
    log(f"  {name:>18}: {big_ms:6.1f} ms at {s.labels} labels, {small_ms:6.1f} ms at "
        f"{small_labels}: ratio {big_ms / small_ms:.2f}")
  return {"scenario": dataclasses.asdict(s), "small_labels": small_labels,
          "backend": jax.default_backend(), "modes": per_mode,
          "max_ratio": max((e["ratio"] for e in per_mode.values()), default=None),
          "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
  print(run(SCENARIOS[sys.argv[1] if len(sys.argv) > 1 else "small"]))
