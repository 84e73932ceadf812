"""``slidejax predict`` and ``slidejax evaluate`` on a small saved model."""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slidejax import checkpoint
from slidejax import cli
from slidejax import data as xcdata
from slidejax import metrics
from slidejax import nn

NUM_FEATURES, NUM_LABELS = 60, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A saved LSH model (with training label counts), a saved uniform one (without), the
  test split as XC and svmlight files."""
  root = tmp_path_factory.mktemp("serve")
  train, test = xcdata.synthesize_split(num_points=250, num_features=NUM_FEATURES,
                                        num_labels=NUM_LABELS, seed=0)
  model = nn.SlideMLP(NUM_FEATURES, NUM_LABELS, hidden=16, num_active=16, l=8,
                      bucket_capacity=8, rngs=nnx.Rngs(1))
  checkpoint.save(model, root / "lsh", metadata={
      "label_counts": xcdata.label_counts(train), "num_train_points": train.num_points})
  uniform = nn.SlideMLP(NUM_FEATURES, NUM_LABELS, hidden=16, num_active=16, sampler="uniform",
                        rngs=nnx.Rngs(2))
  checkpoint.save(uniform, root / "uniform")
  xcdata.write_xc(root / "test.txt", test)
  xcdata.write_svmlight(root / "test.svm", test)
  return {"root": root, "model": model, "train": train, "test": test}


def _reference(model, data, k, exact=True):
  """(scores, ids) of ``model.top_k`` over every row of ``data`` (one eager call)."""
  width = max(1, int(np.diff(data.feature_indptr).max()))
  batch = xcdata.pad_rows(data, np.arange(data.num_points), max_features=width, max_labels=1)
  scores, ids = model.top_k(jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values),
                            k, exact=exact)
  return np.asarray(scores), np.asarray(ids), batch


def _parse(path: pathlib.Path) -> list[list[tuple[int, float]]]:
  rows = []
  for line in path.read_text().split("\n")[:-1]:
    pairs = [p.split(":") for p in line.split()]
    rows.append([(int(label), float(score)) for label, score in pairs])
  return rows


def _predict(setup, *extra, model="lsh", data="test.txt") -> int:
  root = setup["root"]
  return cli.main(["predict", str(root / model), "--data", str(root / data), "--no-progress",
                   *extra])


def test_predict_exact_matches_top_k(setup, tmp_path):
  out = tmp_path / "preds.txt"
  assert _predict(setup, "--top-k", "3", "--out", str(out), "--batch-size", "16") == 0
  rows = _parse(out)
  test = setup["test"]
  assert len(rows) == test.num_points and all(len(r) == 3 for r in rows)
  assert not (tmp_path / "preds.txt.tmp").exists()
  scores, ids, _ = _reference(setup["model"], test, 3)
  got_ids = np.asarray([[label for label, _ in r] for r in rows])
  got_scores = np.asarray([[score for _, score in r] for r in rows], np.float32)
  np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-6)
  clear = scores[:, 0] - scores[:, 1] > 1e-4   # top-1 without a near tie
  assert clear.sum() > test.num_points // 2
  np.testing.assert_array_equal(got_ids[clear, 0], ids[clear, 0])
  assert all(np.all(np.diff(s) <= 0) for s in got_scores)   # best first


def test_predict_svmlight_input_gives_the_same_lines(setup, tmp_path):
  _predict(setup, "--top-k", "4", "--out", str(tmp_path / "a.txt"))
  assert _predict(setup, "--top-k", "4", "--out", str(tmp_path / "b.txt"), "--format",
                  "svmlight", data="test.svm") == 0
  assert _predict(setup, "--top-k", "4", "--out", str(tmp_path / "c.txt"),
                  data="test.svm") == 0   # detected
  lines = (tmp_path / "a.txt").read_text()
  assert lines == (tmp_path / "b.txt").read_text() == (tmp_path / "c.txt").read_text()


def test_predict_lsh_scores_are_exact_logits(setup, tmp_path):
  out = tmp_path / "lsh.txt"
  assert _predict(setup, "--top-k", "5", "--out", str(out), "--lsh", "--batch-size", "32") == 0
  rows = _parse(out)
  model, test = setup["model"], setup["test"]
  assert len(rows) == test.num_points
  _, lsh_ids, batch = _reference(model, test, 5, exact=False)
  hidden = model.hidden(jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values))
  logits = np.asarray(hidden @ model.output.kernel[...].T + model.output.bias[...])
  listed = 0
  for i, row in enumerate(rows):
    labels = [label for label, _ in row]
    assert len(row) <= 5 and len(set(labels)) == len(labels)
    assert all(0 <= label < NUM_LABELS for label in labels)
    assert sorted(labels) == sorted(int(j) for j in lsh_ids[i] if j < NUM_LABELS)
    for label, score in row:
      assert score == pytest.approx(float(logits[i, label]), rel=1e-5, abs=1e-6)
    listed += len(row)
  assert listed > test.num_points   # the tables found candidates


def test_evaluate_matches_the_predictions(setup, tmp_path, capsys):
  preds, report = tmp_path / "p.txt", tmp_path / "eval.json"
  assert _predict(setup, "--top-k", "5", "--out", str(preds), "--batch-size", "7") == 0
  root = setup["root"]
  assert cli.main(["evaluate", str(root / "lsh"), "--data", str(root / "test.txt"),
                   "--json", str(report), "--no-progress", "--batch-size", "7"]) == 0
  printed = capsys.readouterr().out
  result = json.loads(report.read_text())
  names = [f"{m}@{k}" for m in ("p", "ndcg", "psp") for k in (1, 3, 5)]
  assert set(names) <= set(result) and f"p@1={result['p@1']:.4f}" in printed
  test, train = setup["test"], setup["train"]
  top = np.asarray([[label for label, _ in row] for row in _parse(preds)])
  expected = metrics.evaluate(top, (test.label_indptr, test.label_ids), ks=(1, 3, 5),
                              propensities=metrics.propensities(xcdata.label_counts(train),
                                                                train.num_points))
  p1 = np.mean([len({int(r[0])} & set(test.label_ids[a:b]))
                for r, a, b in zip(top, test.label_indptr[:-1], test.label_indptr[1:])])
  assert result["p@1"] == pytest.approx(p1)
  for name in names:
    assert result[name] == pytest.approx(expected[name], rel=1e-12), name


def test_evaluate_without_label_counts_omits_psp(setup, tmp_path, capsys):
  root = setup["root"]
  assert cli.main(["evaluate", str(root / "uniform"), "--data", str(root / "test.txt"),
                   "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
  err = capsys.readouterr().err
  assert "PSP@k omitted" in err and len(err.strip().splitlines()) == 1
  result = json.loads((tmp_path / "e.json").read_text())
  assert "p@5" in result and not any(k.startswith("psp") for k in result)


# ------------------------------------------------------------------------------------ errors


def _one_error_line(capsys, *names) -> str:
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  assert "Traceback" not in captured.err and lines[0].startswith("slidejax ")
  for name in names:
    assert str(name) in lines[0]
  return lines[0]


def test_error_directory_without_model(setup, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli.main(["predict", str(tmp_path / "empty"), "--data",
                   str(setup["root"] / "test.txt"), "--out", str(tmp_path / "p")]) == 2
  assert "no model.json" in _one_error_line(capsys, tmp_path / "empty")
  assert not (tmp_path / "p").exists()


def _damaged_copy(setup, tmp_path, damage) -> pathlib.Path:
  import shutil
  directory = pathlib.Path(shutil.copytree(setup["root"] / "lsh", tmp_path / "copy"))
  damage(directory)
  return directory


def _newer(directory):
  info = json.loads((directory / "model.json").read_text())
  info["format_version"] = 999
  (directory / "model.json").write_text(json.dumps(info))


def _truncate_largest(directory):
  victim = max((p for p in (directory / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(victim.stat().st_size // 2)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("damage,words", [(_newer, "newer slidejax"),
                                          (_truncate_largest, "damaged")])
def test_error_bad_model_files(setup, tmp_path, capsys, command, damage, words):
  directory = _damaged_copy(setup, tmp_path, damage)
  extra = ["--out", str(tmp_path / "p")] if command == "predict" else []
  assert cli.main([command, str(directory), "--data", str(setup["root"] / "test.txt"),
                   *extra]) == 2
  assert words in _one_error_line(capsys, directory)


def test_error_feature_beyond_the_model(setup, tmp_path, capsys):
  xc = tmp_path / "wide.txt"
  xc.write_text(f"3 100 {NUM_LABELS}\n0 1:1 2:0.5\n1 3:1 70:2\n2 99:1\n")
  assert cli.main(["predict", str(setup["root"] / "lsh"), "--data", str(xc),
                   "--out", str(tmp_path / "p")]) == 2
  line = _one_error_line(capsys)
  assert line.endswith(f"{xc}:3: feature id 70 >= the model's {NUM_FEATURES} features")
  svm = tmp_path / "wide.svm"
  svm.write_text("0 1:1\n1 2:1\n2 3:1 61:1\n")
  assert cli.main(["evaluate", str(setup["root"] / "lsh"), "--data", str(svm)]) == 2
  assert f"{svm}:3: feature id 61 >= the model's" in _one_error_line(capsys)


def test_error_label_beyond_the_model(setup, tmp_path, capsys):
  xc = tmp_path / "labels.txt"
  xc.write_text(f"3 {NUM_FEATURES} 50\n0 1:1\n1 2:1\n3,45 3:1\n")
  assert cli.main(["evaluate", str(setup["root"] / "lsh"), "--data", str(xc),
                   "--no-progress"]) == 2
  line = _one_error_line(capsys)
  assert line.endswith(f"{xc}:4: label id 45 >= the model's {NUM_LABELS} labels")
  # predict does not use labels
  assert cli.main(["predict", str(setup["root"] / "lsh"), "--data", str(xc), "--no-progress",
                   "--top-k", "2", "--out", str(tmp_path / "p")]) == 0
  assert len(_parse(tmp_path / "p")) == 3


def test_error_lsh_without_tables_and_bad_options(setup, tmp_path, capsys):
  out = str(tmp_path / "p")
  assert _predict(setup, "--lsh", "--out", out, model="uniform") == 2
  assert "--lsh" in _one_error_line(capsys, setup["root"] / "uniform")
  assert _predict(setup, "--top-k", str(NUM_LABELS + 1), "--out", out) == 2
  assert "--top-k" in _one_error_line(capsys)
  assert _predict(setup, "--out", out, data="missing.txt") == 2
  _one_error_line(capsys, setup["root"] / "missing.txt")
  assert not pathlib.Path(out).exists()


def test_help_does_not_import_jax():
  import subprocess
  import sys
  code = ("import sys; from slidejax import cli; cli.build_parser(); "
          "print(any(m.startswith(('jax', 'flax', 'orbax')) for m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "False"
