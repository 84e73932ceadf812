"""``slidejax data``: ``stats`` (read a file, print its statistics) and ``synth`` (write one)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings

import numpy as np

from slidejax._cli_train import PRESETS

_QUANTILES = (("min", 0.0), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("90%", 0.9),
              ("99%", 0.99), ("max", 1.0))


def add_parser(subparsers) -> None:
  data = subparsers.add_parser("data", help="inspect, convert and synthesize data sets")
  sub = data.add_subparsers(dest="data_command", required=True)

  stats = sub.add_parser("stats", help="read a data file and print its statistics")
  stats.add_argument("path")
  stats.add_argument("--format", choices=("xc", "svmlight", "auto"), default="auto",
                     help="xc: header 'N D L'; svmlight: no header (default: auto-detect)")
  stats.add_argument("--json", metavar="OUT", help="also write the statistics as JSON")
  stats.add_argument("--strict", action="store_true", help="treat format warnings as errors")
  stats.set_defaults(func=run_stats)

  synth = sub.add_parser("synth", help="write a synthetic data set in XC text format")
  synth.add_argument("--out", required=True, metavar="PATH")
  synth.add_argument("--preset", default="default", choices=PRESETS,
                     help="a name from slidejax.data.SYNTH_PRESETS (default: default)")
  synth.add_argument("--points", type=int, metavar="N", help="training points (overrides)")
  synth.add_argument("--features", type=int, metavar="D")
  synth.add_argument("--labels", type=int, metavar="L")
  synth.add_argument("--nnz", type=float, metavar="K", help="average nonzeros per point")
  synth.add_argument("--labels-per-point", type=float, metavar="C")
  synth.add_argument("--seed", type=int, default=0)
  synth.add_argument("--test-out", metavar="PATH", help="also write a test split here")
  synth.add_argument("--test-points", type=int, metavar="N",
                     help="test points (default: from the preset's test_fraction)")
  synth.add_argument("--no-progress", action="store_true")
  synth.set_defaults(func=run_synth)


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read(path: str, fmt: str, strict: bool):
  from slidejax import data as xcdata
  if fmt == "xc":
    return xcdata.read_xc(path, strict=strict)
  if fmt == "svmlight":
    return xcdata.read_svmlight(path, strict=strict)
  return xcdata.read_auto(path, strict=strict)


def compute_stats(data) -> dict:
  """The statistics ``data stats`` prints, as a JSON-ready dict."""
  from slidejax import data as xcdata
  n = data.num_points
  counts = xcdata.label_counts(data)
  present = counts[counts > 0]
  quantiles = {name: float(np.quantile(present, q)) if present.size else 0.0
               for name, q in _QUANTILES}
  return {
      "points": n,
      "features": data.num_features,
      "labels": data.num_labels,
      "nnz": int(len(data.feature_ids)),
      "label_entries": int(len(data.label_ids)),
      "avg_labels": len(data.label_ids) / n if n else 0.0,
      "avg_nnz": len(data.feature_ids) / n if n else 0.0,
      "labels_present": int(present.size),
      "features_present": int(np.count_nonzero(xcdata.feature_counts(data))),
      "label_frequency_quantiles": quantiles,
      "points_without_labels": int(np.count_nonzero(xcdata.row_num_labels(data) == 0)),
      "points_without_features": int(np.count_nonzero(xcdata.row_nnz(data) == 0)),
  }


def _print_stats(path: str, stats: dict) -> None:
  print(f"{path}")
  print(f"  points     {stats['points']}")
  print(f"  features   {stats['features']} ({stats['features_present']} occur)")
  print(f"  labels     {stats['labels']} ({stats['labels_present']} occur)")
  print(f"  avg labels per point     {stats['avg_labels']:.3f}")
  print(f"  avg nonzeros per point   {stats['avg_nnz']:.2f}")
  q = stats["label_frequency_quantiles"]
  print("  label frequency (points per occurring label): "
        + "  ".join(f"{k}={v:g}" for k, v in q.items()))
  print(f"  points with no labels    {stats['points_without_labels']}")
  print(f"  points with no features  {stats['points_without_features']}")
  print(f"  read in {stats['read_seconds']:.2f} s, peak RSS {stats['peak_rss_mib']:.0f} MiB")


def run_stats(args) -> int:
  from slidejax import data as xcdata
  start = time.perf_counter()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", xcdata.XCFormatWarning)
      data = _read(args.path, args.format, args.strict)
    read_seconds = time.perf_counter() - start
  except (xcdata.XCFormatError, OSError) as err:
    print(f"slidejax data stats: error: {err}", file=sys.stderr)
    return 2
  for warning in caught:
    print(f"warning: {warning.message}", file=sys.stderr)
  if data.num_points == 0:   # as `train` refuses it: nothing to describe
    what = "the file is empty" if os.path.getsize(args.path) == 0 else "no data rows"
    print(f"slidejax data stats: error: {args.path}: {what} (0 points)", file=sys.stderr)
    return 2
  stats = compute_stats(data)
  stats["read_seconds"] = read_seconds
  stats["peak_rss_mib"] = peak_rss_mib()
  _print_stats(args.path, stats)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(stats, f, indent=2)
  return 0


def _synth_settings(args) -> tuple[dict, int]:
  """(synthesize kwargs with num_points = train + test, number of test points)."""
  from slidejax import data as xcdata
  if args.preset not in xcdata.SYNTH_PRESETS:
    raise ValueError(f"unknown preset {args.preset!r}; choose from "
                     f"{', '.join(sorted(xcdata.SYNTH_PRESETS))}")
  settings = dict(xcdata.SYNTH_PRESETS[args.preset])
  test_fraction = settings.pop("test_fraction", 0.0)
  preset_test = int(round(settings["num_points"] * test_fraction))
  train_points = settings["num_points"] - preset_test
  for key, value in (("num_features", args.features), ("num_labels", args.labels),
                     ("avg_nnz", args.nnz), ("avg_labels", args.labels_per_point)):
    if value is not None:
      settings[key] = value
  if args.points is not None:
    train_points = args.points
  test_points = 0
  if args.test_out:
    test_points = args.test_points if args.test_points is not None else preset_test
  settings["num_points"] = train_points + test_points
  return settings, test_points


def _write(path: str, data, show_progress: bool) -> None:
  from slidejax import data as xcdata
  if not show_progress:
    xcdata.write_xc(path, data)
    return
  from tqdm import tqdm
  with tqdm(total=data.num_points, desc=f"writing {path}", unit="rows", file=sys.stderr) as bar:
    xcdata.write_xc(path, data, progress=bar.update)


def run_synth(args) -> int:
  from slidejax import data as xcdata
  try:
    settings, test_points = _synth_settings(args)
    start = time.perf_counter()
    data = xcdata.synthesize(**settings, seed=args.seed)
    seconds = time.perf_counter() - start
    train, test = xcdata.split_rows(data, test_points) if test_points else (data, None)
    large = data.num_points >= 20_000 and not args.no_progress
    _write(args.out, train, large)
    if test is not None:
      _write(args.test_out, test, large)
  except (ValueError, OSError) as err:
    print(f"slidejax data synth: error: {err}", file=sys.stderr)
    return 2
  print(f"synthesized {data.num_points} points in {seconds:.1f} s: wrote {train.num_points} "
        f"to {args.out}" + (f" and {test.num_points} to {args.test_out}" if test else ""))
  return 0

