"""Synthetic extreme-classification data with learnable structure.

The model (drawn from ``seed``): label popularity follows a power law over a random
permutation of the label ids; each label owns ``prototype_size`` random features; every
feature has an idf-like weight. A point draws 1..``max_labels`` labels by popularity, then
about ``avg_nnz`` features: a ``1 - noise`` share from its labels' prototypes (split evenly
between its labels) and the rest from a power law over all features. Values are
``(1 + log tf) * idf`` with each row scaled to unit L2 norm (positive float32).
"""
from __future__ import annotations

import functools

import numpy as np

from slidejax.data._xc import XCData
from slidejax.data._xc import subset

SYNTH_PRESETS: dict[str, dict] = {
    # ``slidejax train``'s embedded default: 50K train + 10K test points, 20K features,
    # 10K labels, ~40 nonzeros and ~4 labels per point.
    "default": dict(num_points=60_000, num_features=20_000, num_labels=10_000, avg_nnz=40,
                    avg_labels=4, test_fraction=1 / 6),
    # Amazon-670K's shape (the real set: 490K train / 153K test points).
    "amazon670k": dict(num_points=200_000, num_features=135_909, num_labels=670_091,
                       avg_nnz=75, avg_labels=5, test_fraction=0.1),
    # For time-to-accuracy benchmarks: 150K labels.
    "mid": dict(num_points=200_000, num_features=100_000, num_labels=150_000, avg_nnz=75,
                avg_labels=5, test_fraction=0.1),
}


def _power_law_cdf(size: int, exponent: float, rng: np.random.Generator):
  """(cdf float64[size], ids int32[size]): rank r has weight (r + 1)^-exponent; ranks map to
  ids through a random permutation."""
  weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
  cdf = np.cumsum(weights)
  cdf /= cdf[-1]
  return cdf, rng.permutation(size).astype(np.int32)


def _draw(cdf, ids, count, rng):
  ranks = np.minimum(np.searchsorted(cdf, rng.random(count), side="right"), len(cdf) - 1)
  return ids[ranks]


def _dedupe_sorted(rows: np.ndarray, ids: np.ndarray, num_rows: int, dim: int):
  """CSR (indptr, unique ids sorted within rows, repeat counts) of (row, id) pairs."""
  keys = np.sort(rows.astype(np.int64) * dim + ids)
  is_new = np.ones(len(keys), bool)
  is_new[1:] = keys[1:] != keys[:-1]
  starts = np.flatnonzero(is_new)
  counts = np.diff(np.append(starts, len(keys)))
  unique = keys[starts]
  indptr = np.zeros(num_rows + 1, np.int64)
  np.cumsum(np.bincount(unique // dim, minlength=num_rows), out=indptr[1:])
  return indptr, (unique % dim).astype(np.int32), counts


class _Model:
  """The label/prototype/idf model shared by all points of one seed."""

  def __init__(self, num_features, num_labels, *, rng, prototype_size, zipf_exponent):
    self.label_cdf, self.label_ids = _power_law_cdf(num_labels, zipf_exponent, rng)
    self.feature_cdf, self.feature_ids = _power_law_cdf(num_features, 1.0, rng)
    self.prototypes = rng.integers(0, num_features, (num_labels, prototype_size), np.int32)
    self.idf = (1.0 + rng.exponential(1.0, num_features)).astype(np.float32)


def _sample_points(model: _Model, num_points, *, num_features, num_labels, rng, avg_nnz,
                   avg_labels, max_labels, noise) -> XCData:
  prototype_size = model.prototypes.shape[1]
  # Labels: 1 + Poisson(avg_labels - 1), capped; repeats collapse.
  wanted = np.minimum(1 + rng.poisson(max(avg_labels - 1.0, 0.0), num_points), max_labels)
  label_rows = np.repeat(np.arange(num_points), wanted)
  l_indptr, l_ids, _ = _dedupe_sorted(
      label_rows, _draw(model.label_cdf, model.label_ids, len(label_rows), rng), num_points,
      num_labels)
  per_row_labels = np.diff(l_indptr)
  # Features: n ~ Poisson(avg_nnz) (>= 1), a Binomial(n, noise) share of them noise.
  nnz = np.maximum(rng.poisson(avg_nnz, num_points), 1)
  noise_nnz = rng.binomial(nnz, noise)
  per_label = (nnz - noise_nnz) / np.maximum(per_row_labels, 1)
  # Draws from a prototype needed to see `per_label` distinct features in expectation.
  target = np.minimum(per_label, 0.9 * prototype_size)
  draws = np.log1p(-target / prototype_size) / np.log1p(-1.0 / prototype_size)
  draws = np.floor(draws + rng.random(num_points)).astype(np.int64)
  draws_per_label = np.repeat(draws, per_row_labels)
  slot_rows = np.repeat(np.repeat(np.arange(num_points), per_row_labels), draws_per_label)
  slot_labels = np.repeat(l_ids, draws_per_label)
  slot_features = model.prototypes[slot_labels, rng.integers(0, prototype_size, len(slot_labels))]
  noise_rows = np.repeat(np.arange(num_points), noise_nnz)
  noise_features = _draw(model.feature_cdf, model.feature_ids, len(noise_rows), rng)
  f_indptr, f_ids, tf = _dedupe_sorted(np.concatenate([slot_rows, noise_rows]),
                                       np.concatenate([slot_features, noise_features]),
                                       num_points, num_features)
  values = (1.0 + np.log(tf)).astype(np.float32) * model.idf[f_ids]
  row_of = np.repeat(np.arange(num_points), np.diff(f_indptr))
  norms = np.sqrt(np.bincount(row_of, values.astype(np.float64) ** 2, minlength=num_points))
  values = (values / norms[row_of]).astype(np.float32)
  return XCData(f_indptr, f_ids, values, l_indptr, l_ids, num_points, num_features, num_labels)


def _defaults(avg_nnz, avg_labels, max_labels, prototype_size, noise):
  if max_labels is None:
    max_labels = max(1, int(np.ceil(4 * avg_labels)))
  if prototype_size is None:
    prototype_size = max(8, int(round(2 * avg_nnz * (1 - noise) / avg_labels)))
  return max_labels, prototype_size


def synthesize(num_points: int, num_features: int, num_labels: int, *, seed: int,
               avg_nnz: float = 75, avg_labels: float = 5, max_labels: int | None = None,
               prototype_size: int | None = None, noise: float = 0.3,
               zipf_exponent: float = 0.8) -> XCData:
  """A deterministic synthetic data set (see the module docstring for the model).

  Args:
    num_points, num_features, num_labels: N, D, L.
    seed: everything is drawn from ``np.random.default_rng(seed)``.
    avg_nnz: mean feature entries per point (approximate: prototype collisions are compensated
      in expectation).
    avg_labels: mean labels per point (1 + Poisson(avg_labels - 1), capped at ``max_labels``,
      default ``4 * avg_labels``).
    prototype_size: features owned by each label (default ``2 * avg_nnz * (1 - noise) /
      avg_labels``, at least 8).
    noise: share of a point's features drawn from the global feature distribution.
    zipf_exponent: label popularity ~ rank^-zipf_exponent.
  """
  for name, value in (("num_points", num_points), ("num_features", num_features),
                      ("num_labels", num_labels)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise must be in [0, 1], got {noise}")
  max_labels, prototype_size = _defaults(avg_nnz, avg_labels, max_labels, prototype_size, noise)
  model_rng, pilot_rng, point_rng = (np.random.default_rng(s)
                                     for s in np.random.SeedSequence(seed).spawn(3))
  model = _Model(num_features, num_labels, rng=model_rng, prototype_size=prototype_size,
                 zipf_exponent=zipf_exponent)
  sample = functools.partial(_sample_points, model, num_features=num_features,
                             num_labels=num_labels, avg_labels=avg_labels,
                             max_labels=max_labels, noise=noise)
  # A pilot sample measures how many features collide, and the request is scaled up by it.
  pilot = sample(2000, rng=pilot_rng, avg_nnz=avg_nnz)
  achieved = max(len(pilot.feature_ids) / pilot.num_points, 1e-9)
  return sample(num_points, rng=point_rng, avg_nnz=avg_nnz * avg_nnz / achieved)


def split_rows(data: XCData, num_test: int) -> tuple[XCData, XCData]:
  """(first ``N - num_test`` rows, last ``num_test`` rows)."""
  num_train = data.num_points - num_test
  return subset(data, np.arange(num_train)), subset(data, np.arange(num_train, data.num_points))


def synthesize_split(num_points: int, num_features: int, num_labels: int, *, seed: int,
                     test_fraction: float = 0.2, **kwargs) -> tuple[XCData, XCData]:
  """(train, test): ``num_points`` in all, ``round(num_points * test_fraction)`` of them test.

  Both parts come from the same label/prototype model (points are i.i.d.); ``kwargs`` are
  those of :func:`synthesize`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  data = synthesize(num_points, num_features, num_labels, seed=seed, **kwargs)
  return split_rows(data, int(round(num_points * test_fraction)))
