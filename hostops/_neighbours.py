"""Nearest training rows by cosine similarity of sparse rows, and their labels' votes.

The index holds the training rows twice: inverted (feature -> the rows holding it), so a
query visits only rows it shares a feature with, and as rows (L2-normalised), so each of
those gets its exact similarity.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _worse(score_a, id_a, score_b, id_b) -> bool:
  """Whether (score_a, id_a) ranks below (score_b, id_b): lower score, then higher id."""
  return score_a < score_b or (score_a == score_b and id_a > id_b)


@numba.njit(cache=True)
def _sift_down(scores, ids, size, at) -> None:
  """Restores a min-heap (worst at the root) of ``size`` entries below ``at``."""
  while True:
    child = 2 * at + 1
    if child >= size:
      return
    if child + 1 < size and _worse(scores[child + 1], ids[child + 1], scores[child],
                                   ids[child]):
      child += 1
    if not _worse(scores[child], ids[child], scores[at], ids[at]):
      return
    scores[at], scores[child] = scores[child], scores[at]
    ids[at], ids[child] = ids[child], ids[at]
    at = child


@numba.njit(cache=True)
def _keep_best(scores, ids, size, capacity, score, entry) -> int:
  """Offers (score, entry) to a heap of at most ``capacity``; returns its new size."""
  if size < capacity:
    at = size
    scores[at], ids[at] = score, entry
    while at > 0:   # sift up
      parent = (at - 1) // 2
      if not _worse(scores[at], ids[at], scores[parent], ids[parent]):
        break
      scores[at], scores[parent] = scores[parent], scores[at]
      ids[at], ids[parent] = ids[parent], ids[at]
      at = parent
    return size + 1
  if _worse(scores[0], ids[0], score, entry):
    scores[0], ids[0] = score, entry
    _sift_down(scores, ids, size, 0)
  return size


@numba.njit(cache=True)
def _sorted_best(scores, ids, size):
  """The heap's entries best first (by score, then lower id)."""
  order = np.empty(size, np.int64)
  for i in range(size):
    order[i] = i
  for i in range(1, size):   # insertion sort: size is small (k or the output width)
    j = i
    while j > 0 and _worse(scores[order[j - 1]], ids[order[j - 1]], scores[order[j]],
                           ids[order[j]]):
      order[j - 1], order[j] = order[j], order[j - 1]
      j -= 1
  return order


@numba.njit(parallel=True, cache=True)
def neighbour_votes(query_ids, query_values, post_indptr, post_rows, row_indptr, row_ids,
                    row_values, label_indptr, label_ids, num_labels, k, power, width, max_list,
                    threads):
  """Each query's ``k`` most similar index rows among its candidates, and its ``width``
  best-voted labels.

  A query's candidates are the rows that hold one of its features whose row list is at most
  ``max(max_list, its shortest list)`` long (a word held by most rows adds little to a cosine
  and would make every query visit them all); each candidate's similarity is exact.

  Args:
    query_ids: int32 ``[B, F]`` feature ids (-1 or ``>= D`` pads); query_values: float32
      ``[B, F]`` (a query's scale changes neither its neighbours nor its votes).
    post_indptr: int ``[D + 1]``, post_rows: int32: the rows holding feature ``f`` at
      ``[post_indptr[f], post_indptr[f + 1])``.
    row_indptr: int ``[N + 1]``; row_ids: int32, row_values: float32: the index rows,
      L2-normalised.
    label_indptr: int ``[N + 1]``, label_ids: int32: the index rows' labels.
    k: neighbours per query; power: each neighbour votes ``similarity ** power`` for each of
      its labels; width: labels kept per query; threads: ``numba.get_num_threads()``.
  Returns:
    (label ids int32 ``[B, width]``, -1 past the voted ones; votes float32 ``[B, width]``,
    summing to 1 over a query's voted labels, 0 for none), best first (ties: lower id).
  """
  batch, num_rows = query_ids.shape[0], label_indptr.shape[0] - 1
  num_features = post_indptr.shape[0] - 1
  out_ids = np.full((batch, width), -1, np.int32)
  out_votes = np.zeros((batch, width), np.float32)
  per_thread = -(-batch // threads)
  for t in numba.prange(threads):
    query = np.zeros(num_features, np.float32)       # per-thread buffers, reset after use
    seen = np.zeros(num_rows, np.int32)              # the query (its number + 1) that saw a row
    touched = np.empty(num_rows, np.int32)
    votes = np.zeros(num_labels, np.float32)
    voted = np.empty(num_labels, np.int32)
    near_scores = np.empty(max(k, 1), np.float32)
    near_ids = np.empty(max(k, 1), np.int32)
    top_scores = np.empty(max(width, 1), np.float32)
    top_ids = np.empty(max(width, 1), np.int32)
    for b in range(t * per_thread, min(batch, (t + 1) * per_thread)):
      num_touched = _candidates(query_ids[b], query_values[b], b + 1, post_indptr, post_rows,
                                max_list, query, seen, touched)
      size = _nearest(touched[:num_touched], query, row_indptr, row_ids, row_values, k,
                      near_scores, near_ids)
      for f in query_ids[b]:
        if 0 <= f < num_features:
          query[f] = 0.0
      _vote(near_scores[:size], near_ids[:size], power, label_indptr, label_ids, votes, voted,
            top_scores, top_ids, out_ids[b], out_votes[b])
  return out_ids, out_votes


@numba.njit(cache=True)
def _candidates(ids, values, stamp, post_indptr, post_rows, max_list, query, seen, touched):
  """Fills ``query`` (dense, zero before) with one query's values and ``touched`` with its
  candidate rows (``seen`` marks them with ``stamp``); returns how many there are."""
  num_features = post_indptr.shape[0] - 1
  shortest = -1
  for j in range(ids.shape[0]):
    f = ids[j]
    if 0 <= f < num_features and values[j] != 0:
      query[f] += values[j]
      length = post_indptr[f + 1] - post_indptr[f]
      if shortest < 0 or length < shortest:
        shortest = length
  longest = max(max_list, shortest)
  num_touched = 0
  for j in range(ids.shape[0]):
    f = ids[j]
    if f < 0 or f >= num_features or values[j] == 0:
      continue
    if post_indptr[f + 1] - post_indptr[f] > longest:
      continue
    for p in range(post_indptr[f], post_indptr[f + 1]):
      row = post_rows[p]
      if seen[row] != stamp:
        seen[row] = stamp
        touched[num_touched] = row
        num_touched += 1
  return num_touched


@numba.njit(cache=True)
def _nearest(candidates, query, row_indptr, row_ids, row_values, k, near_scores, near_ids):
  """The ``k`` candidates of highest positive similarity to ``query`` into the heap
  (``near_scores``, ``near_ids``); returns its size."""
  size = 0
  for row in candidates:
    similarity = np.float32(0.0)
    for p in range(row_indptr[row], row_indptr[row + 1]):
      similarity += query[row_ids[p]] * row_values[p]
    if similarity > 0.0:
      size = _keep_best(near_scores, near_ids, size, k, similarity, row)
  return size


@numba.njit(cache=True)
def _vote(near_scores, near_ids, power, label_indptr, label_ids, votes, voted, top_scores,
          top_ids, out_ids, out_votes):
  """The neighbours' votes, the ``len(out_ids)`` best labels and their shares into
  ``out_ids`` / ``out_votes`` (``votes``, zero before, is left zero)."""
  num_voted, total = 0, 0.0
  for i in range(near_ids.shape[0]):
    weight = near_scores[i] ** power
    row = near_ids[i]
    for p in range(label_indptr[row], label_indptr[row + 1]):
      label = label_ids[p]
      if votes[label] == 0.0:
        voted[num_voted] = label
        num_voted += 1
      votes[label] += weight
      total += weight
  kept = 0
  for i in range(num_voted):
    label = voted[i]
    if votes[label] > 0.0:
      kept = _keep_best(top_scores, top_ids, kept, out_ids.shape[0], votes[label], label)
    votes[label] = 0.0
  order = _sorted_best(top_scores, top_ids, kept)
  for i in range(kept):
    out_ids[i] = top_ids[order[i]]
    out_votes[i] = top_scores[order[i]] / total


def index_rows(indptr: np.ndarray, ids: np.ndarray, values: np.ndarray, num_features: int):
  """CSR rows (int ``[N + 1]``, int32 and float32 ``[nnz]``) -> what ``neighbour_votes``
  reads of them: (post_indptr ``[D + 1]``, post_rows; row_indptr ``[N + 1]``, row_ids,
  row_values), int32 offsets, each row L2-normalised (ids outside ``[0, D)`` and zeros
  dropped)."""
  num_rows = len(indptr) - 1
  rows = np.repeat(np.arange(num_rows, dtype=np.int32), np.diff(indptr))
  ids, values = np.asarray(ids), np.asarray(values, np.float32)
  keep = (values != 0) & (ids >= 0) & (ids < num_features)
  ids, rows, values = ids[keep].astype(np.int32), rows[keep], values[keep]
  norms = np.sqrt(np.bincount(rows, weights=values.astype(np.float64) ** 2,
                              minlength=num_rows))
  values = (values / norms[rows]).astype(np.float32)
  row_indptr = np.zeros(num_rows + 1, np.int32)
  np.cumsum(np.bincount(rows, minlength=num_rows), out=row_indptr[1:])
  by_feature = np.lexsort((rows, ids))
  post_indptr = np.zeros(num_features + 1, np.int32)
  np.cumsum(np.bincount(ids, minlength=num_features), out=post_indptr[1:])
  return post_indptr, rows[by_feature], row_indptr, ids, values


def warmup() -> None:
  """Compiles ``neighbour_votes`` on tiny inputs (writable, and read-only as a callback
  passes them; cached on disk by Numba)."""
  index = index_rows(np.array([0, 1, 2], np.int64), np.array([0, 1], np.int32),
                     np.array([1.0, 1.0], np.float32), 2)
  arrays = (np.array([[0, -1]], np.int32), np.array([[1.0, 0.0]], np.float32), *index,
            np.array([0, 1, 2], np.int32), np.array([0, 1], np.int32))
  frozen = tuple(a.copy() for a in arrays)
  for a in frozen:
    a.setflags(write=False)
  for given in (arrays, frozen):
    neighbour_votes(*given, 2, 1, 1.0, 2, 4, numba.get_num_threads())
