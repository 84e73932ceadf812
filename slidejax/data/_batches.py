"""Fixed-shape padded batches over ``XCData``, with explicit truncation accounting.

Truncation policy: a row with more than ``max_features`` entries keeps its ``max_features``
largest-|value| entries (ties: earlier first), in file order; a row with more than
``max_labels`` labels keeps its first ``max_labels``. Every cut is counted in a
``TruncationReport``; nothing is dropped silently.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

import hostops
from slidejax.data._xc import XCData


class Batch(NamedTuple):
  """One padded batch.

  Attributes:
    feature_ids: int32[B, F]; padding entries are id 0 with value 0.0.
    feature_values: float32[B, F].
    label_ids: int32[B, Lmax]; padding is -1.
    rows: int64[B]; the source row of each batch row, -1 for padding rows (no features, no labels).
    num_valid: number of real rows (they come first).
  """
  feature_ids: np.ndarray
  feature_values: np.ndarray
  label_ids: np.ndarray
  rows: np.ndarray
  num_valid: int


class TruncationReport(NamedTuple):
  """What padding to a fixed width cut (over the rows padded so far)."""
  rows_truncated: int = 0  # rows that lost features
  features_dropped: int = 0  # feature entries dropped in all
  labels_dropped: int = 0  # labels dropped in all
  rows_label_truncated: int = 0  # rows that lost labels

  def __add__(self, other):  # element-wise, unlike tuple concatenation
    return TruncationReport(*(a + b for a, b in zip(self, other)))

  def __bool__(self) -> bool:
    return any(self)


class Widths(NamedTuple):
  max_features: int
  max_labels: int


def _check_widths(max_features: int, max_labels: int) -> None:
  if max_features < 1 or max_labels < 1:
    raise ValueError(f"max_features and max_labels must be >= 1, got {max_features}, "
                     f"{max_labels}")


def pad_rows(data: XCData, rows, max_features: int, max_labels: int, *,
             with_report: bool = False):
  """A ``Batch`` of the given rows (int[B]; -1 makes a padding row), see the truncation policy.

  With ``with_report=True`` returns ``(batch, TruncationReport)``.
  """
  _check_widths(max_features, max_labels)
  rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
  if rows.size and rows.max() >= data.num_points:
    raise IndexError(f"row {rows.max()} out of range for {data.num_points} points")
  size = len(rows)
  feature_ids = np.empty((size, max_features), np.int32)
  feature_values = np.empty((size, max_features), np.float32)
  label_ids = np.empty((size, max_labels), np.int32)
  counts = np.zeros(4, np.int64)
  hostops.pad_csr_rows(rows, data.feature_indptr, data.feature_ids, data.feature_values,
                       data.label_indptr, data.label_ids, feature_ids, feature_values, label_ids,
                       counts)
  batch = Batch(feature_ids, feature_values, label_ids, rows, int(np.count_nonzero(rows >= 0)))
  if with_report:
    return batch, TruncationReport(*(int(c) for c in counts))
  return batch


def truncation_report(data: XCData, max_features: int, max_labels: int,
                      rows=None) -> TruncationReport:
  """What padding ``rows`` (default: all) to these widths would cut, without padding them."""
  nnz = np.diff(data.feature_indptr)
  nlab = np.diff(data.label_indptr)
  if rows is not None:
    rows = np.asarray(rows, np.int64)
    nnz, nlab = nnz[rows], nlab[rows]
  extra_features = np.maximum(nnz - max_features, 0)
  extra_labels = np.maximum(nlab - max_labels, 0)
  return TruncationReport(int(np.count_nonzero(extra_features)), int(extra_features.sum()),
                          int(extra_labels.sum()), int(np.count_nonzero(extra_labels)))


def epoch_order(num_points: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """int64[N]: the row order of ``epoch``, a pure function of ``(seed, epoch)``."""
  if not shuffle:
    return np.arange(num_points, dtype=np.int64)
  return np.random.default_rng([seed, epoch]).permutation(num_points).astype(np.int64)


class BatchStream:
  """Iterable over one epoch's padded batches; ``report`` counts what padding cut so far.

  Iterating again restarts the same epoch (same order) and resets ``report``.
  """

  def __init__(self, data: XCData, batch_size: int, *, max_features: int, max_labels: int,
               seed: int, epoch: int = 0, shuffle: bool = True, drop_last: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_widths(max_features, max_labels)
    self.data = data
    self.batch_size = batch_size
    self.max_features = max_features
    self.max_labels = max_labels
    self.order = epoch_order(data.num_points, seed, epoch, shuffle)
    self.drop_last = drop_last
    self.report = TruncationReport()

  def __len__(self) -> int:
    n = self.data.num_points
    return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

  def __iter__(self) -> Iterator[Batch]:
    self.report = TruncationReport()
    for index in range(len(self)):
      rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
      if len(rows) < self.batch_size:
        rows = np.concatenate([rows, np.full(self.batch_size - len(rows), -1, np.int64)])
      batch, cut = pad_rows(self.data, rows, self.max_features, self.max_labels,
                            with_report=True)
      self.report = self.report + cut
      yield batch


def iterate_batches(data: XCData, batch_size: int, *, max_features: int, max_labels: int,
                    seed: int, epoch: int = 0, shuffle: bool = True,
                    drop_last: bool = False) -> BatchStream:
  """A ``BatchStream`` over ``data`` for ``epoch`` (order from ``(seed, epoch)`` only).

  Batches have a fixed shape; the last partial batch is filled with padding rows (``rows``
  -1, no features, no labels) unless ``drop_last``.
  """
  return BatchStream(data, batch_size, max_features=max_features, max_labels=max_labels,
                     seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last)


def _width(lengths: np.ndarray, quantile: float, multiple: int) -> int:
  if lengths.size == 0 or lengths.max() == 0:
    return 1
  top = int(lengths.max())
  q = int(math.ceil(np.quantile(lengths, quantile)))
  width = top if top <= 2 * max(q, 1) else max(q, 1)
  return int(math.ceil(width / multiple) * multiple) if multiple > 1 else width


def suggest_widths(data: XCData, quantile: float = 0.999) -> Widths:
  """``(max_features, max_labels)``: the ``quantile`` of the row lengths, or the maximum when
  that is at most twice as large; features rounded up to a multiple of 8."""
  return Widths(_width(np.diff(data.feature_indptr), quantile, 8),
                _width(np.diff(data.label_indptr), quantile, 1))
