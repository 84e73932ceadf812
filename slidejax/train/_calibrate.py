"""``calibrate``: the end-of-run corrections ``--calibrate auto`` chooses on a validation
split, for any trained :class:`slidejax.nn.SlideMLP` / :class:`slidejax.nn.DenseMLP`."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from flax import nnx

from slidejax import data as xcdata
from slidejax import metrics
from slidejax.nn import NeighbourVotes
from slidejax.nn import mix_votes
from slidejax.train import _plan


def _validation_scorer(held: xcdata.XCData, batch_size: int, max_features: int | None):
  """``model -> mean P@1/3/5`` on ``held`` from the model's exact top 5 (compiled once)."""
  from slidejax.train._loop import evaluate_model
  top_k = nnx.jit(lambda model, ids, values: model.top_k(ids, values, 5)[1])
  width = max_features or int(xcdata.suggest_widths(held)[0])

  def score(model) -> float:
    return _plan.validation_score(evaluate_model(
        lambda ids, values: top_k(model, ids, values), held, batch_size=batch_size,
        max_features=width))

  return score


def calibrate(model: nnx.Module, held: xcdata.XCData, label_counts, *,
              score: Callable[[nnx.Module], float] | None = None, batch_size: int = 256,
              max_features: int | None = None, shift_biases: bool | None = None) -> dict:
  """Calibrates a trained model in place on validation rows ``held`` (not trained on).

  With a :class:`slidejax.nn.LabelShortcut`, its scale is first multiplied by the factor of
  ``_plan.SHORTCUT_GRID`` that scores best (1 unless another scores better); then, when
  ``shift_biases`` (default: a sampled output layer, ``model.output``), every label's output
  bias is shifted by ``tau * log(1 + label_counts[label])`` with the best ``tau`` of
  ``_plan.CALIBRATION_GRID`` (0 likewise). The score is the mean of P@1, P@3 and P@5 of the
  exact top 5 (``score(model)`` replaces it, e.g. a trainer's compiled predictions).

  Args:
    model: the trained model; its ``shortcut.log_scale`` and ``output.bias`` are changed.
    held: the validation rows.
    label_counts: ``[num_labels]`` training counts per label (:func:`slidejax.data.label_counts`
      of the rows it was trained on).
  Returns:
    ``{"tau", "shortcut_factor", "before", "after"}`` (the scores before and after).
  """
  if score is None:
    score = _validation_scorer(held, batch_size, max_features)
  if shift_biases is None:
    shift_biases = isinstance(getattr(model, "output", None), nnx.Module)
  before = score(model)
  factor, after = 1.0, before
  if getattr(model, "shortcut", None) is not None:
    factor, after = _best_change(model, model.shortcut.log_scale, score, before,
                                 _plan.SHORTCUT_GRID, 1.0, _plan.best_factor,
                                 lambda log_scale, f: log_scale + math.log(f)
                                 / type(model.shortcut).SCALE_GAIN)
  tau = 0.0
  if shift_biases:
    counts = np.asarray(label_counts)
    tau, after = _best_change(model, model.output.bias, score, after,
                              _plan.CALIBRATION_GRID, 0.0, _plan.best_shift,
                              lambda bias, t: bias + _plan.prior_shift(counts, t, len(bias)))
  return {"tau": tau, "shortcut_factor": factor, "before": round(before, 6),
          "after": round(after, 6)}


def _best_change(model, variable: nnx.Variable, score, score_now: float, grid, identity,
                 best_of, changed) -> tuple[float, float]:
  """Tries ``changed(value, g)`` for each ``g`` of ``grid`` on ``variable``, keeps the best
  (``best_of`` of the scores, ``identity`` scored as ``score_now``); returns (g, its score)."""
  import jax.numpy as jnp

  from slidejax.distributed import host_value
  start = host_value(variable.get_value())

  def put(g):
    variable.set_value(jnp.asarray(changed(start, g), start.dtype))

  scores = {identity: score_now}
  for g in grid:
    if g != identity:
      put(g)
      scores[g] = score(model)
  best = best_of(scores)
  put(best)
  return best, scores[best]


def calibrate_neighbours(model: nnx.Module, held: xcdata.XCData, rows: xcdata.XCData, *,
                         ks=_plan.NEIGHBOUR_KS, weights=_plan.NEIGHBOUR_WEIGHTS,
                         batch_size: int = 256, max_features: int | None = None) -> dict:
  """Chooses :class:`slidejax.nn.NeighbourVotes` settings for a trained model on validation
  rows ``held``: the neighbours per query ``k`` of ``ks`` (searched among ``rows``, the rows
  it was trained on) and the votes' weight of ``weights`` whose mixed top 5 scores best
  (mean of P@1, P@3 and P@5; weight 0 unless another scores better). The model is left as
  it was; ``fit`` attaches votes over every training row with the chosen settings.

  The model's own ranking is computed once and each ``k``'s votes once, so the grid costs
  one model pass and ``len(ks)`` searches.

  Returns:
    ``{"k", "weight", "before", "after"}`` (the scores without votes and with the choice).
  """
  from slidejax.train._loop import padded_batches   # (the loop imports this module)
  width = max_features or int(xcdata.suggest_widths(held)[0])
  batches = [b[1:] for b in padded_batches(held, np.arange(held.num_points), batch_size,
                                           width)]

  def over_rows(fn, parts: int) -> list[np.ndarray]:   # fn on every batch, padding cut off
    out = [fn(ids, values) for ids, values, _ in batches]
    return [np.concatenate([np.asarray(o[i])[:n] for o, (_, _, n) in zip(out, batches)])
            for i in range(parts)]

  keep = NeighbourVotes.WIDTH + 5
  ranked = nnx.jit(lambda m, ids, values: m.ranked(ids, values, keep))
  own = over_rows(lambda ids, values: ranked(model, ids, values), 3)
  truth = (held.label_indptr, held.label_ids)

  def score(votes, weight) -> float:
    top = mix_votes(*own, *votes, np.float32(weight), 5)[1]
    return _plan.validation_score(metrics.evaluate(np.asarray(top), truth, ks=(1, 3, 5)))

  nothing = (np.full((held.num_points, 1), -1, np.int32), np.zeros((held.num_points, 1),
                                                                    np.float32))
  before = score(nothing, 0.0)
  best = {"k": 0, "weight": 0.0, "after": before}
  for k in ks:
    search = NeighbourVotes(model.num_features, model.num_labels, rows, k=k)
    votes = nnx.jit(lambda v, ids, values: v(ids, values))
    found = over_rows(lambda ids, values, search=search: votes(search, ids, values), 2)
    scores = {w: score(found, w) for w in weights if w > 0}
    weight = _plan.best_weight({0.0: before, **scores})
    if weight and scores[weight] > best["after"]:
      best = {"k": k, "weight": weight, "after": scores[weight]}
  return {"k": best["k"], "weight": best["weight"], "before": round(before, 6),
          "after": round(best["after"], 6)}


def attach_neighbours(model: nnx.Module, rows: xcdata.XCData, choice: dict | None) -> None:
  """Gives ``model`` votes over ``rows`` (every training row) with the ``k`` and weight of
  ``choice`` (:func:`calibrate_neighbours`'s result); none for weight 0 or no choice."""
  if not choice or not choice["weight"]:
    return
  votes = NeighbourVotes(model.num_features, model.num_labels, rows, k=choice["k"])
  votes.weight[...] = np.float32(choice["weight"])
  model.set_neighbours(votes)
