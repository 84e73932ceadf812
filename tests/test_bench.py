"""Benchmark plumbing on tiny shapes (the real numbers come from `slidejax bench`)."""
import json

import pytest

from slidejax.bench import steps
from slidejax.bench import time_to_accuracy as tta
from slidejax.cli import main as cli_main

TINY = steps.Scenario("tiny", features=500, labels=400, hidden=16, batch_size=16, nnz=8,
                      labels_per_point=2, max_features=8, max_labels=4)


def test_step_benchmark_reports_every_mode():
  result = steps.run(TINY, modes=(("shared", 64), ("per_sample", 16)), l=4, repeats=2,
                     log=lambda m: None)
  assert set(result["modes"]) == {"shared:64", "per_sample:16"}
  for entry in result["modes"].values():
    assert entry["step_ms"] > 0 and entry["query_ms"] > 0 and entry["rebuild_seconds"] > 0
    assert entry["gradients_ms"] > 0      # (parts are separate programs: at this size noise)
    assert entry["layer_ms"] + entry["query_ms"] == pytest.approx(entry["gradients_ms"])
    assert entry["optimizer_ms"] + entry["gradients_ms"] == pytest.approx(entry["step_ms"])
    assert 0 < entry["rebuild_amortized_ms"] < 1e3 * entry["rebuild_seconds"]
    assert entry["speedup"] == result["dense_step_ms"] / entry["step_ms"]
  assert result["sparse_step_ms"] == min(e["step_ms"] for e in result["modes"].values())
  assert result["peak_rss_mb"] > 0


def test_time_to_reach():
  history = [{"seconds": 1.0, "p@1": 0.1}, {"seconds": 2.0, "p@1": 0.5},
             {"seconds": 3.0, "p@1": 0.4}]
  assert tta.time_to_reach(history, 0.45) == 2.0
  assert tta.time_to_reach(history, 0.9) is None


def test_bench_cli_custom(tmp_path):
  out = tmp_path / "b.json"
  code = cli_main(["bench", "custom", "--features", "300", "--labels", "200", "--hidden", "8",
                   "--batch-size", "8", "--nnz", "4", "--modes", "shared:32", "--l", "2",
                   "--repeats", "1", "--json", str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  assert {"dense_step_ms", "sparse_step_ms", "speedup", "peak_rss_mb", "modes"} <= set(result)
  assert cli_main(["bench", "nonsense"]) == 2
  assert cli_main(["bench", "small", "--modes", "sideways:3"]) == 2


def test_label_scaling_reports_ratios(tmp_path):
  out = tmp_path / "s.json"
  code = cli_main(["bench", "custom", "--features", "300", "--labels", "400", "--hidden", "8",
                   "--batch-size", "8", "--nnz", "4", "--modes", "shared:32,per_sample:8",
                   "--l", "2", "--repeats", "1", "--label-scaling", "100", "--json", str(out)])
  assert code == 0
  result = json.loads(out.read_text())
  assert result["small_labels"] == 100 and set(result["modes"]) == {"shared:32", "per_sample:8"}
  for entry in result["modes"].values():
    assert entry["ratio"] == pytest.approx(entry["step_ms"] / entry["small_step_ms"])
  assert result["max_ratio"] == max(e["ratio"] for e in result["modes"].values())
  assert cli_main(["bench", "small", "--label-scaling", "10000000"]) == 2
  assert cli_main(["bench", "custom", "--features", "300", "--labels", "400", "--modes",
                   "shared:32", "--label-scaling", "10"]) == 2     # no mode fits 10 labels


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
  assert result["target_p@1"] == result["runs"]["uniform"]["p@1"]
  lsh = result["runs"]["lsh"]
  assert lsh["rebuilds"] > 0 and result["runs"]["uniform"]["rebuilds"] == 0
  assert lsh["config"]["l"] == 4 and result["runs"]["lsh:per_sample"]["config"]["num_active"] == 32
  for entry in result["runs"].values():
    reached = entry["seconds_to_target"]
    first = next((p["seconds"] for p in entry["history"] if p["p@1"] >= result["target_p@1"]),
                 None)
    assert reached == first
  assert lsh["probes"] and 0 <= lsh["probes"][-1]["recall@10"] <= 1
  assert "table_share" in lsh["probes"][-1] and not result["runs"]["dense"].get("probes")
  assert cli_main(["bench", "--time-to-accuracy", "--runs", "uniform,sideways"]) == 2
