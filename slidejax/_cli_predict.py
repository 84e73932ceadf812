"""``slidejax predict`` and ``slidejax evaluate``: serve a model saved by
:func:`slidejax.checkpoint.save`.

JAX, Flax and orbax are imported inside the run functions, so ``slidejax --help`` stays light.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import warnings

EVAL_KS = (1, 3, 5)


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "predict", help="top-k labels of each row with a saved model",
      description="Writes one line per input row: 'label:score' pairs, best first.")
  p.add_argument("model", metavar="DIR", help="a model directory (slidejax.checkpoint.save)")
  _add_data_options(p)
  p.add_argument("--top-k", type=int, default=5, metavar="K",
                 help="labels per row (default: %(default)s)")
  p.add_argument("--out", required=True, metavar="PREDS", help="predictions file to write")
  p.add_argument("--lsh", action="store_true",
                 help="score each row's LSH candidates only (fast, approximate; rows may get "
                      "fewer than K labels) instead of every label")
  p.set_defaults(func=run_predict)
  e = subparsers.add_parser(
      "evaluate", help="P@k, nDCG@k and PSP@k of a saved model on labelled data",
      description="Exact top-5 of every row, scored against the file's labels. PSP@k needs "
                  "the training label counts in the model's metadata.")
  e.add_argument("model", metavar="DIR", help="a model directory (slidejax.checkpoint.save)")
  _add_data_options(e)
  e.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
  e.set_defaults(func=run_evaluate)


def _add_data_options(p) -> None:
  p.add_argument("--data", required=True, metavar="FILE",
                 help="input rows (XC text format or svmlight)")
  p.add_argument("--format", choices=("xc", "svmlight"), default=None,
                 help="input format (default: xc when the first line is an 'N D L' header, "
                      "else svmlight)")
  p.add_argument("--strict", action="store_true", help="treat data warnings as errors")
  p.add_argument("--batch-size", type=int, default=256, metavar="N",
                 help="rows per compiled call (default: %(default)s)")
  p.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------------- commands


def run_predict(args) -> int:
  return _guarded("predict", _predict, args)


def run_evaluate(args) -> int:
  return _guarded("evaluate", _evaluate, args)


def _guarded(command: str, body, args) -> int:
  """Runs ``body(args)``; a bad model, data file or option ends in one line and exit code 2."""
  try:
    if args.batch_size < 1:
      raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    return body(args)
  except (ValueError, OSError) as err:  # ModelFileError and XCFormatError are ValueErrors
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"slidejax {command}: error: {message}", file=sys.stderr)
    return 2


def _predict(args) -> int:
  import numpy as np
  if args.top_k < 1:
    raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
  model, _ = _load_model(args)
  if args.top_k > model.num_labels:
    raise ValueError(f"--top-k {args.top_k} is more than the model's {model.num_labels} labels")
  if args.lsh and not _has_tables(model):
    raise ValueError(f"--lsh: the model in {args.model} has no LSH tables (a dense output or "
                     "a sampler other than lsh); predict without --lsh")
  data = _read_data(args, model, check_labels=False)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  try:
    timing = {}
    with open(tmp, "w") as f:
      for scores, ids in _top_k_batches(model, data, args, args.top_k, exact=not args.lsh,
                                        timing=timing):
        f.writelines(_format_line(s, i, model.num_labels) + "\n"
                     for s, i in zip(scores, ids.astype(np.int64)))
    os.replace(tmp, out)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  latency = ""
  if timing.get("rows"):
    latency = (f" ({1e3 * timing['seconds'] / timing['rows']:.3f} ms per row in batches of "
               f"{min(args.batch_size, data.num_points)}, after the first batch)")
  print(f"wrote {data.num_points} rows of top-{args.top_k} "
        f"{'LSH' if args.lsh else 'exact'} predictions to {out}{latency}", file=sys.stderr)
  return 0


def _evaluate(args) -> int:
  import numpy as np

  from slidejax import metrics
  model, info = _load_model(args)
  propensities = _propensities(args.model, info.get("metadata", {}), model.num_labels)
  data = _read_data(args, model, check_labels=True)
  k = min(max(EVAL_KS), model.num_labels)
  top = np.full((data.num_points, max(EVAL_KS)), -1, np.int64)   # -1 columns never hit
  start = 0
  for _, ids in _top_k_batches(model, data, args, k, exact=True):
    top[start:start + len(ids), :k] = ids
    start += len(ids)
  result = metrics.evaluate(top, (data.label_indptr, data.label_ids), ks=EVAL_KS,
                            propensities=propensities)
  print("  ".join(f"{name}={value:.4f}" for name, value in result.items())
        + f"  points={data.num_points}")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(result, num_points=data.num_points), indent=1) + "\n")
  return 0


# ------------------------------------------------------------------------------------ pieces


def _load_model(args):
  """(model, model.json contents) of ``args.model``; a library model with ``top_k``."""
  from slidejax import checkpoint
  info = checkpoint.read_info(args.model)
  if info["spec"] is None:
    raise checkpoint.ModelFileError(f"{args.model}: holds a custom model (no spec); load it "
                                    "with slidejax.checkpoint.load(..., model=) instead")
  return checkpoint.load(args.model), info


def _has_tables(model) -> bool:
  """Whether any SlideDense layer of ``model`` selects through LSH tables."""
  from flax import nnx

  from slidejax.nn import SlideDense
  return any(isinstance(node, SlideDense) and node.uses_tables
             for _, node in nnx.iter_graph(model))


def _propensities(directory, metadata: dict, num_labels: int):
  """float64 ``[num_labels]`` label propensities from the training counts in the metadata,
  or None (PSP@k omitted, said on stderr) when they are absent."""
  import numpy as np

  from slidejax import metrics
  counts, points = metadata.get("label_counts"), metadata.get("num_train_points")
  if counts is None or points is None:
    print(f"slidejax evaluate: {directory} has no training label counts "
          "(metadata label_counts, num_train_points): PSP@k omitted", file=sys.stderr)
    return None
  try:
    counts = np.asarray(counts, np.float64)
    points = int(points)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{directory}: bad metadata label_counts/num_train_points: {err}") from err
  if counts.shape != (num_labels,) or points < 1:
    raise ValueError(f"{directory}: metadata label_counts has shape {list(counts.shape)} and "
                     f"num_train_points {points}; the model has {num_labels} labels")
  return metrics.propensities(counts, points)


def _detect_format(path) -> str:
  """``xc`` when the first line is a 3-integer header, else ``svmlight`` (as ``read_auto``)."""
  with open(path, "rb") as f:
    first = f.readline(4096).split()
  return "xc" if len(first) == 3 and all(p.isdigit() for p in first) else "svmlight"


def _read_data(args, model, *, check_labels: bool):
  """The rows of ``args.data``; ids beyond the model are refused with the file and line of
  the first such row."""
  from slidejax import data as xcdata
  fmt = args.format or _detect_format(args.data)
  read = xcdata.read_xc if fmt == "xc" else xcdata.read_svmlight
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", xcdata.XCFormatWarning)
    data = read(args.data, strict=args.strict)
  for w in caught:
    if issubclass(w.category, xcdata.XCFormatWarning):
      print(f"slidejax: warning: {w.message}", file=sys.stderr)
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  first_line = 2 if fmt == "xc" else 1   # the XC header is line 1
  _check_ids(args.data, first_line, data.feature_indptr, data.feature_ids, model.num_features,
             "feature")
  if check_labels:
    _check_ids(args.data, first_line, data.label_indptr, data.label_ids, model.num_labels,
               "label")
  return data


def _check_ids(path, first_line: int, indptr, ids, limit: int, kind: str) -> None:
  """Raises ValueError ``PATH:LINE: {kind} id X >= the model's N {kind}s`` for the first
  row holding an id >= ``limit``."""
  import numpy as np
  bad = np.flatnonzero(ids >= limit)
  if bad.size == 0:
    return
  position = int(bad[0])
  row = int(np.searchsorted(indptr, position, side="right")) - 1
  raise ValueError(f"{path}:{first_line + row}: {kind} id {int(ids[position])} >= the model's "
                   f"{limit} {kind}s")


def _top_k_batches(model, data, args, k: int, *, exact: bool, timing: dict | None = None):
  """Yields (scores float32 ``[n, k]``, ids int ``[n, k]``) per batch of rows, in order.

  Every batch is padded to one shape (``--batch-size`` rows, the widest row's features), so a
  single compiled call serves the whole file. ``timing`` collects ``seconds`` and ``rows`` of
  the model calls after the first batch (which compiles).
  """
  import time

  import jax
  import numpy as np
  from flax import nnx
  from tqdm.auto import tqdm

  from slidejax import data as xcdata
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, feature_ids, feature_values):
    return nnx.merge(graphdef, state).top_k(feature_ids, feature_values, k, exact=exact)

  batch_size = max(1, min(args.batch_size, data.num_points))
  width = max(1, int(np.diff(data.feature_indptr).max(initial=0)))
  with tqdm(total=data.num_points, unit="rows", disable=args.no_progress, file=sys.stderr,
            dynamic_ncols=True) as bar:
    for start in range(0, data.num_points, batch_size):
      rows = np.arange(start, min(start + batch_size, data.num_points), dtype=np.int64)
      padded = np.concatenate([rows, np.full(batch_size - len(rows), -1, np.int64)])
      batch = xcdata.pad_rows(data, padded, max_features=width, max_labels=1)
      t0 = time.perf_counter()
      scores, ids = jax.block_until_ready(predict(state, batch.feature_ids,
                                                  batch.feature_values))
      if timing is not None and start > 0:
        timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - t0
        timing["rows"] = timing.get("rows", 0) + len(rows)
      yield np.asarray(scores)[:len(rows)], np.asarray(ids)[:len(rows)]
      bar.update(len(rows))


def _format_line(scores, ids, num_labels: int) -> str:
  """``label:score`` pairs (float32 shortest round-trip decimals), slots without a label
  (id ``num_labels``, an LSH row with fewer candidates than k) left out."""
  return " ".join(f"{label}:{score!s}" for score, label in zip(scores, ids)
                  if label < num_labels)
