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
from slidejax.train._schedule import RehashSchedule
from slidejax.train._step import TrainBatch
from slidejax.train._step import Trainer


# The loop reads losses back (NaN check, progress bar) every this many steps, not after each
# one, so an accelerator can queue steps ahead; rebuilds, evaluations, checkpoints and the end
# of an epoch read them at once.
LOSS_CHECK_STEPS = 16

class TrainingError(ValueError):
  """Bad training input or configuration, raised before any training time is spent."""


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Configuration of a training run (the ``slidejax train`` flags)."""
  hidden: int = 128
  hash: str = "simhash"
  k: int | None = None
  l: int = 50
  bucket_capacity: int = 128
  range_bits: int | None = None
  num_active: int = 2048
  policy: str = "vanilla"
  threshold: int = 2
  mode: str = "shared"
  batch_size: int = 128
  lr: float = 1e-3
  epochs: int = 5
  time_budget: float | None = None   # training seconds; stops within 16 steps after it
  eval_every: int = 0
  eval_points: int = 2000
  seed: int = 0
  max_features: int | None = None
  max_labels: int | None = None
  dense: bool = False
  rebuild_first: int = 50
  rebuild_growth: float = 2.0
  rebuild_max_interval: int = 2000
  redraw_every: int = 0
  builder: str | None = None
  checkpoint_every: int = 0
  sampler: str = "lsh"
  uniform_share: float = 0.5
  correction: str = "none"
  transform: str = "none"
  in_batch_negatives: bool = True
  loss: str = "softmax"   # or "sigmoid": one-vs-all over the active set
  probe_every: int = 0   # selection telemetry (slidejax.nn.selection_probe) every n steps

  # Fields that shape the model and its state: a checkpoint must agree on all of them.
  STATE_FIELDS = ("hidden", "hash", "k", "l", "bucket_capacity", "range_bits", "num_active",
                  "policy", "mode", "batch_size", "max_features", "max_labels", "dense",
                  "seed", "lr", "sampler", "uniform_share", "correction", "transform", "loss",
                  "in_batch_negatives")

  @property
  def uses_tables(self) -> bool:
    """Whether the run selects through LSH tables (and so rebuilds them)."""
    return not self.dense and self.sampler == "lsh"

  def schedule(self) -> RehashSchedule:
    return RehashSchedule(first=self.rebuild_first, growth=self.rebuild_growth,
                          max_interval=self.rebuild_max_interval,
                          redraw_every=self.redraw_every)


def _as_train_batch(batch) -> TrainBatch:
  return TrainBatch(np.asarray(batch.feature_ids, np.int32),
                    np.asarray(batch.feature_values, np.float32),
                    np.asarray(batch.label_ids, np.int32),
                    np.asarray(batch.rows).astype(np.int32))


def validate(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None) -> None:
  """Every input check that must fail before training starts."""
  if train.num_points == 0:
    raise TrainingError("the training set is empty (0 points)")
  if len(train.label_ids) == 0:
    raise TrainingError("the training set has no labels at all")
  for name, part in (("train", train), ("test", test)):
    if part is None:
      continue
    if len(part.label_ids) and int(part.label_ids.max()) >= train.num_labels:
      raise TrainingError(f"{name} set: label id {int(part.label_ids.max())} is out of range "
                          f"for {train.num_labels} labels")
    if len(part.feature_ids) and int(part.feature_ids.max()) >= train.num_features:
      raise TrainingError(f"{name} set: feature id {int(part.feature_ids.max())} is out of "
                          f"range for {train.num_features} features")
  if test is not None:
    if test.num_features != train.num_features:
      raise TrainingError(f"test set has {test.num_features} features, the training set (and "
                          f"model) {train.num_features}")
    if test.num_labels != train.num_labels:
      raise TrainingError(f"test set has {test.num_labels} labels, the training set (and model) "
                          f"{train.num_labels}")
  if not config.dense and config.num_active > train.num_labels:
    raise TrainingError(f"num_active={config.num_active} is larger than the output layer "
                        f"({train.num_labels} labels); lower --num-active or use --dense")
  if config.batch_size <= 0 or config.epochs <= 0:
    raise TrainingError("batch size and epochs must be positive")


def build_model(config: TrainConfig, num_features: int, num_labels: int,
                label_counts=None) -> nnx.Module:
  """The network of ``config``; ``label_counts`` ``[num_labels]`` feed the unigram sampler."""
  rngs = nnx.Rngs(config.seed)
  if config.dense:
    return DenseMLP(num_features, num_labels, hidden=config.hidden, rngs=rngs)
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
  return SlideMLP(num_features, num_labels, hidden=config.hidden, num_active=config.num_active,
                  mode=config.mode, rngs=rngs, **sampling)


def evaluate_model(predict, data: xcdata.XCData, *, batch_size: int, max_features: int,
                   points: int | None = None, k: int = 5, propensities=None) -> dict:
  """P@k, nDCG@k (and PSP@k given label ``propensities``) on (the first ``points`` rows of)
  ``data``; ``predict(feature_ids [B, F], feature_values [B, F]) -> top-k ids [B, k]`` (e.g.
  :meth:`Trainer.predict`), called on fixed-size padded batches."""
  rows = np.arange(data.num_points if points is None else min(points, data.num_points))
  top = np.zeros((len(rows), k), np.int64)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), -1, chunk.dtype)])
    batch = xcdata.pad_rows(data, padded, max_features=max_features, max_labels=1)
    ids = predict(np.asarray(batch.feature_ids, np.int32),
                  np.asarray(batch.feature_values, np.float32))
    top[start:start + len(chunk)] = np.asarray(ids)[:len(chunk), :k]
  sub = xcdata.subset(data, rows)
  return metrics.evaluate(top, (sub.label_indptr, sub.label_ids), ks=(1, 3, 5),
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
  from slidejax import nn
  model = build_model(config, train.num_features, train.num_labels,
                      xcdata.label_counts(train))
  loss = {"softmax": nn.sampled_softmax_loss, "sigmoid": nn.sampled_sigmoid_loss}[config.loss]
  return Trainer(model, optax.adam(config.lr), loss=loss)


def _restore(checkpoints: TrainingCheckpoints, trainer: Trainer, config: TrainConfig) -> dict:
  """Loads the newest complete checkpoint into ``trainer``; returns its loop position."""
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f"{checkpoints.directory}: no complete checkpoint to resume from")
  meta = checkpoints.read_meta(step)
  _check_checkpoint_config(pathlib.Path(checkpoints.directory), meta, config)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.state)
  trainer.state, meta, _ = checkpoints.restore(abstract, step)
  return meta["position"]


def fit(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None = None, *,
        checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
        keep_checkpoints: int = 2, log=print) -> dict:
  """Trains a SLIDE (or, with ``config.dense``, a dense) network and returns its results.

  Every step is :func:`slidejax.train.train_step` (the public ``value_and_grad`` and
  ``Optimizer`` path) through a :class:`Trainer`. Returns a dictionary with ``p@1``, ``p@3``,
  ``p@5``, ``ndcg@5`` (and more metrics), ``train_seconds``, ``samples_per_second``,
  ``steps``, ``rebuilds``, ``rebuild_seconds``, ``history`` (``{seconds, step, p@1}`` per
  evaluation), ``probes`` (selection telemetry every ``config.probe_every`` steps, see
  :func:`slidejax.nn.selection_probe`), ``config``, ``truncation``, ``checkpoint`` and
  ``model`` (the trained model).
  Raises TrainingError (bad input), CheckpointError, TrainingDiverged (NaN/inf loss).
  """
  validate(config, train, test)
  widths = xcdata.suggest_widths(train)
  max_features = config.max_features or int(widths[0])
  max_labels = config.max_labels or int(widths[1])
  if not config.dense and config.mode == "per_sample" and max_labels > config.num_active:
    raise TrainingError(f"max_labels={max_labels} exceeds num_active={config.num_active}")
  config = dataclasses.replace(config, max_features=max_features, max_labels=max_labels)
  if resume and not checkpoint_dir:
    raise TrainingError("--resume needs --checkpoint DIR")
  checkpoints = (TrainingCheckpoints(checkpoint_dir, keep=keep_checkpoints)
                 if checkpoint_dir else None)
  try:
    return _fit(config, train, test, checkpoints, resume=resume, progress=progress, log=log)
  finally:
    if checkpoints is not None:
      checkpoints.close()


def _fit(config: TrainConfig, train: xcdata.XCData, test: xcdata.XCData | None,
         checkpoints: TrainingCheckpoints | None, *, resume: bool, progress: bool, log) -> dict:
  max_features, max_labels = config.max_features, config.max_labels
  trainer = _build_trainer(config, train)
  probe = None
  if config.probe_every and not config.dense:
    probe = make_prober(trainer, test if test is not None else train,
                        batch_size=config.batch_size, max_features=max_features,
                        max_labels=max_labels, seed=config.seed)
  trainer.compile(config.batch_size, max_features, max_labels)
  position = {"step": 0, "epoch": 0, "batch_index": 0, "train_seconds": 0.0, "rebuilds": 0,
              "rebuild_seconds": 0.0, "history": [], "probes": []}
  last_checkpoint = None
  if resume:
    position.update(_restore(checkpoints, trainer, config))
    last_checkpoint = checkpoints.directory
    log(f"resumed from {checkpoints.directory} at step {position['step']}")

  def save(reason: str):
    nonlocal last_checkpoint
    if checkpoints is not None:
      meta = {"step": position["step"], "position": position, "reason": reason,
              "config": _config_for_checkpoint(config)}
      last_checkpoint = checkpoints.save(position["step"], trainer.state, meta)

  def predict(feature_ids, feature_values):
    return trainer.predict(feature_ids, feature_values, 5)

  schedule = config.schedule()
  steps_per_epoch = math.ceil(train.num_points / config.batch_size)
  total_steps = steps_per_epoch * config.epochs
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=position["step"], unit="step", dynamic_ncols=True,
               desc="dense" if config.dense else f"slide[{config.mode}]")
  last_p1 = float("nan")
  loss = float("nan")
  pending_losses: list[tuple[int, jax.Array]] = []

  def check_losses() -> float:
    """Waits for the queued steps' losses; raises TrainingDiverged at the first NaN/inf."""
    values = [(s, float(v)) for s, v in pending_losses]
    pending_losses.clear()
    for bad_step, value in values:
      if not math.isfinite(value):
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else ""
        raise TrainingDiverged(f"step {bad_step}: the loss is {value} (NaN/inf): diverged; "
                               f"lower --lr{where}")
    return values[-1][1] if values else loss

  truncation = None
  stop = False
  interrupted = []
  rebuilding = []

  def on_sigint(signum, frame):
    if interrupted and not rebuilding:  # a second Ctrl-C: stop at once (not mid-rebuild,
      raise KeyboardInterrupt           # which has already freed the old tables)
    interrupted.append(signum)

  previous_handler = None
  try:
    previous_handler = signal.signal(signal.SIGINT, on_sigint)
  except ValueError:  # not the main thread: Ctrl-C handling stays as it is
    pass
  try:
    for epoch in range(position["epoch"], config.epochs):
      stream = xcdata.iterate_batches(train, config.batch_size, max_features=max_features,
                                      max_labels=max_labels, seed=config.seed, epoch=epoch)
      for batch_index, raw in enumerate(stream):
        if batch_index < position["batch_index"]:
          continue
        batch = _as_train_batch(raw)
        step = position["step"]
        t0 = time.perf_counter()
        out = trainer.step(batch)
        pending_losses.append((step + 1, out.loss))
        position["step"] = step + 1
        position["batch_index"] = batch_index + 1
        rebuild, redraw = (schedule.is_rebuild_step(step + 1) if config.uses_tables
                           else (False, False))
        evaluate = (config.eval_every and position["step"] % config.eval_every == 0
                    and test is not None)
        checkpoint = config.checkpoint_every and position["step"] % config.checkpoint_every == 0
        if (len(pending_losses) >= LOSS_CHECK_STEPS or rebuild or evaluate or checkpoint
            or position["step"] == 1 or interrupted):
          loss = check_losses()   # waits for the steps; NaN/inf -> TrainingDiverged
        if rebuild:
          r0 = time.perf_counter()
          rebuilding.append(True)
          try:
            trainer.rebuild(redraw=redraw)
          finally:
            rebuilding.clear()
          position["rebuilds"] += 1
          position["rebuild_seconds"] += time.perf_counter() - r0
        position["train_seconds"] += time.perf_counter() - t0
        if evaluate:
          result = evaluate_model(predict, test, batch_size=config.batch_size,
                                  max_features=max_features, points=config.eval_points)
          last_p1 = result["p@1"]
          position["history"].append({"seconds": round(position["train_seconds"], 3),
                                      "step": position["step"], "p@1": last_p1})
        if probe is not None and position["step"] % config.probe_every == 0:
          last_probe = probe(position["step"])   # outside train_seconds
          position["probes"].append({"seconds": round(position["train_seconds"], 3),
                                     "step": position["step"], **last_probe})
        if checkpoint:
          save("interval")
        if bar is not None:
          bar.update(1)
          sps = position["step"] * config.batch_size / max(position["train_seconds"], 1e-9)
          extra = {}
          if position["probes"]:
            extra = dict(r10=f"{position['probes'][-1]['recall@10']:.2f}",
                         tbl=f"{position['probes'][-1]['table_share']:.2f}")
          bar.set_postfix(loss=f"{loss:.3f}", p1=f"{last_p1:.3f}", sps=f"{sps:.0f}", **extra,
                          refresh=False)
        if config.time_budget and position["train_seconds"] >= config.time_budget:
          stop = True
          break
        if interrupted:
          raise KeyboardInterrupt
      truncation = getattr(stream, "report", truncation)
      t0 = time.perf_counter()
      check_losses()
      position["train_seconds"] += time.perf_counter() - t0
      if stop:
        break
      position["epoch"] = epoch + 1
      position["batch_index"] = 0
  except KeyboardInterrupt:
    check_losses()          # never checkpoint past an unnoticed NaN
    if any(x.is_deleted() for x in jax.tree.leaves(trainer.state)
           if isinstance(x, jax.Array)):
      log("interrupted inside a rebuild (old tables already freed): no new checkpoint")
    else:
      save("interrupted")
    if bar is not None:
      bar.close()
    if last_checkpoint:
      log(f"interrupted: checkpoint saved to {last_checkpoint}")
    raise
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGINT, previous_handler)
    if bar is not None:
      bar.close()
  save("end")
  result: dict[str, Any] = {}
  if test is not None:
    props = metrics.propensities(xcdata.label_counts(train), train.num_points)
    result.update(evaluate_model(predict, test, batch_size=config.batch_size,
                                 max_features=max_features, propensities=props))
    if not position["history"] or position["history"][-1]["step"] != position["step"]:
      position["history"].append({"seconds": round(position["train_seconds"], 3),
                                  "step": position["step"], "p@1": result["p@1"]})
  result.update(
      train_seconds=position["train_seconds"],
      samples_per_second=position["step"] * config.batch_size / max(position["train_seconds"],
                                                                     1e-9),
      steps=position["step"], rebuilds=position["rebuilds"],
      rebuild_seconds=position["rebuild_seconds"], history=position["history"],
      probes=position["probes"],
      config=dataclasses.asdict(config),
      truncation=None if truncation is None else dict(truncation._asdict()
                                                      if hasattr(truncation, "_asdict")
                                                      else vars(truncation)),
      checkpoint=str(last_checkpoint) if last_checkpoint else None)
  result["model"] = trainer.model
  return result
