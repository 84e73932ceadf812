"""``fit`` with ``members > 1`` (bagging): each member is trained as ``fit`` trains one network,
with its own seed and so its own validation split, early stopping and best model; together
they are one :class:`slidejax.nn.DenseMLP` that predicts by the mean of their logits.

A time budget is shared equally: each member plans its steps for ``1 / members`` of it (what
an early-stopped member leaves is not passed on, so no member's plan depends on another's
clock). Each member checkpoints in ``member-<i>`` under the checkpoint directory; a
resumed run takes the finished members from their last checkpoints and resumes the one that
was interrupted, so it continues exactly.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from slidejax import data as xcdata
from slidejax import metrics
from slidejax.checkpoint import CheckpointError
from slidejax.checkpoint import TrainingCheckpoints
from slidejax.nn import DenseMLP
from slidejax.train._config import TrainConfig
from slidejax.train._calibrate import attach_neighbours
from slidejax.train._loop import _fit_resolved
from slidejax.train._loop import evaluate_top_k


def member_config(config: TrainConfig, index: int, budget: float | None) -> TrainConfig:
  """Member ``index``'s configuration: one network, seed ``config.seed + index`` (its own
  validation split, initial weights, batch order and dropout), ``budget`` seconds."""
  return dataclasses.replace(config, members=1, seed=config.seed + index, time_budget=budget)


def _has_checkpoint(directory: pathlib.Path) -> bool:
  if not directory.is_dir():
    return False
  checkpoints = TrainingCheckpoints(directory)
  try:
    return checkpoints.latest_step() is not None
  finally:
    checkpoints.close()


def fit_members(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None, *,
                checkpoint_dir, resume: bool, progress: bool, keep_checkpoints: int,
                log) -> dict:
  """Trains ``config.members`` networks (see the module) and returns ``fit``'s result for
  their ensemble, with ``members``: each member's seed, steps, seconds and validation."""
  results = []
  budget = config.time_budget / config.members if config.time_budget else None
  directories = [None if checkpoint_dir is None else pathlib.Path(checkpoint_dir) / f"member-{i}"
                 for i in range(config.members)]
  if resume and not any(_has_checkpoint(d) for d in directories):
    raise CheckpointError(f"{checkpoint_dir}: no member's checkpoint to resume from")
  for index, directory in enumerate(directories):
    member = member_config(config, index, budget)
    tag = f"member {index + 1} of {config.members}"
    log(f"{tag}: seed {member.seed}" + (f", {budget:g} s of the budget" if budget else ""))
    results.append(_fit_resolved(
        member, train, None, checkpoint_dir=None if directory is None else str(directory),
        resume=resume and directory is not None and _has_checkpoint(directory),
        progress=progress, keep_checkpoints=keep_checkpoints,
        log=lambda message, tag=tag: log(f"{tag}: {message}")))
  model = DenseMLP.from_members([r["model"] for r in results])
  attach_neighbours(model, train, _members_neighbours(results))
  max_features = max(r["config"]["max_features"] for r in results)
  return _ensemble_result(config, model, results, train, test, max_features, checkpoint_dir)


def _members_neighbours(results) -> dict | None:
  """The ensemble's neighbour votes: the median ``k`` of the members that chose votes and the
  mean of every member's weight (each chosen on its own split)."""
  chosen = [r["neighbours"] for r in results if r.get("neighbours")]
  voting = sorted(c["k"] for c in chosen if c["weight"])
  if not voting:
    return None
  return {"k": voting[len(voting) // 2],
          "weight": round(float(np.mean([c["weight"] for c in chosen])), 6)}


def _ensemble_result(config, model, results, train, test, max_features, checkpoint_dir) -> dict:
  seconds = sum(r["train_seconds"] for r in results)
  steps = sum(r["steps"] for r in results)
  result = {}
  if test is not None:
    props = metrics.propensities(xcdata.label_counts(train), train.num_points)
    result.update(evaluate_top_k(model, test, batch_size=config.batch_size,
                                 max_features=max_features, propensities=props))
  members = [{"seed": r["config"]["seed"], "steps": r["steps"],
              "planned_steps": r["planned_steps"], "train_seconds": r["train_seconds"],
              "validation": r["validation"], "neighbours": r["neighbours"]} for r in results]
  resolved = dict(results[0]["config"], members=len(results), seed=config.seed,
                  time_budget=config.time_budget, max_features=max_features)
  result.update(
      train_seconds=seconds, samples_per_second=steps * config.batch_size / max(seconds, 1e-9),
      steps=steps, planned_steps=sum(r["planned_steps"] or 0 for r in results), rebuilds=0,
      rebuild_seconds=0.0, history=[], calibration=None, probes=[], config=resolved,
      neighbours=_members_neighbours(results), reranker=None,
      validation={"rows": results[0]["validation"]["rows"] if results[0]["validation"] else 0,
                  "seed": config.seed, "members": [m["validation"] for m in members]},
      truncation=results[0]["truncation"], members=members,
      checkpoint=None if checkpoint_dir is None else str(checkpoint_dir), model=model)
  return result
