"""The training loop behind ``slidejax train``: batches, steps, rebuilds, evaluation,
checkpoints, progress, and a result dictionary (also written as JSON)."""
from __future__ import annotations

import dataclasses
import signal
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from slidejax import data as xcdata
from slidejax import metrics
from slidejax.nn import DenseMLP
from slidejax.nn import SlideMLP
from slidejax.checkpoint import CheckpointError
from slidejax.checkpoint import TrainingCheckpoints
from slidejax.train import _plan
from slidejax.train._calibrate import attach_neighbours
from slidejax.train._calibrate import calibrate
from slidejax.train._calibrate import calibrate_neighbours
from slidejax.train._config import TrainConfig
from slidejax.train._config import TrainingDiverged
from slidejax.train._config import TrainingError
from slidejax.train._config import mesh_sizes
from slidejax.train._config import resolve_config
from slidejax.train._config import validate
from slidejax.train._rerank import attach_reranker
from slidejax.train._rerank import fit_reranker
from slidejax.train._step import TrainBatch
from slidejax.train._step import Trainer


# The loop reads losses back (NaN check, progress bar) every this many steps, not after each
# one, so an accelerator can queue steps ahead; rebuilds, evaluations, checkpoints and the end
# of an epoch read them at once.
LOSS_CHECK_STEPS = 16

# The loop's clock (training seconds, the time budget's plan); tests may replace it.
_now = time.perf_counter

def _as_train_batch(batch) -> TrainBatch:
  return TrainBatch(np.asarray(batch.feature_ids, np.int32),
                    np.asarray(batch.feature_values, np.float32),
                    np.asarray(batch.label_ids, np.int32),
                    np.asarray(batch.rows).astype(np.int32))


def build_model(config: TrainConfig, num_features: int, num_labels: int,
                label_counts=None, links=None) -> nnx.Module:
  """The network of ``config``; ``label_counts`` ``[num_labels]`` feed the unigram sampler,
  ``links`` ``[num_features, config.shortcut]`` the shortcut."""
  rngs = nnx.Rngs(config.seed)
  trunk = dict(hidden=config.hidden, dropout=config.dropout, residual=config.residual,
               output_init=config.output_init, shortcut=config.shortcut, links=links)
  if config.dense:
    return DenseMLP(num_features, num_labels, rngs=rngs, members=config.members, **trunk)
  sampling = dict(sampler=config.sampler, backend=config.builder, policy=config.policy,
                  threshold=config.threshold, uniform_share=config.uniform_share,
                  correction=config.correction, transform=config.transform,
                  in_batch_negatives=config.in_batch_negatives)
  if config.sampler == "unigram":
    if label_counts is None:
      raise TrainingError("the unigram sampler needs the training label counts")
    sampling["label_counts"] = np.asarray(label_counts, np.float32)
  if config.sampler == "lsh":
    sampling.update(hash=config.hash, k=config.k, l=config.l,
                    bucket_capacity=config.bucket_capacity, range_bits=config.range_bits)
  return SlideMLP(num_features, num_labels, num_active=config.num_active, mode=config.mode,
                  shards=mesh_sizes(config)["model"], rngs=rngs, **trunk, **sampling)


def padded_batches(data: xcdata.XCData, rows: np.ndarray, batch_size: int, max_features: int):
  """Yields ``(start, feature_ids int32 [batch_size, F], feature_values float32, count)`` for
  ``rows`` of ``data`` in order, the last batch padded with empty rows (one compile)."""
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), -1, chunk.dtype)])
    batch = xcdata.pad_rows(data, padded, max_features=max_features, max_labels=1)
    yield (start, np.asarray(batch.feature_ids, np.int32),
           np.asarray(batch.feature_values, np.float32), len(chunk))


def evaluate_model(predict, data: xcdata.XCData, *, batch_size: int, max_features: int,
                   points: int | None = None, k: int = 5, propensities=None) -> dict:
  """P@k, nDCG@k (and PSP@k given label ``propensities``) on (the first ``points`` rows of)
  ``data``; ``predict(feature_ids [B, F], feature_values [B, F]) -> top-k ids [B, k]`` (e.g.
  :meth:`Trainer.predict`), called on fixed-size padded batches."""
  rows = np.arange(data.num_points if points is None else min(points, data.num_points))
  top = np.zeros((len(rows), k), np.int64)
  for start, feature_ids, feature_values, count in padded_batches(data, rows, batch_size,
                                                                 max_features):
    top[start:start + count] = np.asarray(predict(feature_ids, feature_values))[:count, :k]
  sub = xcdata.subset(data, rows)
  return metrics.evaluate(top, (sub.label_indptr, sub.label_ids), ks=(1, 3, 5),
                          propensities=propensities)


def evaluate_top_k(model: nnx.Module, data: xcdata.XCData, *, batch_size: int,
                   max_features: int, propensities=None) -> dict:
  """:func:`evaluate_model` of a model's own exact ``top_k`` (compiled once here)."""
  predict = nnx.jit(lambda m, ids, values: m.top_k(ids, values, 5)[1])
  return evaluate_model(lambda ids, values: predict(model, ids, values), data,
                        batch_size=batch_size, max_features=max_features,
                        propensities=propensities)


def make_prober(trainer: Trainer, data: xcdata.XCData, *, batch_size: int, max_features: int,
                max_labels: int, seed: int):
  """``step -> dict``: :func:`slidejax.nn.selection_probe` of the trainer's model's output
  layer on a fixed batch (the first ``batch_size`` rows of ``data``); its keys are its own,
  so probing leaves the training's random streams alone."""
  from slidejax.nn import selection_probe
  rows = np.arange(min(batch_size, data.num_points))
  batch = xcdata.pad_rows(data, rows, max_features=max_features, max_labels=max_labels)
  key = jax.random.fold_in(jax.random.key(seed), 0x9B0BE)

  def probe(step: int) -> dict:
    model = trainer.model   # reads the trainer's arrays (no copy)
    hidden = model.hidden(np.asarray(batch.feature_ids, np.int32),
                          np.asarray(batch.feature_values, np.float32))
    return selection_probe(model.output, hidden, np.asarray(batch.label_ids, np.int32),
                           jax.random.fold_in(key, step))

  return probe


def _config_for_checkpoint(config: TrainConfig) -> dict:
  return {name: getattr(config, name) for name in TrainConfig.STATE_FIELDS}


def _check_checkpoint_config(path: pathlib.Path, meta: dict, config: TrainConfig) -> None:
  saved = meta.get("config", {})
  mine = _config_for_checkpoint(config)
  differ = [f"{name}: checkpoint {saved.get(name)!r}, now {mine[name]!r}"
            for name in mine if saved.get(name) != mine[name]]
  if differ:
    raise CheckpointError(f"{path}: written with another configuration ("
                               + "; ".join(differ) + ")")


def _build_trainer(config: TrainConfig, train: xcdata.XCData) -> Trainer:
  """The model of ``config`` and AdamW (learning rate and decay injected: the loop sets the
  rate of every step from the run's schedule)."""
  from slidejax import nn
  links = xcdata.label_links(train, config.shortcut) if config.shortcut else None
  model = build_model(config, train.num_features, train.num_labels,
                      xcdata.label_counts(train), links)
  loss = {"softmax": nn.sampled_softmax_loss, "sigmoid": nn.sampled_sigmoid_loss}[config.loss]
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=config.lr,
                                             weight_decay=config.weight_decay)
  mesh = None
  if config.mesh:
    from slidejax import distributed
    try:
      mesh = distributed.make_mesh(**mesh_sizes(config))
    except distributed.MeshSpecError as err:
      raise TrainingError(str(err)) from None
  return Trainer(model, tx, loss=loss, mesh=mesh)


def _copy_model_state(trainer: Trainer):
  """A copy of the model's half of the trainer's state (the next step donates the original)."""
  return jax.tree.map(lambda x: x.copy(), trainer.state[0])


def _with_model_state(trainer: Trainer, model_state) -> None:
  state = trainer.state
  state[0] = model_state
  trainer.state = state


def _abstract(tree):
  """Shapes, dtypes and placements of ``tree``'s arrays (a restore places them alike)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _restore(checkpoints: TrainingCheckpoints, trainer: Trainer, config: TrainConfig
             ) -> tuple[dict, Any]:
  """Loads the newest complete checkpoint into ``trainer``; returns its loop position and
  the best model state it kept (None without one)."""
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f"{checkpoints.directory}: no complete checkpoint to resume from")
  meta = checkpoints.read_meta(step)
  _check_checkpoint_config(pathlib.Path(checkpoints.directory), meta, config)
  has_best = meta["position"].get("best_saved", False)
  abstract = {"trainer": _abstract(trainer.state),
              "best": _abstract(trainer.state[0]) if has_best else {}}
  state, meta, _ = checkpoints.restore(abstract, step)
  trainer.state = state["trainer"]
  return meta["position"], (state["best"] if has_best else None)


def fit(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None = None, *,
        checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
        keep_checkpoints: int = 2, log=print) -> dict:
  """Trains a SLIDE (or, with ``config.dense``, a dense) network and returns its results.

  ``auto`` options are resolved from ``train`` first (:func:`resolve_config`). With a
  validation share, that many training rows (drawn with ``config.seed``) are held out, the
  model is validated every epoch (or every tenth of the run), training stops after
  ``config.patience`` validations without a new best and the best model is restored. The
  learning rate follows ``config.schedule`` over the planned steps: the epochs, or as many
  steps as ``config.time_budget`` seconds buy at the step time measured over the first steps
  (planned once; the plan, the best model and the early-stopping state are checkpointed, so
  a resumed run continues exactly).

  Every step is :func:`slidejax.train.train_step` (the public ``value_and_grad`` and
  ``Optimizer`` path) through a :class:`Trainer`; with ``config.mesh`` ("data=D,model=S") the
  output layer is built in ``S`` blocks and the trainer lays the run out on that mesh
  (:mod:`slidejax.distributed`; several processes: every process calls ``fit`` alike). With
  ``config.members`` > 1 (auto: 3 with a dense output layer and a validation split) it trains
  that many networks so, member ``i`` with seed ``seed + i`` (its own split, early stopping and
  best model) and ``1 / members`` of the time budget, and returns their ensemble
  (:meth:`slidejax.nn.DenseMLP.from_members`; see ``slidejax.train._members``). Returns a
  dictionary with ``p@1``, ``p@3``,
  ``p@5``, ``ndcg@5``, ``psp@5`` (on ``test``), ``train_seconds``, ``samples_per_second``,
  ``steps``, ``planned_steps``, ``rebuilds``, ``rebuild_seconds``, ``history``
  (``{seconds, step, p@1}`` per test evaluation), ``validation`` (rows, seed, best step and
  score, ``{step, seconds, score, p@1}`` per validation), ``calibration`` (with a sampled
  output layer and a validation split: the ``tau`` of the bias shift ``--calibrate`` chose
  and the validation scores before and after; else None), ``probes`` (selection telemetry,
  see :func:`slidejax.nn.selection_probe`), ``auto`` (what each ``auto`` option became),
  ``config`` (resolved), ``truncation``, ``checkpoint`` and ``model`` (the trained model); with
  members, ``validation`` holds each member's and ``members`` each one's seed, steps, seconds
  and validation.
  Raises TrainingError (bad input), CheckpointError, TrainingDiverged (NaN/inf loss).
  """
  validate(config, train, test)
  config, notes = resolve_config(config, train)
  for name, note in notes.items():
    log(f"--{name.replace('_', '-')} auto: {note}")
  if resume and not checkpoint_dir:
    raise TrainingError("--resume needs --checkpoint DIR")
  options = dict(checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                 keep_checkpoints=keep_checkpoints, log=log)
  if config.members > 1:
    from slidejax.train._members import fit_members
    result = fit_members(config, train, test, **options)
  else:
    result = _fit_resolved(config, train, test, **options)
  result["auto"] = notes
  return result


def _fit_resolved(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None, *,
                  checkpoint_dir, resume: bool, progress: bool, keep_checkpoints: int,
                  log) -> dict:
  """``fit`` of one network, ``config`` resolved."""
  held_rows = _plan.validation_rows(train.num_points, config.validation)
  part, held = _plan.split_validation(train, held_rows, config.seed)
  if held is not None:
    log(f"validation: {held_rows} of {train.num_points} training rows held out (seed "
        f"{config.seed}); stops after {config.patience} validations without a better mean "
        f"P@1/3/5 and keeps the best model")
  widths = xcdata.suggest_widths(part)
  max_features = config.max_features or int(widths[0])
  max_labels = config.max_labels or int(widths[1])
  if not config.dense and config.mode == "per_sample" and max_labels > config.num_active:
    raise TrainingError(f"max_labels={max_labels} exceeds num_active={config.num_active}")
  config = dataclasses.replace(config, max_features=max_features, max_labels=max_labels)
  checkpoints = (TrainingCheckpoints(checkpoint_dir, keep=keep_checkpoints)
                 if checkpoint_dir else None)
  try:
    return _fit(config, part, held, test, checkpoints, resume=resume, progress=progress,
                log=log, propensity_source=train)
  finally:
    if checkpoints is not None:
      checkpoints.close()


class _Run:
  """The state of one ``fit``: trainer, loop position (what a checkpoint stores beside the
  arrays), the best model so far, and the eager work between steps."""

  def __init__(self, config: TrainConfig, train, held, test, checkpoints, *, log):
    self.config, self.train, self.held, self.test = config, train, held, test
    self.checkpoints, self.log = checkpoints, log
    self.trainer = _build_trainer(config, train)
    self.steps_per_epoch = math.ceil(train.num_points / config.batch_size)
    epoch_steps = self.steps_per_epoch * config.epochs
    horizon = None if config.time_budget else epoch_steps
    self.position = {
        "step": 0, "epoch": 0, "batch_index": 0, "train_seconds": 0.0, "rebuilds": 0,
        "rebuild_seconds": 0.0, "history": [], "probes": [], "horizon": horizon,
        "plan_from": None, "early": list(_plan.EarlyStopping()), "validations": [],
        "best_saved": False, "calibration": None, "neighbours": None, "reranker": None,
        "finished": False,
        "validations_per_run": _plan.VALIDATIONS_PER_RUN, "validation_seconds": 0.0}
    self.best = None
    self.last_checkpoint = None
    self.pending: list[tuple[int, jax.Array]] = []
    self.loss = float("nan")
    self.last_rate = None     # the rate last put into the optimizer state (None: not yet)

  # -- the plan -------------------------------------------------------------------------
  @property
  def horizon(self) -> int | None:
    return self.position["horizon"]

  def validation_every(self) -> int:
    return _plan.validation_interval(self.steps_per_epoch,
                                     self.horizon or self.steps_per_epoch * self.config.epochs,
                                     self.position["validations_per_run"])

  def plan_budget(self) -> None:
    """Turns the time budget into a step count, once, from the step time measured since the
    first step (called when the losses were just read, so the times are real)."""
    pos, budget = self.position, self.config.time_budget
    if not budget or self.horizon is not None:
      return
    spent = [pos["train_seconds"], pos["rebuild_seconds"], pos["validation_seconds"]]
    if pos["plan_from"] is None:
      pos["plan_from"] = [pos["step"], *spent]
      return
    # the steps' own time: the first table rebuilds and validations (their compilation
    # included) fall in this window and would make a short budget plan a fraction of the
    # steps it buys (a checkpoint of before validations were left out lacks their start)
    start = [*pos["plan_from"], *spent[len(pos["plan_from"]) - 1:]]
    steps = pos["step"] - start[0]
    seconds = (spent[0] - start[1]) - (spent[1] - start[2]) - (spent[2] - start[3])
    if steps >= _plan.PLAN_MIN_STEPS and seconds >= _plan.PLAN_SHARE * budget:
      validation, ends = self.time_one_validation(), self.end_validations()
      if self.held is not None and self.config.rerank != "none":
        ends += _plan.rerank_fit_passes(self.held.num_points, validation)
      bought, per_run = _plan.budget_steps(
          budget, pos["train_seconds"], pos["step"], seconds / steps,
          validation_seconds=validation, end_validations=ends,
          steps_per_epoch=self.steps_per_epoch)
      pos["horizon"] = min(bought, self.steps_per_epoch * self.config.epochs)
      pos["validations_per_run"] = per_run
      self.log_plan(seconds / steps, validation, ends)

  def log_plan(self, step_seconds: float, validation: float, ends: int) -> None:
    pos, budget = self.position, self.config.time_budget
    per_run = pos["validations_per_run"]
    note = (f"; {validation:.2f} s per validation, {per_run} per run and {ends} at the end"
            if self.held is not None else "")
    self.log(f"time budget {budget:g} s: {step_seconds * 1e3:.1f} ms per step, "
             f"{pos['horizon']} steps planned{note}")
    rest, needed = budget - pos["train_seconds"], validation * (per_run + ends)
    if needed > 0.5 * rest:
      overrun = ": the run will overrun the budget" if needed > rest else ""
      self.log(f"warning: {per_run + ends} validation passes take about {needed:.0f} s of "
               f"the {rest:.0f} s left{overrun} (a larger --time-budget or a smaller "
               f"--validation share leaves more to the steps)")

  def calibrates(self) -> bool:
    """Whether the run ends with :func:`slidejax.train.calibrate` (``--calibrate``)."""
    c = self.config
    return self.held is not None and c.calibrate != "none" and not (c.dense and not c.shortcut)

  def end_validations(self) -> int:
    """The validation passes after the last step at most (see ``_plan.end_validations``)."""
    if self.held is None:
      return 0
    return _plan.end_validations(calibrate=self.calibrates(), shortcut=bool(self.config.shortcut),
                                 sampled=not self.config.dense,
                                 neighbour_ks=len(self.neighbour_ks()),
                                 rerank=self.config.rerank != "none")

  def neighbour_ks(self) -> tuple[int, ...]:
    """The neighbour counts ``--neighbours`` tries at the end (none without votes)."""
    choice = self.config.neighbours
    if self.held is None or not choice:
      return ()
    return _plan.NEIGHBOUR_KS if choice == "auto" else (choice,)

  def time_one_validation(self) -> float:
    """The seconds of one validation pass, from a few batches timed after one that compiles
    (0 without a validation split)."""
    if self.held is None:
      return 0.0
    size = self.config.batch_size
    timed = min(self.held.num_points, _plan.PLAN_VALIDATION_BATCHES * size)
    self.evaluate(self.held, points=size)
    t0 = _now()
    self.evaluate(self.held, points=timed)
    return (_now() - t0) * math.ceil(self.held.num_points / size) / math.ceil(timed / size)

  def set_learning_rate(self) -> None:
    """Puts this step's rate into the optimizer state (only when it changed). Until a time
    budget is planned the schedule runs over the epochs' steps (the most a plan can give), so
    a budget that buys them all gives the same rates whenever the plan is made."""
    c = self.config
    horizon = self.horizon or self.steps_per_epoch * c.epochs
    rate = _plan.learning_rate(self.position["step"], base=c.lr, horizon=horizon,
                               schedule=c.schedule)
    if rate != self.last_rate:
      self.trainer.set_hyperparams(learning_rate=rate)
      self.last_rate = rate

  # -- losses -----------------------------------------------------------------------------
  def check_losses(self) -> float:
    """Waits for the queued steps' losses; raises TrainingDiverged at the first NaN/inf."""
    values = [(s, float(v)) for s, v in self.pending]
    self.pending.clear()
    for bad_step, value in values:
      if not math.isfinite(value):
        where = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
        raise TrainingDiverged(f"step {bad_step}: the loss is {value} (NaN/inf): diverged; "
                               f"lower --lr{where}")
    if values:
      self.loss = values[-1][1]
    return self.loss

  # -- validation and early stopping ----------------------------------------------------
  def predict(self, feature_ids, feature_values):
    return self.trainer.predict(feature_ids, feature_values, 5)

  def evaluate(self, data, points=None, propensities=None) -> dict:
    return evaluate_model(self.predict, data, batch_size=self.config.batch_size,
                          max_features=self.config.max_features, points=points,
                          propensities=propensities)

  def validate(self) -> bool:
    """Scores the held-out rows, keeps a new best model; True when early stopping ends the
    run (``patience`` validations in a row without a new best)."""
    pos = self.position
    result = self.evaluate(self.held)
    score = _plan.validation_score(result)
    early, better = _plan.EarlyStopping(*pos["early"]).update(score, pos["step"])
    pos["early"] = list(early)
    pos["validations"].append({"step": pos["step"], "seconds": round(pos["train_seconds"], 3),
                               "score": round(score, 6), "p@1": round(result["p@1"], 6)})
    if better:
      self.best = _copy_model_state(self.trainer)
    return early.stale >= self.config.patience

  def stopped_early(self) -> bool:
    """Whether early stopping has ended the run (``patience`` validations without a best)."""
    return (self.held is not None
            and _plan.EarlyStopping(*self.position["early"]).stale >= self.config.patience)

  def keep_best(self) -> None:
    """At the end: validates the last state if it was not, and restores the best one."""
    pos = self.position
    if self.held is None:
      return
    if not pos["validations"] or pos["validations"][-1]["step"] != pos["step"]:
      self.validate()
    early = _plan.EarlyStopping(*pos["early"])
    if early.best_step != pos["step"] and self.best is not None:
      _with_model_state(self.trainer, self.best)
      self.log(f"restored the best model: step {early.best_step} (validation mean P@1/3/5 "
               f"{early.best_score:.4f})")

  def calibrate(self) -> None:
    """At the end, once: :func:`slidejax.train.calibrate` on the held-out rows, scored by the
    trainer's compiled predictions (see ``--calibrate``); the kept best model gets the same
    changes."""
    pos, config = self.position, self.config
    if not self.calibrates() or pos.get("calibration") is not None:
      return
    model, optimizer = nnx.merge(self.trainer.graphdef, self.trainer.state)

    def score(changed) -> float:   # the model's values into the trainer, then its predictions
      self.trainer.state = nnx.state((changed, optimizer))
      return _plan.validation_score(self.evaluate(self.held))

    result = calibrate(model, self.held, xcdata.label_counts(self.train), score=score,
                       shift_biases=not config.dense)
    self.trainer.state = nnx.state((model, optimizer))
    if result["tau"] and config.transform != "none":   # the bias is part of the hashed rows
      self.trainer.rebuild()
    if (result["tau"] or result["shortcut_factor"] != 1.0) and self.best is not None:
      self.best = _copy_model_state(self.trainer)
    pos["calibration"] = result
    self.log(f"calibrated: shortcut scale x{result['shortcut_factor']:g}, output biases "
             f"shifted by {result['tau']:g} x log(1 + label count) (validation mean P@1/3/5 "
             f"{result['before']:.4f} -> {result['after']:.4f})")

  def choose_neighbours(self) -> None:
    """At the end, once (after :meth:`calibrate`): the neighbour votes' ``k`` and weight
    chosen on the held-out rows (:func:`slidejax.train.calibrate_neighbours`)."""
    pos = self.position
    if not self.neighbour_ks() or pos.get("neighbours") is not None:
      return
    result = calibrate_neighbours(self.trainer.model, self.held, self.train,
                                  ks=self.neighbour_ks(), batch_size=self.config.batch_size,
                                  max_features=self.config.max_features)
    pos["neighbours"] = result
    chosen = (f"{result['k']} neighbours, weight {result['weight']:g}" if result["weight"]
              else "none")
    self.log(f"neighbour votes: {chosen} (validation mean P@1/3/5 {result['before']:.4f} -> "
             f"{result['after']:.4f})")

  def choose_reranker(self) -> None:
    """At the end, once (after :meth:`choose_neighbours`): a reranker fit on the held-out
    rows, over the chosen votes among the training rows (:func:`slidejax.train.fit_reranker`),
    kept in the position when it pays."""
    pos, config = self.position, self.config
    if self.held is None or config.rerank == "none" or pos.get("reranker") is not None:
      return
    model = self.trainer.model     # (a copy: the votes set here do not reach the trainer)
    attach_neighbours(model, self.train, pos.get("neighbours"))
    result = fit_reranker(model, self.held, xcdata.label_counts(self.train),
                          key=jax.random.key(config.seed), batch_size=config.batch_size,
                          max_features=config.max_features)
    pos["reranker"] = result
    self.log(f"reranker: {'kept' if result['used'] else 'not kept'} (validation mean "
             f"P@1/3/5 {result['before']:.4f} -> {result['cross']:.4f} fit on the other half)")

  # -- checkpoints ------------------------------------------------------------------------
  def save(self, reason: str) -> None:
    if self.checkpoints is None:
      return
    pos = self.position
    pos["best_saved"] = self.best is not None
    meta = {"step": pos["step"], "position": pos, "reason": reason,
            "config": _config_for_checkpoint(self.config)}
    state = {"trainer": self.trainer.state, "best": self.best if self.best is not None else {}}
    self.last_checkpoint = self.checkpoints.save(pos["step"], state, meta)

  def resume(self) -> None:
    position, best = _restore(self.checkpoints, self.trainer, self.config)
    epoch_steps = self.steps_per_epoch * self.config.epochs
    if not self.config.time_budget:    # the epochs may have been extended: plan over them
      position["horizon"] = epoch_steps
    elif position["horizon"] is not None:   # a budget's plan stays, within the epochs
      position["horizon"] = min(position["horizon"], epoch_steps)
    self.position.update(position)
    self.best = best
    self.last_checkpoint = self.checkpoints.directory
    self.log(f"resumed from {self.checkpoints.directory} at step {self.position['step']}")


def _fit(config: TrainConfig, train: xcdata.XCData, held: xcdata.XCData | None,
         test: xcdata.XCData | None, checkpoints: TrainingCheckpoints | None, *, resume: bool,
         progress: bool, log, propensity_source: xcdata.XCData) -> dict:
  run = _Run(config, train, held, test, checkpoints, log=log)
  trainer = run.trainer
  probe = None
  if config.probe_every and not config.dense:
    probe = make_prober(trainer, test if test is not None else train,
                        batch_size=config.batch_size, max_features=config.max_features,
                        max_labels=config.max_labels, seed=config.seed)
  trainer.compile(config.batch_size, config.max_features, config.max_labels)
  if resume:
    run.resume()
  position = run.position
  if position.get("finished") and run.stopped_early():   # (more epochs would not train)
    log("resumed a run that early stopping had ended: its results, no further steps")
    return _results(run, None, propensity_source)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=run.horizon or run.steps_per_epoch * config.epochs,
               initial=position["step"], unit="step", dynamic_ncols=True,
               desc="dense" if config.dense else f"slide[{config.mode}]")
  interrupted, rebuilding = [], []

  def on_sigint(signum, frame):
    if interrupted and not rebuilding:  # a second Ctrl-C: stop at once (not mid-rebuild,
      raise KeyboardInterrupt           # which has already freed the old tables)
    interrupted.append(signum)

  previous_handler = None
  try:
    previous_handler = signal.signal(signal.SIGINT, on_sigint)
  except ValueError:  # not the main thread: Ctrl-C handling stays as it is
    pass
  truncation = None
  try:
    truncation = _train_epochs(run, bar, probe, interrupted, rebuilding)
  except KeyboardInterrupt:
    run.check_losses()          # never checkpoint past an unnoticed NaN
    if any(x.is_deleted() for x in jax.tree.leaves(trainer.state)
           if isinstance(x, jax.Array)):
      log("interrupted inside a rebuild (old tables already freed): no new checkpoint")
    else:
      run.save("interrupted")
    if bar is not None:
      bar.close()
    if run.last_checkpoint:
      log(f"interrupted: checkpoint saved to {run.last_checkpoint}")
    raise
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGINT, previous_handler)
    if bar is not None:
      bar.close()
  t0 = _now()
  run.keep_best()
  run.calibrate()
  run.choose_neighbours()
  run.choose_reranker()
  position["train_seconds"] += _now() - t0
  position["finished"] = True
  run.save("end")
  return _results(run, truncation, propensity_source)


def _train_epochs(run: _Run, bar, probe, interrupted: list, rebuilding: list):
  """The epochs of ``run`` from its position; returns the batches' truncation report."""
  config, trainer, position = run.config, run.trainer, run.position
  schedule = config.rehash_schedule()
  truncation = None
  for epoch in range(position["epoch"], config.epochs):
    stream = xcdata.iterate_batches(run.train, config.batch_size,
                                    max_features=config.max_features,
                                    max_labels=config.max_labels, seed=config.seed, epoch=epoch)
    stop = False
    for batch_index, raw in enumerate(stream):
      if batch_index < position["batch_index"]:
        continue
      batch = _as_train_batch(raw)
      step = position["step"]
      t0 = _now()
      run.set_learning_rate()
      out = trainer.step(batch)
      run.pending.append((step + 1, out.loss))
      position["step"] = step + 1
      position["batch_index"] = batch_index + 1
      rebuild, redraw = (schedule.is_rebuild_step(step + 1) if config.uses_tables
                         else (False, False))
      evaluate = (config.eval_every and position["step"] % config.eval_every == 0
                  and run.test is not None)
      validate = run.held is not None and position["step"] % run.validation_every() == 0
      checkpoint = config.checkpoint_every and position["step"] % config.checkpoint_every == 0
      if (len(run.pending) >= LOSS_CHECK_STEPS or rebuild or evaluate or checkpoint or validate
          or position["step"] == 1 or interrupted):
        run.check_losses()   # waits for the steps; NaN/inf -> TrainingDiverged
        run.plan_budget()
      if rebuild:
        r0 = _now()
        rebuilding.append(True)
        try:
          trainer.rebuild(redraw=redraw)
        finally:
          rebuilding.clear()
        position["rebuilds"] += 1
        position["rebuild_seconds"] += _now() - r0
      if validate:
        v0 = _now()
        stop = run.validate()
        position["validation_seconds"] += _now() - v0
      position["train_seconds"] += _now() - t0
      if evaluate:
        result = run.evaluate(run.test, points=config.eval_points)
        position["history"].append({"seconds": round(position["train_seconds"], 3),
                                    "step": position["step"], "p@1": result["p@1"]})
      if probe is not None and position["step"] % config.probe_every == 0:
        last_probe = probe(position["step"])   # outside train_seconds
        position["probes"].append({"seconds": round(position["train_seconds"], 3),
                                   "step": position["step"], **last_probe})
      if checkpoint:
        run.save("interval")
      _show_progress(run, bar)
      if run.horizon is not None and position["step"] >= run.horizon:
        stop = True
      if config.time_budget and position["train_seconds"] >= config.time_budget:
        stop = True
      if stop:
        break
      if interrupted:
        raise KeyboardInterrupt
    truncation = getattr(stream, "report", truncation)
    t0 = _now()
    run.check_losses()
    position["train_seconds"] += _now() - t0
    if stop:
      break
    position["epoch"] = epoch + 1
    position["batch_index"] = 0
  return truncation


def _show_progress(run: _Run, bar) -> None:
  if bar is None:
    return
  position = run.position
  if run.horizon is not None and bar.total != run.horizon:
    bar.total = run.horizon
  bar.update(1)
  sps = position["step"] * run.config.batch_size / max(position["train_seconds"], 1e-9)
  extra = {}
  if position["probes"]:
    extra = dict(r10=f"{position['probes'][-1]['recall@10']:.2f}",
                 tbl=f"{position['probes'][-1]['table_share']:.2f}")
  if position["validations"]:
    extra["val"] = f"{position['validations'][-1]['p@1']:.3f}"
  p1 = position["history"][-1]["p@1"] if position["history"] else float("nan")
  bar.set_postfix(loss=f"{run.loss:.3f}", p1=f"{p1:.3f}", sps=f"{sps:.0f}", **extra,
                  refresh=False)


def _reranker_summary(result: dict | None) -> dict | None:
  """:func:`fit_reranker`'s result without its weights (for the log and the JSON)."""
  return None if result is None else {n: v for n, v in result.items() if n != "weights"}


def _results(run: _Run, truncation, propensity_source: xcdata.XCData) -> dict:
  config, position = run.config, run.position
  result: dict[str, Any] = {}
  model = run.trainer.model
  attach_neighbours(model, propensity_source, position.get("neighbours"))
  attach_reranker(model, xcdata.label_counts(run.train), position.get("reranker"))
  if run.test is not None:
    props = metrics.propensities(xcdata.label_counts(propensity_source),
                                 propensity_source.num_points)
    own = model.neighbours is None and model.reranker is None
    result.update(run.evaluate(run.test, propensities=props) if own else
                  evaluate_top_k(model, run.test, batch_size=config.batch_size,
                                 max_features=config.max_features, propensities=props))
    if not position["history"] or position["history"][-1]["step"] != position["step"]:
      position["history"].append({"seconds": round(position["train_seconds"], 3),
                                  "step": position["step"], "p@1": result["p@1"]})
  early = _plan.EarlyStopping(*position["early"])
  validation = None
  if run.held is not None:
    validation = {"rows": run.held.num_points, "seed": config.seed,
                  "best_step": early.best_step, "best_score": early.best_score,
                  "history": position["validations"]}
  result.update(
      train_seconds=position["train_seconds"],
      samples_per_second=position["step"] * config.batch_size / max(position["train_seconds"],
                                                                     1e-9),
      steps=position["step"], planned_steps=run.horizon, rebuilds=position["rebuilds"],
      rebuild_seconds=position["rebuild_seconds"], history=position["history"],
      calibration=position.get("calibration"), neighbours=position.get("neighbours"),
      reranker=_reranker_summary(position.get("reranker")),
      validation=validation, probes=position["probes"], config=dataclasses.asdict(config),
      truncation=None if truncation is None else dict(truncation._asdict()
                                                      if hasattr(truncation, "_asdict")
                                                      else vars(truncation)),
      checkpoint=str(run.last_checkpoint) if run.last_checkpoint else None)
  result["model"] = model
  return result
