"""Benchmark plumbing on tiny shapes (the real numbers come from `slidejax bench`).

The timings themselves are noise at these sizes, so the tests check them against what was
measured independently (a spy records every runner's step times and training progress) and
against facts that do not depend on the benchmark's own arithmetic (parameter counts, batch
shapes, active-set sizes, hand-made P@1 curves with known answers).
"""
import contextlib
import dataclasses
import io
import json
import math
import re
import statistics

import jax
import numpy as np
import pytest

from slidejax import train
from slidejax.bench import steps
from slidejax.bench import time_to_accuracy as tta
from slidejax.cli import main as cli_main


def _full_softmax_loss(model, batches) -> float:
  """Mean exact softmax cross-entropy (float64, every label scored) of a DenseMLP or
  SlideMLP over ``batches``: the same quantity for both, whatever their training loss is."""
  layer = getattr(model, "output", model)
  kernel = np.asarray(layer.kernel[...], np.float64)
  bias = np.asarray(layer.bias[...], np.float64)
  losses = []
  for b in batches:
    h = np.asarray(model.hidden(b.feature_ids, b.feature_values), np.float64)
    logits = h @ kernel.T + bias
    top = logits.max(axis=1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    labels = np.asarray(b.label_ids)
    rows, cols = np.nonzero(labels >= 0)
    losses.append(-log_p[rows, labels[rows, cols]].mean())
  return float(np.mean(losses))


class _Spy(steps._Runner):
  """A benchmark runner that also keeps what the benchmark does not report: the exact
  softmax loss of its model on the benchmark's batches before its first step."""

  created: list = []

  def __init__(self, name, trainer, batches):
    self.initial_loss = _full_softmax_loss(trainer.model, batches)
    _Spy.created.append(self)
    super().__init__(name, trainer, batches)


@contextlib.contextmanager
def _spying():
  _Spy.created = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, "_Runner", _Spy)
    yield _Spy.created


def _median_ms(runner) -> float:
  return 1e3 * statistics.median(runner.times)


def _vm_hwm_mb() -> float:
  """This process's peak resident set (MB), read from /proc instead of getrusage."""
  with open("/proc/self/status") as f:
    line = next(line for line in f if line.startswith("VmHWM:"))
  return int(line.split()[1]) / 1024.0


# -- the step benchmark: `slidejax bench small` (shrunk), run once for the tests below ---------

SMALL_MODES = (("shared", 64), ("per_sample", 16), ("shared", 30_000))   # the last: > labels
REPEATS = 3   # odd, and > 2: the median is one measured step, not a mean of two


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "b.json"
  printed = io.StringIO()
  modes = ",".join(f"{mode}:{m}" for mode, m in SMALL_MODES)
  with _spying() as runners, contextlib.redirect_stdout(printed):
    code = cli_main(["bench", "small", "--hidden", "8", "--batch-size", "8", "--modes", modes,
                     "--l", "2", "--repeats", str(REPEATS), "--json", str(out)])
  assert code == 0
  scenario = dataclasses.replace(steps.SCENARIOS["small"], hidden=8, batch_size=8)
  return dict(result=json.loads(out.read_text()), printed=printed.getvalue(),
              runners={r.name: r for r in runners}, scenario=scenario,
              final_losses={r.name: _full_softmax_loss(r.trainer.model, r.batches)
                            for r in runners})


def test_step_benchmark_runners_really_train(small_bench):
  runners, s = small_bench["runners"], small_bench["scenario"]
  assert list(runners) == ["dense", "shared:64", "per_sample:16"]
  for name, r in runners.items():
    # compile step + 2 warm-up steps + the timed ones, on the scenario's batches
    assert r.i == 1 + 2 + REPEATS and len(r.times) == REPEATS, name
    assert r.batches[0].feature_ids.shape == (s.batch_size, s.max_features)
    assert np.all((np.asarray(r.batches[0].feature_values) > 0).sum(axis=1) == s.nnz)
    before, after = r.initial_loss, small_bench["final_losses"][name]
    assert before == pytest.approx(math.log(s.labels), rel=0.05), name   # near-uniform start
    assert after < before - 1e-4, (name, before, after)


def test_step_benchmark_respects_num_active(small_bench):
  result, runners, s = small_bench["result"], small_bench["runners"], small_bench["scenario"]
  assert set(result["modes"]) == {"shared:64", "per_sample:16"}   # 30000 > labels: skipped
  batch = runners["dense"].batches[0]
  for mode, m in SMALL_MODES[:2]:
    entry = result["modes"][f"{mode}:{m}"]
    assert entry["step_ms"] > 0 and entry["query_ms"] > 0 and entry["rebuild_seconds"] > 0
    model = runners[f"{mode}:{m}"].trainer.model
    assert model.output.num_active == m and model.output.mode == mode
    assert model.output.kernel[...].shape == (s.labels, s.hidden)
    out = model(batch.feature_ids, batch.feature_values, labels=batch.label_ids,
                key=jax.random.key(0))
    assert out.ids.shape == ((m,) if mode == "shared" else (s.batch_size, m))
    ids = np.asarray(out.ids).reshape(-1, m)
    valid = np.asarray(out.valid).reshape(-1, m)
    for row, ok in zip(ids, valid):
      assert np.all(row[ok] < s.labels) and len(set(row[ok])) == ok.sum()


def test_step_benchmark_reports_the_measured_medians(small_bench):
  result, runners = small_bench["result"], small_bench["runners"]
  dense_ms = _median_ms(runners["dense"])
  assert result["dense_step_ms"] == pytest.approx(dense_ms, rel=1e-12)
  table = {m.group(1): (float(m.group(2)), m.group(3) and float(m.group(3)))
           for m in re.finditer(r"^\s*(\S+):\s+([\d.]+) ms/step(?:\s+([\d.]+)x dense)?",
                                small_bench["printed"], re.M)}
  assert set(table) == set(runners)
  assert table["dense"][0] == pytest.approx(dense_ms, abs=0.051)
  for name, entry in result["modes"].items():
    ms = _median_ms(runners[name])
    assert entry["step_ms"] == pytest.approx(ms, rel=1e-12)
    assert entry["speedup"] == pytest.approx(dense_ms / ms, rel=1e-12)
    assert entry["samples_per_second"] == pytest.approx(8 / (ms / 1e3), rel=1e-12)
    printed_ms, printed_speedup = table[name]
    assert printed_ms == pytest.approx(ms, abs=0.051)
    assert printed_speedup == pytest.approx(dense_ms / ms, abs=0.051)
  best = min(result["modes"], key=lambda name: _median_ms(runners[name]))
  assert result["sparse_step_ms"] == pytest.approx(_median_ms(runners[best]), rel=1e-12)
  summary = re.search(r"best sparse ([\d.]+) ms vs dense ([\d.]+) ms: ([\d.]+)x",
                      small_bench["printed"])
  assert float(summary.group(1)) == pytest.approx(_median_ms(runners[best]), abs=0.051)
  assert float(summary.group(2)) == pytest.approx(dense_ms, abs=0.051)
  assert float(summary.group(3)) == pytest.approx(dense_ms / _median_ms(runners[best]),
                                                  abs=0.051)


def test_bench_cli_json_matches_independent_counts(small_bench):
  result, s = small_bench["result"], small_bench["scenario"]
  assert result["scenario"] == dataclasses.asdict(s)
  assert (s.features, s.labels, s.hidden, s.batch_size) == (20_000, 20_000, 8, 8)
  # SlideMLP: embedding [features, hidden] + bias [hidden], output [labels, hidden] + [labels]
  params = s.features * s.hidden + s.hidden + s.labels * s.hidden + s.labels
  assert result["parameters"] == params
  assert result["params_and_adam_mb"] == pytest.approx(3 * 4 * params / 2**20)
  # the process's peak RSS, in MB: above the arrays it holds, not above what /proc says
  assert result["params_and_adam_mb"] < result["peak_rss_mb"] <= _vm_hwm_mb() + 1.0
  assert cli_main(["bench", "nonsense"]) == 2
  assert cli_main(["bench", "small", "--modes", "sideways:3"]) == 2


def test_label_scaling_times_both_sizes(tmp_path):
  out = tmp_path / "s.json"
  printed = io.StringIO()
  with _spying() as runners, contextlib.redirect_stdout(printed):
    code = cli_main(["bench", "custom", "--features", "300", "--labels", "400", "--hidden", "8",
                     "--batch-size", "8", "--nnz", "4", "--modes", "shared:32,per_sample:8",
                     "--l", "2", "--repeats", str(REPEATS), "--label-scaling", "100", "--json",
                     str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  assert result["small_labels"] == 100 and set(result["modes"]) == {"shared:32", "per_sample:8"}
  # runners come in (400 labels, 100 labels) pairs per mode, on the same features
  assert [r.name for r in runners] == ["shared:32", "shared:32", "per_sample:8", "per_sample:8"]
  ratios = []
  for big, small in zip(runners[::2], runners[1::2]):
    assert big.trainer.model.output.kernel[...].shape == (400, 8)
    assert small.trainer.model.output.kernel[...].shape == (100, 8)
    assert big.trainer.model.output.num_active == small.trainer.model.output.num_active
    for b_big, b_small in zip(big.batches, small.batches):
      np.testing.assert_array_equal(b_big.feature_ids, b_small.feature_ids)
      labels = np.asarray(b_small.label_ids)
      assert labels.max() < 100
      np.testing.assert_array_equal(labels, np.where(b_big.label_ids >= 0,
                                                     b_big.label_ids % 100, -1))
    entry = result["modes"][big.name]
    assert entry["step_ms"] == pytest.approx(_median_ms(big), rel=1e-12)
    assert entry["small_step_ms"] == pytest.approx(_median_ms(small), rel=1e-12)
    ratios.append(_median_ms(big) / _median_ms(small))
    assert entry["ratio"] == pytest.approx(ratios[-1], rel=1e-12)
  assert result["max_ratio"] == pytest.approx(max(ratios), rel=1e-12)
  printed_ratio = re.search(r"largest step-time ratio ([\d.]+)", printed.getvalue()).group(1)
  assert float(printed_ratio) == pytest.approx(max(ratios), abs=0.0051)
  assert cli_main(["bench", "small", "--label-scaling", "10000000"]) == 2
  assert cli_main(["bench", "custom", "--features", "300", "--labels", "400", "--modes",
                   "shared:32", "--label-scaling", "10"]) == 2     # no mode fits 10 labels


# -- time to accuracy --------------------------------------------------------------------------

def _history(*points):
  """``(seconds, p@1)`` pairs -> a fit history (steps 10, 20, ...: never equal to seconds)."""
  return [{"seconds": s, "step": 10 * (i + 1), "p@1": p} for i, (s, p) in enumerate(points)]


def test_time_to_reach_is_the_first_evaluation_at_or_above_the_target():
  history = _history((1.0, 0.1), (2.5, 0.5), (3.0, 0.4), (4.0, 0.6), (5.0, 0.7))
  assert tta.time_to_reach(history, 0.45) == 2.5    # first crossing, not the later, higher ones
  assert tta.time_to_reach(history, 0.5) == 2.5     # reaching the target exactly counts
  assert tta.time_to_reach(history, 0.3) == 2.5     # no interpolation between 1.0 and 2.5
  assert tta.time_to_reach(history, 0.55) == 4.0    # after a dip: the next evaluation above
  assert tta.time_to_reach(history, 0.1) == 1.0     # the first evaluation itself
  assert tta.time_to_reach(history, 0.0) == 1.0
  assert tta.time_to_reach(history, 0.70001) is None   # never reached
  assert tta.time_to_reach([], 0.1) is None
  # a run that reaches the target and falls back under it has still reached it
  assert tta.time_to_reach(_history((1.0, 0.2), (2.0, 0.9), (3.0, 0.1)), 0.8) == 2.0


def test_time_to_accuracy_targets_the_baseline_final_p1(monkeypatch):
  fake = {   # hidden size -> what "training" returned
      1: {"p@1": 0.30, "train_seconds": 5.0,
          "history": _history((1.0, 0.1), (2.0, 0.3), (4.0, 0.33), (5.0, 0.3))},
      2: {"p@1": 0.35, "train_seconds": 1.5, "history": _history((0.5, 0.2), (1.5, 0.35))},
      3: {"p@1": 0.299, "train_seconds": 3.0, "history": _history((1.0, 0.29), (3.0, 0.299))},
  }
  for entry in fake.values():
    entry.update({"p@5": 0.1, "steps": 7, "rebuilds": 0})
  monkeypatch.setattr(tta.train, "fit", lambda config, trn, tst, **kw: dict(fake[config.hidden]))
  runs = {"lsh": train.TrainConfig(hidden=2), "uniform": train.TrainConfig(hidden=1),
          "dense": train.TrainConfig(hidden=3)}
  result = tta.run(None, None, runs, log=lambda m: None, progress=False)
  assert result["baseline"] == "uniform" and result["target_p@1"] == 0.30
  uniform, lsh, dense = (result["runs"][n] for n in ("uniform", "lsh", "dense"))
  assert uniform["seconds_to_target"] == 2.0 and uniform["time_ratio"] == pytest.approx(2.5)
  assert lsh["seconds_to_target"] == 1.5 and lsh["time_ratio"] == pytest.approx(5.0 / 1.5)
  assert lsh["p@1_minus_baseline"] == pytest.approx(0.05)
  assert dense["seconds_to_target"] is None and dense["time_ratio"] is None
  assert dense["p@1_minus_baseline"] == pytest.approx(-0.001)
  assert lsh["config"]["hidden"] == 2
  lines = {line.split()[0]: line.split() for line in tta.summary(result).splitlines()[1:-1]}
  assert lines["dense"][4:6] == ["never", "-"]
  assert lines["lsh"][4:6] == ["1.5", "3.33x"] and lines["uniform"][4:6] == ["2.0", "2.50x"]
  with pytest.raises(ValueError, match="baseline"):
    tta.run(None, None, {"lsh": runs["lsh"]}, log=lambda m: None)


def test_time_to_accuracy_compares_every_sampler_with_uniform(tmp_path):
  from slidejax import data as xcdata
  trn, tst = xcdata.synthesize_split(num_points=900, num_features=200, num_labels=300,
                                     avg_nnz=8, avg_labels=2, seed=0)
  paths = []
  for name, part in (("trn", trn), ("tst", tst)):
    paths.append(tmp_path / f"{name}.txt")
    xcdata.write_xc(paths[-1], part)
  out = tmp_path / "tta.json"
  code = cli_main(["bench", "--time-to-accuracy", "--train", str(paths[0]), "--test",
                   str(paths[1]), "--runs", "dense,uniform,unigram,lsh,lsh:per_sample",
                   "--num-active", "64", "--per-sample-active", "32", "--epochs", "2",
                   "--hidden", "8", "--eval-every", "5", "--eval-points", "100", "--l", "4",
                   "--probe-every", "5", "--rebuild-first", "5", "--plot", "", "--json",
                   str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  assert set(result["runs"]) == {"dense", "uniform", "unigram", "lsh", "lsh:per_sample"}
  uniform = result["runs"]["uniform"]
  assert result["target_p@1"] == uniform["p@1"]
  steps_per_run = 2 * math.ceil(trn.num_points / 128)     # 2 epochs of the default batch
  for entry in result["runs"].values():
    history = entry["history"]
    assert entry["steps"] == steps_per_run
    # evaluations every 5 steps, then the final (full test set) one: its P@1 is the final P@1
    assert [p["step"] for p in history] == [*range(5, steps_per_run, 5), steps_per_run]
    assert history[-1]["p@1"] == entry["p@1"]
    assert history[-1]["seconds"] == pytest.approx(entry["train_seconds"], abs=1e-3)
    reached = entry["seconds_to_target"]
    assert (reached is None) == (max(p["p@1"] for p in history) < result["target_p@1"])
    assert entry["p@1"] > 10 / trn.num_labels         # every run learned: far above chance
  # the baseline reaches its own final P@1, at its final evaluation at the latest (history
  # seconds are rounded to ms)
  assert uniform["seconds_to_target"] <= uniform["train_seconds"] + 1e-3
  lsh = result["runs"]["lsh"]
  assert lsh["rebuilds"] > 0 and uniform["rebuilds"] == 0
  assert lsh["config"]["l"] == 4 and result["runs"]["lsh:per_sample"]["config"]["num_active"] == 32
  assert lsh["probes"] and 0 <= lsh["probes"][-1]["recall@10"] <= 1
  assert "table_share" in lsh["probes"][-1] and not result["runs"]["dense"].get("probes")
  assert cli_main(["bench", "--time-to-accuracy", "--runs", "uniform,sideways"]) == 2
