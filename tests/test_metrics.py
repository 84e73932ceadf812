"""Metrics against brute-force Python references on random data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidejax import metrics


def dedupe(ranked):
  seen, out = set(), []
  for x in ranked:
    out.append(x if x not in seen else None)
    seen.add(x)
  return out


def ref_precision(top, truth, k):
  return sum(sum(1 for x in dedupe(t[:k]) if x in y) / k for t, y in zip(top, truth)) / len(top)


def ref_ndcg(top, truth, k):
  total = 0.0
  for t, y in zip(top, truth):
    if not y:
      continue
    dcg = sum(1 / math.log2(j + 2) for j, x in enumerate(dedupe(t[:k])) if x in y)
    ideal = sum(1 / math.log2(j + 2) for j in range(min(k, len(y))))
    total += dcg / ideal
  return total / len(top)


def ref_psp(top, truth, k, prop):
  gained = sum(1 / prop[x] for t, y in zip(top, truth) for x in dedupe(t[:k]) if x in y)
  best = sum(sum(sorted((1 / prop[x] for x in y), reverse=True)[:k]) for y in truth)
  return gained / best if best else 0.0


@st.composite
def problems(draw):
  n = draw(st.integers(1, 12))
  num_labels = draw(st.integers(1, 15))
  k = draw(st.integers(1, 5))
  width = draw(st.integers(k, 6))
  top = draw(st.lists(st.lists(st.integers(-1, num_labels - 1), min_size=width, max_size=width),
                      min_size=n, max_size=n))
  truth = draw(st.lists(st.sets(st.integers(0, num_labels - 1), max_size=6), min_size=n,
                        max_size=n))
  prop = draw(st.lists(st.floats(0.05, 1.0), min_size=num_labels, max_size=num_labels))
  return np.array(top), [sorted(y) for y in truth], k, np.array(prop)


def as_padded(truth):
  width = max([len(y) for y in truth] + [1])
  return np.array([y + [-1] * (width - len(y)) for y in truth])


def as_csr(truth):
  indptr = np.concatenate([[0], np.cumsum([len(y) for y in truth])])
  return indptr, np.array([x for y in truth for x in y], np.int64)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_against_brute_force(problem):
  top, truth, k, prop = problem
  sets = [set(y) for y in truth]
  toplist = top.tolist()
  for labels in (as_padded(truth), as_csr(truth)):
    assert metrics.precision_at_k(top, labels, k) == pytest.approx(ref_precision(toplist, sets, k))
    assert metrics.ndcg_at_k(top, labels, k) == pytest.approx(ref_ndcg(toplist, sets, k))
    assert metrics.psprecision_at_k(top, labels, k, prop) == pytest.approx(
        ref_psp(toplist, truth, k, prop))


def test_known_values_and_evaluate_keys():
  top = np.array([[1, 2, 3], [4, 5, 6], [7, 7, 8]])
  labels = np.array([[1, 3, -1], [-1, -1, -1], [7, 9, -1]])
  result = metrics.evaluate(top, labels, ks=(1, 3), propensities=np.ones(10))
  assert set(result) == {"p@1", "p@3", "ndcg@1", "ndcg@3", "psp@1", "psp@3"}
  assert result["p@1"] == pytest.approx(2 / 3)  # the unlabeled row counts as a miss
  assert result["p@3"] == pytest.approx(3 / 9)  # the repeated 7 counts once
  assert result["psp@1"] == pytest.approx(1.0)  # 2 hits of the best possible 2
  with pytest.raises(ValueError):
    metrics.precision_at_k(top, labels, 4)


def test_csr_with_offset_indptr():
  top = np.array([[2, 0], [1, 3]])
  indptr = np.array([5, 6, 8])
  ids = np.array([9, 9, 9, 9, 9, 2, 3, 1])
  assert metrics.precision_at_k(top, (indptr, ids), 2) == pytest.approx((1 + 2) / 4)


def test_propensities_formula():
  counts = np.array([0, 1, 10, 1000])
  n, a, b = 5000, 0.55, 1.5
  c = (math.log(n) - 1) * (b + 1) ** a
  expected = [1 / (1 + c * (x + b) ** -a) for x in counts]
  np.testing.assert_allclose(metrics.propensities(counts, n), expected)
  p = metrics.propensities(counts, n)
  assert np.all(np.diff(p) > 0) and np.all((p > 0) & (p < 1))
