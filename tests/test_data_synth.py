"""The synthetic data generator: determinism, requested statistics, learnable structure."""
from __future__ import annotations

import numpy as np
import pytest

from slidejax import data as xcdata

SHAPE = dict(num_points=4000, num_features=3000, num_labels=400)


@pytest.fixture(scope="module")
def sample():
  return xcdata.synthesize(**SHAPE, seed=7, avg_nnz=30, avg_labels=4)


def test_deterministic_for_a_seed(sample):
  again = xcdata.synthesize(**SHAPE, seed=7, avg_nnz=30, avg_labels=4)
  for a, b in zip(sample, again):
    np.testing.assert_array_equal(a, b)
  other = xcdata.synthesize(**SHAPE, seed=8, avg_nnz=30, avg_labels=4)
  assert not np.array_equal(sample.label_ids[:100], other.label_ids[:100])
  assert not np.array_equal(sample.feature_ids[:100], other.feature_ids[:100])


def test_uses_no_global_rng():
  np.random.seed(0)
  a = xcdata.synthesize(200, 100, 50, seed=1)
  np.random.seed(1)
  b = xcdata.synthesize(200, 100, 50, seed=1)
  np.testing.assert_array_equal(a.feature_values, b.feature_values)


def test_valid_arrays_in_range(sample):
  xcdata.validate(sample)
  assert sample.feature_indptr.dtype == np.int64 and sample.label_indptr.dtype == np.int64
  assert sample.feature_ids.dtype == np.int32 and sample.label_ids.dtype == np.int32
  assert sample.feature_values.dtype == np.float32
  assert np.all(np.isfinite(sample.feature_values)) and np.all(sample.feature_values > 0)
  nlab = xcdata.row_num_labels(sample)
  assert nlab.min() >= 1 and nlab.max() <= 16  # max_labels defaults to 4 * avg_labels
  assert xcdata.row_nnz(sample).min() >= 1
  for r in range(0, sample.num_points, 97):  # ids are distinct within a row
    row = sample.feature_ids[sample.feature_indptr[r]:sample.feature_indptr[r + 1]]
    assert len(np.unique(row)) == len(row)
    labels = sample.label_ids[sample.label_indptr[r]:sample.label_indptr[r + 1]]
    assert len(np.unique(labels)) == len(labels)


def test_statistics_close_to_requested(sample):
  assert len(sample.feature_ids) / sample.num_points == pytest.approx(30, rel=0.05)
  assert len(sample.label_ids) / sample.num_points == pytest.approx(4, rel=0.08)
  counts = np.sort(xcdata.label_counts(sample))[::-1]
  assert counts[0] > 20 * np.median(counts)  # power law: the head is far above the median
  assert counts[:40].sum() > 0.3 * counts.sum()  # top 10% of labels hold a large share


def test_learnable(sample):
  """Label centroids from the first 3000 points predict the rest far better than chance."""
  train = xcdata.subset(sample, np.arange(3000))
  test = xcdata.subset(sample, np.arange(3000, sample.num_points))

  def dense(part):
    x = np.zeros((part.num_points, part.num_features), np.float32)
    rows = np.repeat(np.arange(part.num_points), xcdata.row_nnz(part))
    x[rows, part.feature_ids] = part.feature_values
    return x

  x_train, x_test = dense(train), dense(test)
  label_rows = np.repeat(np.arange(train.num_points), xcdata.row_num_labels(train))
  centroids = np.zeros((train.num_labels, train.num_features), np.float32)
  np.add.at(centroids, train.label_ids, x_train[label_rows])
  centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
  predicted = np.argmax(x_test @ centroids.T, axis=1)
  hits = [predicted[i] in test.label_ids[test.label_indptr[i]:test.label_indptr[i + 1]]
          for i in range(test.num_points)]
  p_at_1 = np.mean(hits)
  top_label = np.argmax(xcdata.label_counts(train))
  baseline = np.mean(xcdata.label_counts(test)[top_label] / test.num_points)
  assert p_at_1 > 0.6 and p_at_1 > 3 * baseline


def test_split_shares_the_model():
  train, test = xcdata.synthesize_split(1000, 500, 100, seed=3, test_fraction=0.25)
  assert (train.num_points, test.num_points) == (750, 250)
  whole = xcdata.synthesize(1000, 500, 100, seed=3)
  np.testing.assert_array_equal(test.feature_ids,
                                whole.feature_ids[whole.feature_indptr[750]:])
  with pytest.raises(ValueError):
    xcdata.synthesize_split(10, 5, 5, seed=0, test_fraction=1.0)


def test_presets():
  assert {"default", "amazon670k", "mid"} <= set(xcdata.SYNTH_PRESETS)
  amazon = xcdata.SYNTH_PRESETS["amazon670k"]
  assert (amazon["num_features"], amazon["num_labels"]) == (135_909, 670_091)
  assert 100_000 <= xcdata.SYNTH_PRESETS["mid"]["num_labels"] <= 200_000
  small = dict(xcdata.SYNTH_PRESETS["default"], num_points=600)
  train, test = xcdata.synthesize_split(**small, seed=0)
  assert train.num_points + test.num_points == 600


def test_rejects_bad_arguments():
  with pytest.raises(ValueError):
    xcdata.synthesize(0, 10, 10, seed=0)
  with pytest.raises(ValueError):
    xcdata.synthesize(10, 10, 10, seed=0, noise=1.5)
