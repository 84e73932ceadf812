"""What ``auto`` means, and the plan of a run: the validation split, the number of steps a
time budget buys, the learning-rate schedule over them and early stopping.

Everything here is a pure function of the configuration, the data's shape and (for a time
budget) one measured step time, so a resumed run recomputes the same plan from what its
checkpoint holds.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from slidejax import data as xcdata

# --num-active auto: label counts up to this train the full softmax (DenseMLP), above it
# a shared active set of AUTO_ACTIVE_FRACTION of the labels, within [AUTO_MIN_ACTIVE,
# AUTO_MAX_ACTIVE] (the step timings of the README cover up to 8,192 active).
AUTO_DENSE_LABELS = 8192
AUTO_ACTIVE_FRACTION = 1 / 16
AUTO_MIN_ACTIVE = 2048
AUTO_MAX_ACTIVE = 8192
# --lr auto: AdamW's peak rate for a dense output layer, and for a sparse one (whose rows
# are touched rarely: a larger rate; 1e-2 was worse on pypi-names' validation split).
AUTO_LR_DENSE = 1e-3
AUTO_LR_SPARSE = 5e-3
# --batch-size auto: rows per step with a dense output layer, and with a sparse one. On
# pypi-names a sparse step of 256 rows costs 1.4-1.7x one of 128 (24 against 14-18 ms) for
# twice the rows, and 256 at rate 5e-3 scored above 128 at 3e-3 on the validation split
# within the same budgets (150, 300 and 600 s; see the README, group 11).
AUTO_BATCH_DENSE = 128
AUTO_BATCH_SPARSE = 256
# --dropout auto: the rate on the embedding (best on bibtex's and delicious' validation splits;
# on pypi-names' with the shortcut: 0.7 ahead of 0.5 by 0.5 point, level with 0.8).
AUTO_DROPOUT = 0.7
# --members auto: with a dense output layer and a validation split, this many networks, each
# trained on its own split (bagging; a time budget shared out among them), predicting by the
# mean of their logits: in one 60 s budget, 3 scored +0.5 and +0.2 point of validation score
# over one network across five folds of bibtex's and delicious' training files; bagged apart,
# 2 and 4 gained less or no more than 3 (see the README, group 12).
AUTO_MEMBERS = 3
# --shortcut auto: with a sparse output layer (of one block), each input feature links to
# this many labels (LabelShortcut): +1.7 points of validation score on pypi-names; with the
# dense softmax none (-0.3 on bibtex's validation split, -0.5 on delicious'; see the README).
AUTO_SHORTCUT = 32
# --epochs auto: at most as many epochs as pass AUTO_ROWS training rows (5,000 steps of 128
# rows), clipped to this range (with a time budget, the budget bounds the run instead: up to
# the range's top); early stopping on the validation split ends the run sooner when it stops
# improving.
AUTO_ROWS = 640_000
AUTO_EPOCHS = (4, 100)
# --validation auto (with --epochs auto): this share of the training rows, within limits.
AUTO_VALIDATION = 0.1
AUTO_VALIDATION_ROWS = (200, 5_000)
# A time budget is turned into steps from the step time measured over the first steps (at
# least PLAN_MIN_STEPS, about PLAN_SHARE of the budget), keeping PLAN_SLACK of the rest for
# validations and table rebuilds.
PLAN_MIN_STEPS = 10
PLAN_SHARE = 0.03
PLAN_SLACK = 0.1
# Validations per planned run (at least one per epoch).
VALIDATIONS_PER_RUN = 10
# A budget's validations and calibration are timed when it is planned (one validation pass,
# over at most PLAN_VALIDATION_BATCHES batches, after one that compiles) and reserved beside
# the steps: what they need beyond half of PLAN_SLACK comes out of the steps, and when they
# would take more than PLAN_VALIDATION_SHARE of the rest, a run makes fewer validations
# (down to one).
PLAN_VALIDATION_BATCHES = 4
PLAN_VALIDATION_SHARE = 0.25
SCHEDULES = ("cosine", "linear", "constant")
# --calibrate auto: after a sampled run, every label's output bias is shifted by
# tau * log(1 + its training count), tau the best of this grid on the validation split (0:
# no shift unless another scores better). A shared active set holds the batch's labels, so
# frequent labels are negatives far more often than their share of the softmax; how far that
# leaves them ranked off varies by run (measured: tau -0.4 on the synthetic default, -0.2 to
# +0.1 on pypi-names; see the README), so the split chooses.
CALIBRATION_GRID = (-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2)
# --calibrate auto, first (with a label shortcut): the learned scale of the shortcut is
# multiplied by the factor of this grid that scores best on the validation split (1: none
# unless another scores better). Learned beside a hidden layer under dropout and a sampled
# softmax, it ends too small for the full softmax of predictions (measured on pypi-names:
# x1.25 to x1.5 gained 0.6 to 1.1 points of validation score on three saved models, x0.8 lost
# 3; see the README, group 10).
SHORTCUT_GRID = (0.8, 1.0, 1.25, 1.5, 2.0)
# --neighbours auto: at the end, the neighbours per query (k) and the votes' weight that score
# best on the validation split (weight 0, no votes, unless another scores better); see
# slidejax.nn.NeighbourVotes and the README (How the defaults were chosen, group 13).
NEIGHBOUR_KS = (10, 30, 100)
NEIGHBOUR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)


def auto_num_active(num_labels: int) -> int | None:
  """``--num-active auto``: None (train the full layer: dense) for at most
  ``AUTO_DENSE_LABELS`` labels, else a power of two near ``num_labels * AUTO_ACTIVE_FRACTION``
  (from ``AUTO_MIN_ACTIVE`` to ``AUTO_MAX_ACTIVE``, at most ``num_labels``)."""
  if num_labels <= AUTO_DENSE_LABELS:
    return None
  want = min(AUTO_MAX_ACTIVE, max(AUTO_MIN_ACTIVE, num_labels * AUTO_ACTIVE_FRACTION))
  return min(num_labels, 2 ** int(round(math.log2(want))))


def auto_epochs(steps_per_epoch: int, batch_size: int, *, budgeted: bool = False) -> int:
  """``--epochs auto``: the most epochs a run may take (early stopping ends it sooner): as
  many as make ``AUTO_ROWS / batch_size`` steps of ``steps_per_epoch``."""
  low, high = AUTO_EPOCHS
  if budgeted:
    return high
  steps = AUTO_ROWS / max(batch_size, 1)
  return int(min(high, max(low, math.ceil(steps / max(steps_per_epoch, 1)))))


def validation_rows(num_points: int, fraction: float) -> int:
  """How many training rows a validation ``fraction`` takes (0 for 0; at least 1 and at most
  all rows but one otherwise)."""
  if fraction <= 0:
    return 0
  return max(1, min(num_points - 1, int(round(num_points * fraction))))


def split_validation(data: xcdata.XCData, num_rows: int, seed: int
                     ) -> tuple[xcdata.XCData, xcdata.XCData | None]:
  """(training part, validation part) of ``data``: ``num_rows`` rows drawn without
  replacement by a generator seeded with ``seed`` (each part keeps the file's row order)."""
  if num_rows <= 0:
    return data, None
  order = np.random.default_rng([seed, 0x5A11D]).permutation(data.num_points)
  held = np.sort(order[:num_rows])
  kept = np.sort(order[num_rows:])
  return xcdata.subset(data, kept), xcdata.subset(data, held)


def learning_rate(step: int, *, base: float, horizon: int | None, schedule: str) -> float:
  """The learning rate of step ``step`` (0-based) of a run planned for ``horizon`` steps:
  ``cosine`` decays from ``base`` to 0 along half a cosine, ``linear`` along a line,
  ``constant`` (or an unknown horizon, before a time budget is planned) stays at ``base``."""
  if schedule == "constant" or not horizon:
    return base
  progress = min(step / horizon, 1.0)
  if schedule == "cosine":
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
  return base * (1.0 - progress)


def budget_steps(budget: float, elapsed: float, steps_done: int, seconds_per_step: float,
                 *, validation_seconds: float = 0.0, end_validations: int = 0,
                 steps_per_epoch: int | None = None) -> tuple[int, int]:
  """(planned steps, validations per run): what a ``budget`` of seconds buys, ``elapsed``
  seconds and ``steps_done`` steps into it, at ``seconds_per_step``.

  ``PLAN_SLACK`` of the rest is kept aside (table rebuilds, validations). When the run's
  validations (``VALIDATIONS_PER_RUN``, or one per epoch of ``steps_per_epoch`` steps when
  more) and ``end_validations`` more (the last one, calibration) at ``validation_seconds``
  each need more than half of it, the excess is taken from the steps, with fewer validations
  per run when they would take over ``PLAN_VALIDATION_SHARE`` of the rest.
  """
  rest = max(budget - elapsed, 0.0)
  per_run = VALIDATIONS_PER_RUN
  while per_run > 1 and (validation_seconds * (per_run + end_validations)
                         > PLAN_VALIDATION_SHARE * rest):
    per_run -= 1
  step, ends = max(seconds_per_step, 1e-9), validation_seconds * end_validations
  within_slack = rest * (1.0 - PLAN_SLACK) / step
  rest -= 0.5 * PLAN_SLACK * rest   # half the slack stays for the rebuilds
  # validations every tenth of the run (a fixed count) ...
  steps = min(within_slack, (rest - ends - validation_seconds * per_run) / step)
  if steps_per_epoch and steps > per_run * steps_per_epoch:   # ... or every epoch
    steps = min(within_slack, (rest - ends) / (step + validation_seconds / steps_per_epoch))
  return steps_done + max(1, int(steps)), per_run


RERANK_PASSES = 6    # a Reranker's description of the validation rows (its candidates and the
                    # model's own top 5, votes searched for both, compiled), in passes
RERANK_ROW_SECONDS = 0.005   # its three fits, per validation row (4.4 ms measured on 2 cores)


def rerank_fit_passes(rows: int, validation_seconds: float) -> int:
  """The Reranker's fits on ``rows`` validation rows, counted in validation passes of
  ``validation_seconds`` (what ``end_validations`` does not count: the fits' time does not
  grow with the label count, a pass's does)."""
  return math.ceil(RERANK_ROW_SECONDS * rows / max(validation_seconds, 1e-3))


def end_validations(*, calibrate: bool, shortcut: bool, sampled: bool,
                    neighbour_ks: int = 0, rerank: bool = False) -> int:
  """How many validation passes follow a run's last step at most: the last state's, then
  ``calibrate``'s (a factor of ``SHORTCUT_GRID`` for a shortcut, a shift of
  ``CALIBRATION_GRID`` for a sampled output layer; 1 and 0 are scored already), then one
  model pass and one search per neighbour count of ``--neighbours`` (counted as passes), then
  ``RERANK_PASSES`` for ``--rerank`` (its fits: :func:`rerank_fit_passes`)."""
  count = 1
  if calibrate:
    count += (len(SHORTCUT_GRID) - 1) * shortcut + (len(CALIBRATION_GRID) - 1) * sampled
  return count + (1 + neighbour_ks if neighbour_ks else 0) + RERANK_PASSES * rerank


def best_weight(scores: dict[float, float]) -> float:
  """The votes' weight with the best validation score (ties: the smallest)."""
  return max(scores, key=lambda weight: (scores[weight], -weight))


def prior_shift(label_counts: np.ndarray, tau: float, size: int) -> np.ndarray:
  """float32 ``[size]``: ``tau * log(1 + count)`` per label (0 past the counted labels, e.g.
  a rounded-up last block)."""
  shift = np.zeros(size, np.float32)
  shift[:len(label_counts)] = tau * np.log1p(np.asarray(label_counts, np.float64))
  return shift


def best_shift(scores: dict[float, float]) -> float:
  """The ``tau`` with the best validation score (ties: the one nearest 0)."""
  return max(scores, key=lambda tau: (scores[tau], -abs(tau)))


def best_factor(scores: dict[float, float]) -> float:
  """The scale factor with the best validation score (ties: the one nearest 1)."""
  return max(scores, key=lambda factor: (scores[factor], -abs(math.log(factor))))


def validation_interval(steps_per_epoch: int, horizon: int,
                        per_run: int = VALIDATIONS_PER_RUN) -> int:
  """Steps between validations: an epoch, or ``1 / per_run`` of the run when epochs are
  longer."""
  return max(1, min(steps_per_epoch, math.ceil(horizon / per_run)))


class EarlyStopping(NamedTuple):
  """Where early stopping stands: the best validation score so far, at which step, and how
  many validations in a row have not beaten it (the best model's arrays are kept beside)."""
  best_score: float = -1.0
  best_step: int = 0
  stale: int = 0

  def update(self, score: float, step: int) -> tuple["EarlyStopping", bool]:
    """(new state, whether ``score`` is a new best)."""
    if score > self.best_score:
      return EarlyStopping(score, step, 0), True
    return self._replace(stale=self.stale + 1), False


def validation_score(result: dict) -> float:
  """What early stopping maximizes: the mean of P@1, P@3 and P@5."""
  return (result["p@1"] + result["p@3"] + result["p@5"]) / 3.0
