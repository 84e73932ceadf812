"""``slidejax data stats`` and ``slidejax data synth``."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from slidejax import cli
from slidejax import data as xcdata

TINY = "3 6 4\n0,1 0:1 5:2.5\n 2:1\n3\n"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stats_prints_and_writes_json(tmp_path, capsys):
  path = tmp_path / "tiny.txt"
  path.write_text(TINY)
  assert cli.main(["data", "stats", str(path), "--json", str(tmp_path / "s.json")]) == 0
  out = capsys.readouterr().out
  assert "points     3" in out and "points with no labels    1" in out
  assert "points with no features  1" in out and "peak RSS" in out
  stats = json.loads((tmp_path / "s.json").read_text())
  assert (stats["points"], stats["features"], stats["labels"]) == (3, 6, 4)
  assert stats["avg_labels"] == 1.0 and stats["avg_nnz"] == 1.0
  assert stats["label_frequency_quantiles"]["max"] == 1.0


def test_stats_svmlight_format(tmp_path, capsys):
  path = tmp_path / "tiny.svm"
  path.write_text("0,1 0:1 5:2.5\n 2:1\n")
  assert cli.main(["data", "stats", str(path), "--format", "svmlight",
                   "--json", str(tmp_path / "s.json")]) == 0
  stats = json.loads((tmp_path / "s.json").read_text())
  assert (stats["points"], stats["features"], stats["labels"]) == (2, 6, 2)


def test_stats_bad_input_exits_2(tmp_path, capsys):
  path = tmp_path / "bad.txt"
  path.write_text("2 6 4\n0 1:1\n1 9:1\n")
  assert cli.main(["data", "stats", str(path), "--format", "xc"]) == 2
  err = capsys.readouterr().err
  assert f"{path}:3: feature id >= the number of features 6" in err
  assert "Traceback" not in err
  assert cli.main(["data", "stats", str(tmp_path / "missing.txt")]) == 2


def test_stats_warning_and_strict(tmp_path, capsys):
  path = tmp_path / "short.txt"
  path.write_text("5 6 4\n0 1:1\n")
  assert cli.main(["data", "stats", str(path)]) == 0
  assert "header declares 5 rows but 1" in capsys.readouterr().err
  assert cli.main(["data", "stats", str(path), "--strict"]) == 2
  assert f"{path}:1: header declares 5 rows" in capsys.readouterr().err


def test_synth_writes_train_and_test(tmp_path, capsys):
  train_path, test_path = tmp_path / "train.txt", tmp_path / "test.txt"
  argv = ["data", "synth", "--out", str(train_path), "--points", "300", "--features", "200",
          "--labels", "50", "--nnz", "12", "--labels-per-point", "2", "--seed", "5",
          "--test-out", str(test_path), "--test-points", "100"]
  assert cli.main(argv) == 0
  train, test = xcdata.read_xc(train_path, strict=True), xcdata.read_xc(test_path, strict=True)
  assert (train.num_points, test.num_points) == (300, 100)
  assert (train.num_features, train.num_labels) == (200, 50)
  assert 10 < len(train.feature_ids) / 300 < 14
  whole = xcdata.synthesize(400, 200, 50, seed=5, avg_nnz=12, avg_labels=2)
  np.testing.assert_array_equal(test.label_ids, whole.label_ids[whole.label_indptr[300]:])
  with pytest.raises(SystemExit) as exit_info:   # argparse: usage and exit code 2
    cli.main(["data", "synth", "--out", str(train_path), "--preset", "nope"])
  assert exit_info.value.code == 2


def test_python_dash_m(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text(TINY)
  done = subprocess.run([sys.executable, "-m", "slidejax", "data", "stats", str(path)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "avg nonzeros per point" in done.stdout
  path.write_text("3 6 4\n0 1:x\n")
  done = subprocess.run([sys.executable, "-m", "slidejax", "data", "stats", str(path)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert done.returncode == 2 and f"{path}:2: unparsable token" in done.stderr
  assert "Traceback" not in done.stderr
