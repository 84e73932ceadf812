"""Padded fixed-shape batches: shapes, padding, truncation accounting, epoch order."""
from __future__ import annotations

import numpy as np
import pytest

from slidejax import data as xcdata


def make_data(seed=0, num_points=53):
  rng = np.random.default_rng(seed)
  nnz = rng.integers(0, 12, num_points)
  nlab = rng.integers(0, 6, num_points)
  f_ids = np.concatenate([rng.choice(40, n, replace=False) for n in nnz]).astype(np.int32)
  values = rng.normal(size=nnz.sum()).astype(np.float32)
  l_ids = np.concatenate([rng.choice(20, n, replace=False) for n in nlab]).astype(np.int32)
  return xcdata.XCData(np.concatenate([[0], np.cumsum(nnz)]), f_ids, values,
                       np.concatenate([[0], np.cumsum(nlab)]), l_ids, num_points, 40, 20)


def reference_row(data, r, max_features, max_labels):
  """Brute-force padding of one row, following the documented truncation policy."""
  a, b = data.feature_indptr[r], data.feature_indptr[r + 1]
  ids, values = data.feature_ids[a:b], data.feature_values[a:b]
  if len(ids) > max_features:
    ranked = sorted(range(len(ids)), key=lambda j: (-abs(values[j]), j))[:max_features]
    keep = sorted(ranked)
    ids, values = ids[keep], values[keep]
  f = np.zeros(max_features, np.int32)
  v = np.zeros(max_features, np.float32)
  f[:len(ids)], v[:len(ids)] = ids, values
  labels = data.label_ids[data.label_indptr[r]:data.label_indptr[r + 1]][:max_labels]
  lab = np.full(max_labels, -1, np.int32)
  lab[:len(labels)] = labels
  return f, v, lab


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_the_epoch(drop_last):
  data = make_data()
  stream = xcdata.iterate_batches(data, 8, max_features=6, max_labels=3, seed=1, epoch=0,
                                  drop_last=drop_last)
  batches = list(stream)
  assert len(batches) == len(stream) == (6 if drop_last else 7)
  for batch in batches:
    assert batch.feature_ids.shape == (8, 6) and batch.feature_ids.dtype == np.int32
    assert batch.feature_values.shape == (8, 6) and batch.feature_values.dtype == np.float32
    assert batch.label_ids.shape == (8, 3) and batch.label_ids.dtype == np.int32
    assert batch.rows.shape == (8,) and batch.rows.dtype == np.int64
    assert batch.num_valid == np.count_nonzero(batch.rows >= 0)
    assert np.all(batch.rows[:batch.num_valid] >= 0) and np.all(batch.rows[batch.num_valid:] < 0)
  rows = np.concatenate([b.rows for b in batches])
  valid = rows[rows >= 0]
  assert len(np.unique(valid)) == len(valid) == (48 if drop_last else 53)
  if not drop_last:
    last = batches[-1]
    assert last.num_valid == 5
    assert np.all(last.feature_ids[5:] == 0) and np.all(last.feature_values[5:] == 0)
    assert np.all(last.label_ids[5:] == -1)


def test_padding_and_truncation_match_reference():
  data = make_data(seed=2)
  stream = xcdata.iterate_batches(data, 16, max_features=5, max_labels=2, seed=0)
  for batch in stream:
    for i, r in enumerate(batch.rows):
      if r < 0:
        continue
      f, v, lab = reference_row(data, r, 5, 2)
      np.testing.assert_array_equal(batch.feature_ids[i], f)
      np.testing.assert_array_equal(batch.feature_values[i], v)
      np.testing.assert_array_equal(batch.label_ids[i], lab)
  nnz, nlab = xcdata.row_nnz(data), xcdata.row_num_labels(data)
  expected = xcdata.TruncationReport(
      rows_truncated=int(np.sum(nnz > 5)), features_dropped=int(np.sum(np.maximum(nnz - 5, 0))),
      labels_dropped=int(np.sum(np.maximum(nlab - 2, 0))),
      rows_label_truncated=int(np.sum(nlab > 2)))
  assert expected.rows_truncated > 0 and expected.rows_label_truncated > 0
  assert stream.report == expected
  assert xcdata.truncation_report(data, 5, 2) == expected
  assert stream.report._asdict()["features_dropped"] == expected.features_dropped


def test_no_truncation_when_wide_enough():
  data = make_data(seed=3)
  widths = xcdata.suggest_widths(data, quantile=1.0)
  stream = xcdata.iterate_batches(data, 10, max_features=widths.max_features,
                                  max_labels=widths.max_labels, seed=0)
  list(stream)
  assert not stream.report and stream.report == xcdata.TruncationReport()


def test_epoch_order_is_a_function_of_seed_and_epoch():
  data = make_data()
  kwargs = dict(max_features=4, max_labels=2)

  def rows(seed, epoch, **extra):
    stream = xcdata.iterate_batches(data, 8, seed=seed, epoch=epoch, **kwargs, **extra)
    return np.concatenate([b.rows for b in stream])

  np.testing.assert_array_equal(rows(0, 1), rows(0, 1))
  assert not np.array_equal(rows(0, 0), rows(0, 1))
  assert not np.array_equal(rows(0, 0), rows(1, 0))
  np.testing.assert_array_equal(rows(0, 5, shuffle=False)[:53], np.arange(53))
  np.random.seed(123)  # the global RNG plays no part
  first = rows(4, 2)
  np.random.seed(321)
  np.testing.assert_array_equal(first, rows(4, 2))


def test_pad_rows_for_evaluation():
  data = make_data()
  batch = xcdata.pad_rows(data, [3, -1, 0], max_features=12, max_labels=6)
  assert batch.num_valid == 2 and batch.rows.tolist() == [3, -1, 0]
  assert np.all(batch.feature_ids[1] == 0) and np.all(batch.label_ids[1] == -1)
  f, v, lab = reference_row(data, 0, 12, 6)
  np.testing.assert_array_equal(batch.feature_ids[2], f)
  np.testing.assert_array_equal(batch.label_ids[2], lab)
  batch, report = xcdata.pad_rows(data, np.arange(53), 1, 1, with_report=True)
  assert report == xcdata.truncation_report(data, 1, 1)
  with pytest.raises(IndexError):
    xcdata.pad_rows(data, [53], 4, 4)
  with pytest.raises(ValueError):
    xcdata.pad_rows(data, [0], 0, 4)


def test_suggest_widths():
  lengths = np.array([3] * 999 + [500])  # one outlier row
  indptr = np.concatenate([[0], np.cumsum(lengths)])
  data = xcdata.XCData(indptr, np.zeros(indptr[-1], np.int32), np.ones(indptr[-1], np.float32),
                       np.arange(1001, dtype=np.int64), np.zeros(1000, np.int32), 1000, 1, 1)
  widths = xcdata.suggest_widths(data, quantile=0.99)
  assert widths == (8, 1)  # the outlier is cut; features rounded up to a multiple of 8
  assert xcdata.suggest_widths(data, quantile=1.0).max_features == 504
