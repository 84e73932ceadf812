"""Recall of ``slidejax predict --lsh`` against exact predictions, and P@k of both.

Usage: ``python examples/compare_predictions.py EXACT_PREDS LSH_PREDS DATA``: reads two
prediction files of ``slidejax predict`` (same rows, same ``--top-k``) and the data file
they were made from, and prints recall@1 and recall@k (share of the exact top-k labels that
the LSH line also lists) and P@1 / P@k of each file.
"""
from __future__ import annotations

import sys

import numpy as np

from slidejax import data as xcdata
from slidejax import metrics


def read_predictions(path: str) -> list[list[int]]:
  with open(path) as f:
    return [[int(pair.split(":")[0]) for pair in line.split()] for line in f]


def main(exact_path: str, lsh_path: str, data_path: str) -> dict:
  exact, lsh = read_predictions(exact_path), read_predictions(lsh_path)
  if len(exact) != len(lsh):
    raise SystemExit(f"{exact_path} has {len(exact)} lines, {lsh_path} {len(lsh)}")
  k = max(len(row) for row in exact)
  data = xcdata.read_auto(data_path)
  result = {"rows": len(exact), "k": k}
  result["recall@1"] = float(np.mean([row[:1] == other[:1] for row, other in zip(exact, lsh)]))
  result[f"recall@{k}"] = float(np.mean([len(set(row) & set(other)) / max(len(row), 1)
                                         for row, other in zip(exact, lsh)]))
  for name, rows in (("exact", exact), ("lsh", lsh)):
    top = np.full((len(rows), k), -1, np.int64)
    for i, row in enumerate(rows):
      top[i, :len(row)] = row
    scores = metrics.evaluate(top, (data.label_indptr, data.label_ids), ks=(1, k))
    result[f"{name} p@1"], result[f"{name} p@{k}"] = scores["p@1"], scores[f"p@{k}"]
  print("  ".join(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                  for key, value in result.items()))
  return result


if __name__ == "__main__":
  if len(sys.argv) != 4:
    raise SystemExit(__doc__)
  main(*sys.argv[1:])
