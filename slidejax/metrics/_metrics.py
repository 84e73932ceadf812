"""Ranking metrics for extreme classification: P@k, nDCG@k, PSP@k (NumPy).

Conventions:
  * ``top_ids`` int[n, >=k]: ranked predictions, best first. A repeated prediction within a
    row counts once (later copies are misses); negative ids never hit.
  * ``labels``: a padded int array [n, Lmax] (-1 = padding) or a CSR pair ``(indptr, ids)``.
  * Rows with no labels stay in every denominator (as in the XC repository): they score 0
    for P@k and nDCG@k.
  * P@k divides the hits in the top k by k. nDCG@k divides DCG@k by the ideal DCG over
    ``min(k, |y|)`` labels. PSP@k is the propensity-weighted P@k summed over rows, divided
    by the best achievable sum (each row's ``min(k, |y|)`` largest ``1/p_l``), as in the XC
    repository's code.
"""
from __future__ import annotations

import numpy as np


def _as_csr(labels, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(indptr int64[n+1], ids int64[m]) from either label representation."""
  if isinstance(labels, tuple):
    indptr, ids = labels
    indptr = np.asarray(indptr, np.int64)
    if indptr.shape != (num_rows + 1,):
      raise ValueError(f"label indptr has shape {indptr.shape}, expected ({num_rows + 1},)")
    return indptr - indptr[0], np.asarray(ids, np.int64)[indptr[0]:indptr[-1]]
  padded = np.asarray(labels)
  if padded.ndim != 2 or padded.shape[0] != num_rows:
    raise ValueError(f"padded labels must be [{num_rows}, Lmax], got {padded.shape}")
  valid = padded >= 0
  indptr = np.zeros(num_rows + 1, np.int64)
  np.cumsum(valid.sum(axis=1), out=indptr[1:])
  return indptr, padded[valid].astype(np.int64)


def _check_top(top_ids, k: int) -> np.ndarray:
  top = np.asarray(top_ids)
  if top.ndim != 2 or top.shape[1] < k or k < 1:
    raise ValueError(f"top_ids must be [n, >= k] with k >= 1; got shape {top.shape}, k={k}")
  return top[:, :k].astype(np.int64)


def _hits(top: np.ndarray, indptr: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """bool[n, k]: whether each prediction is a true label (first occurrence only)."""
  n, k = top.shape
  if n == 0:
    return np.zeros((0, k), bool)
  modulus = max(int(top.max(initial=0)), int(ids.max(initial=0))) + 1
  label_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
  true_keys = np.unique(label_rows * modulus + ids)
  pred_keys = np.arange(n, dtype=np.int64)[:, None] * modulus + top
  hits = np.isin(pred_keys, true_keys) & (top >= 0)
  for j in range(1, k):  # a repeated prediction is not a second hit
    hits[:, j] &= ~np.any(top[:, :j] == top[:, j:j + 1], axis=1)
  return hits


def _unique_counts(indptr, ids) -> np.ndarray:
  """int64[n]: distinct labels per row."""
  n = len(indptr) - 1
  rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
  modulus = int(ids.max(initial=0)) + 1
  keys = np.unique(rows * modulus + ids)
  return np.bincount(keys // modulus, minlength=n).astype(np.int64)


def precision_at_k(top_ids, labels, k: int) -> float:
  """Mean over rows of |top-k ∩ y| / k."""
  top = _check_top(top_ids, k)
  if len(top) == 0:
    return 0.0
  indptr, ids = _as_csr(labels, len(top))
  return float(_hits(top, indptr, ids).sum() / (k * len(top)))


def _discounts(k: int) -> np.ndarray:
  return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def ndcg_at_k(top_ids, labels, k: int) -> float:
  """Mean over rows of DCG@k / ideal DCG@k (rows without labels score 0)."""
  top = _check_top(top_ids, k)
  if len(top) == 0:
    return 0.0
  indptr, ids = _as_csr(labels, len(top))
  discounts = _discounts(k)
  dcg = _hits(top, indptr, ids) @ discounts
  ideal_cumulative = np.concatenate([[0.0], np.cumsum(discounts)])
  ideal = ideal_cumulative[np.minimum(_unique_counts(indptr, ids), k)]
  scores = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
  return float(scores.mean())


def propensities(label_counts, num_points: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
  """float64[L] propensity of each label (Jain, Prabhu, Varma, KDD 2016).

  ``p_l = 1 / (1 + C (n_l + b)^-a)`` with ``C = (log N - 1) (b + 1)^a``.
  """
  counts = np.asarray(label_counts, np.float64)
  c = (np.log(num_points) - 1.0) * (b + 1.0) ** a
  return 1.0 / (1.0 + c * (counts + b) ** -a)


def _best_weight_sums(indptr, ids, weights, k) -> np.ndarray:
  """float64[n]: per row, the sum of the ``min(k, |y|)`` largest weights of its labels."""
  n = len(indptr) - 1
  rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
  modulus = int(ids.max(initial=0)) + 1
  keys = np.unique(rows * modulus + ids)  # distinct (row, label) pairs
  rows, ids = keys // modulus, keys % modulus
  w = weights[ids]
  order = np.lexsort((-w, rows))
  rows, w = rows[order], w[order]
  starts = np.searchsorted(rows, rows, side="left")
  rank = np.arange(len(rows)) - starts
  keep = rank < k
  return np.bincount(rows[keep], w[keep], minlength=n)


def psprecision_at_k(top_ids, labels, k: int, propensities) -> float:
  """Propensity-scored P@k, normalised by the best achievable value (XC repository)."""
  top = _check_top(top_ids, k)
  if len(top) == 0:
    return 0.0
  indptr, ids = _as_csr(labels, len(top))
  weights = 1.0 / np.asarray(propensities, np.float64)
  hits = _hits(top, indptr, ids)
  gained = np.where(hits, weights[np.where(hits, top, 0)], 0.0).sum()
  best = _best_weight_sums(indptr, ids, weights, k).sum()
  return float(gained / best) if best > 0 else 0.0


def evaluate(top_ids, labels, ks=(1, 3, 5), propensities=None) -> dict[str, float]:
  """``{"p@k", "ndcg@k"[, "psp@k"]}`` for each k in ``ks`` (PSP only with propensities)."""
  top = np.asarray(top_ids)
  labels = labels if isinstance(labels, tuple) else np.asarray(labels)
  result = {}
  for k in ks:
    result[f"p@{k}"] = precision_at_k(top, labels, k)
  for k in ks:
    result[f"ndcg@{k}"] = ndcg_at_k(top, labels, k)
  if propensities is not None:
    for k in ks:
      result[f"psp@{k}"] = psprecision_at_k(top, labels, k, propensities)
  return result
