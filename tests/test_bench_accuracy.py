"""``slidejax bench --accuracy``: slidejax beside napkinXC and Omikuji on the same files."""
import sys

import numpy as np
import pytest

from slidejax import data as xcdata
from slidejax import metrics
from slidejax import train
from slidejax.bench import accuracy
from slidejax.cli import main as cli_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  trn, tst = xcdata.synthesize_split(num_points=1500, num_features=300, num_labels=80,
                                     avg_nnz=10, avg_labels=2, seed=1)
  root = tmp_path_factory.mktemp("acc")
  paths = (root / "toy_train.txt", root / "toy_test.txt")
  xcdata.write_xc(paths[0], trn)
  xcdata.write_xc(paths[1], tst)
  return str(paths[0]), str(paths[1]), trn, tst


def _popularity_p1(trn, tst) -> float:
  top = np.argsort(-xcdata.label_counts(trn))[:5]
  return metrics.evaluate(np.tile(top, (tst.num_points, 1)),
                          (tst.label_indptr, tst.label_ids), ks=(1,))["p@1"]


def test_slidejax_run_scores_its_own_predictions(files):
  train_path, test_path, trn, tst = files
  config = train.TrainConfig(hidden=64)   # epochs auto: early stopping on a split
  out = accuracy.compare(train_path, test_path, methods=["slidejax"], config=config,
                         log=lambda m: None)["slidejax"]
  assert out["p@1"] > 2 * _popularity_p1(trn, tst)
  assert out["train_seconds"] > 0 and out["predict_seconds"] > 0
  assert set(accuracy.SHOWN) <= set(out)


def test_a_missing_package_is_reported_not_faked(files, monkeypatch):
  train_path, test_path, _, _ = files
  monkeypatch.setitem(sys.modules, "napkinxc", None)        # import fails
  monkeypatch.setitem(sys.modules, "napkinxc.models", None)
  monkeypatch.setitem(sys.modules, "napkinxc.datasets", None)
  monkeypatch.setitem(sys.modules, "omikuji", None)
  out = accuracy.compare(train_path, test_path, methods=["napkinxc", "omikuji"],
                         log=lambda m: None)
  assert set(out) == {"napkinxc", "omikuji"}
  assert all("not installed" in r["skipped"] for r in out.values())
  text = accuracy.table({"toy": out})
  assert "napkinxc is not installed" in text and "omikuji is not installed" in text


@pytest.mark.parametrize("method", ["napkinxc", "omikuji"])
def test_tree_methods_run_when_installed(files, method):
  pytest.importorskip(method)
  train_path, test_path, trn, tst = files
  out = accuracy.compare(train_path, test_path, methods=[method], log=lambda m: None)[method]
  assert out["p@1"] > 2 * _popularity_p1(trn, tst)
  assert out["train_seconds"] > 0


def test_cli_accuracy_table_and_errors(files, capsys, tmp_path):
  train_path, test_path, _, _ = files
  out = tmp_path / "acc.json"
  assert cli_main(["bench", "--accuracy", "--train", train_path, "--test", test_path,
                   "--methods", "slidejax", "--time-budget", "3", "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "| toy | slidejax |" in printed
  assert cli_main(["bench", "--accuracy", "--train", train_path, "--methods", "slidejax"]) == 2
  assert "as many of each" in capsys.readouterr().err
  assert cli_main(["bench", "--accuracy", "--train", train_path, "--test", test_path,
                   "--methods", "xgboost"]) == 2
  assert "unknown xgboost" in capsys.readouterr().err
