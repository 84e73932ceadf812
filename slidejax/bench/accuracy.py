"""Accuracy beside the tree methods: slidejax, napkinXC's PLT and Omikuji on the same files.

Each method trains on the training file with its defaults (slidejax: ``slidejax train``'s,
plus the time budget given), predicts the top 5 labels of every test row, and is scored by
the same code (:func:`slidejax.metrics.evaluate`: P@1/3/5, nDCG@5, PSP@5 with the training
file's propensities). The tree methods are optional (``pip install 'slidejax[trees]'``): a
method that is not installed is reported as such and skipped, never faked.
"""
from __future__ import annotations

import tempfile
import time
from typing import Callable

import numpy as np

from slidejax import data as xcdata
from slidejax import metrics

METHODS = ("slidejax", "napkinxc", "omikuji")
SHOWN = ("p@1", "p@3", "p@5", "psp@5")


class NotInstalled(Exception):
  """The method's package cannot be imported."""


def _score(top: np.ndarray, train: xcdata.XCData, test: xcdata.XCData) -> dict:
  props = metrics.propensities(xcdata.label_counts(train), train.num_points)
  return metrics.evaluate(top, (test.label_indptr, test.label_ids), ks=(1, 3, 5),
                          propensities=props)


def _padded(predictions, k: int = 5) -> np.ndarray:
  """int64 ``[n, k]`` from per-row lists of label ids (short rows padded with -1)."""
  top = np.full((len(predictions), k), -1, np.int64)
  for row, ids in enumerate(predictions):
    ids = list(ids)[:k]
    top[row, :len(ids)] = ids
  return top


def run_napkinxc(train_path: str, test_path: str, train: xcdata.XCData,
                 test: xcdata.XCData, **_) -> dict:
  """napkinXC 0.7's PLT with its defaults (all cores)."""
  try:
    from napkinxc.datasets import load_libsvm_file
    from napkinxc.models import PLT
  except ImportError as err:
    raise NotInstalled("napkinxc") from err
  x_train, y_train = load_libsvm_file(train_path)
  x_test, _ = load_libsvm_file(test_path)
  with tempfile.TemporaryDirectory() as directory:
    model = PLT(directory)
    t0 = time.perf_counter()
    model.fit(x_train, y_train)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictions = model.predict(x_test, top_k=5)
    predict_seconds = time.perf_counter() - t0
  return {**_score(_padded(predictions), train, test), "train_seconds": train_seconds,
          "predict_seconds": predict_seconds}


def run_omikuji(train_path: str, test_path: str, train: xcdata.XCData,
                test: xcdata.XCData, **_) -> dict:
  """Omikuji 0.5 (Parabel-like trees) with its default hyperparameters (all cores)."""
  try:
    import omikuji
  except ImportError as err:
    raise NotInstalled("omikuji") from err
  t0 = time.perf_counter()
  model = omikuji.Model.train_on_data(train_path)
  train_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  predictions = []
  for row in range(test.num_points):
    start, end = test.feature_indptr[row], test.feature_indptr[row + 1]
    pairs = list(zip(test.feature_ids[start:end].tolist(),
                     test.feature_values[start:end].tolist()))
    predictions.append([label for label, _ in model.predict(pairs, top_k=5)])
  predict_seconds = time.perf_counter() - t0
  return {**_score(_padded(predictions), train, test), "train_seconds": train_seconds,
          "predict_seconds": predict_seconds}


def run_slidejax(train_path: str, test_path: str, train: xcdata.XCData, test: xcdata.XCData,
                 *, config=None, progress: bool = False, log=None) -> dict:
  """``slidejax train``'s defaults (``config``: a TrainConfig, default ``TrainConfig()``);
  training seconds are ``fit``'s (validations included), prediction the timed exact top-5
  of every test row."""
  from slidejax import train as training
  config = config if config is not None else training.TrainConfig()
  result = training.fit(config, train, None, progress=progress,
                        log=log or (lambda message: None))
  from flax import nnx
  model = result["model"]
  jitted = nnx.jit(lambda model, ids, values: model.top_k(ids, values, 5)[1])
  top_k = lambda ids, values: jitted(model, ids, values)  # noqa: E731
  max_features = result["config"]["max_features"]
  batch_size = result["config"]["batch_size"]   # resolved ("auto": by the output layer)
  training.evaluate_model(top_k, xcdata.subset(test, np.arange(min(8, test.num_points))),
                          batch_size=batch_size, max_features=max_features)  # compile
  t0 = time.perf_counter()
  scored = training.evaluate_model(
      top_k, test, batch_size=batch_size, max_features=max_features,
      propensities=metrics.propensities(xcdata.label_counts(train), train.num_points))
  predict_seconds = time.perf_counter() - t0
  return {**scored, "train_seconds": result["train_seconds"],
          "predict_seconds": predict_seconds, "steps": result["steps"],
          "auto": result["auto"], "calibration": result["calibration"],
          "neighbours": result["neighbours"], "reranker": result["reranker"]}


RUNNERS: dict[str, Callable[..., dict]] = {
    "slidejax": run_slidejax, "napkinxc": run_napkinxc, "omikuji": run_omikuji}


def compare(train_path: str, test_path: str, *, methods=METHODS, config=None,
            read=xcdata.read_xc, log=print) -> dict:
  """Runs ``methods`` on one train/test pair: ``{method: metrics and seconds}``, or
  ``{method: {"skipped": why}}`` for a package that is not installed."""
  train, test = read(train_path), read(test_path)
  out = {}
  for method in methods:
    if method not in RUNNERS:
      raise ValueError(f"unknown method {method!r}; expected some of {METHODS}")
    log(f"{train_path}: {method} ...")
    try:
      out[method] = RUNNERS[method](train_path, test_path, train, test, config=config)
    except NotInstalled as err:
      out[method] = {"skipped": f"{err} is not installed (pip install 'slidejax[trees]')"}
  return out


def table(results: dict[str, dict]) -> str:
  """A Markdown table of ``{data set: compare(...)}``."""
  lines = ["| data | method | P@1 | P@3 | P@5 | PSP@5 | train s | predict s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, methods in results.items():
    for method, r in methods.items():
      if "skipped" in r:
        lines.append(f"| {name} | {method} | {r['skipped']} |||||||")
        continue
      cells = " | ".join(f"{r[k]:.4f}" for k in SHOWN)
      lines.append(f"| {name} | {method} | {cells} | {r['train_seconds']:.1f} | "
                   f"{r['predict_seconds']:.1f} |")
  return "\n".join(lines)
