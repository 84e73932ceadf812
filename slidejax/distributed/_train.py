"""``train_sharded``: the training loop of ``slidejax train --mesh data=D,model=S``."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from slidejax.distributed._mesh import mesh_from_spec
from slidejax.distributed._mesh import parse_mesh
from slidejax.distributed._sharded import ShardedSlideConfig
from slidejax.distributed._sharded import ShardedSlideState
from slidejax.distributed._sharded import init_sharded
from slidejax.distributed._sharded import per_device_bytes
from slidejax.distributed._sharded import shard_batch
from slidejax.distributed._sharded import sharded_rebuild
from slidejax.distributed._sharded import sharded_top_k
from slidejax.distributed._sharded import sharded_train_step


def sharded_config_from(config, num_labels: int, model: int,
                        num_active_per_shard: int | None = None) -> ShardedSlideConfig:
  """The :class:`ShardedSlideConfig` matching a :class:`slidejax.train.TrainConfig`.

  ``num_active`` (the batch's active set on one device) is split evenly over the ``model``
  shards unless ``num_active_per_shard`` is given; ``dense`` becomes ``all_active`` (the
  exact softmax, still sharded).
  """
  rows = math.ceil(num_labels / model)
  if num_active_per_shard is None:
    num_active_per_shard = min(math.ceil(config.num_active / model), rows)
  return ShardedSlideConfig(
      num_active_per_shard=num_active_per_shard, hash=config.hash, k=config.k, l=config.l,
      range_bits=config.range_bits, bucket_capacity=config.bucket_capacity,
      policy=config.policy, threshold=config.threshold, lr=config.lr,
      all_active=bool(config.dense))


def _check(config, train, mesh_sizes: dict[str, int], sharded: ShardedSlideConfig) -> None:
  from slidejax.train import TrainingError
  if config.mode != "shared":
    raise TrainingError(f"--mesh supports --mode shared only (got {config.mode!r}): each shard "
                        f"selects one active set per batch")
  if config.batch_size % mesh_sizes["data"]:
    raise TrainingError(f"--batch-size {config.batch_size} must be a multiple of the mesh's "
                        f"data axis ({mesh_sizes['data']})")
  if config.checkpoint_every:
    raise TrainingError("--checkpoint-every is not supported with --mesh yet")
  rows = math.ceil(train.num_labels / mesh_sizes["model"])
  if not sharded.all_active and sharded.num_active_per_shard > rows:
    raise TrainingError(f"num_active_per_shard={sharded.num_active_per_shard} exceeds the "
                        f"{rows} labels per shard")


def _megabytes(parts: dict[str, int]) -> str:
  return ", ".join(f"{name} {value / 1e6:.1f} MB" for name, value in parts.items())


def evaluate_sharded(state: ShardedSlideState, data, *, batch_size: int, max_features: int,
                     points: int | None = None, k: int = 5) -> dict:
  """P@k, nDCG@k (:func:`slidejax.metrics.evaluate`) of ``state`` on (a prefix of) ``data``."""
  from slidejax.train import evaluate_model
  predict = lambda ids, values: sharded_top_k(state, ids, values, k)  # noqa: E731
  return evaluate_model(predict, data, batch_size=batch_size, max_features=max_features,
                        points=points, k=k)


# what the sharded stack (until it becomes a layout of the one model) does not support
_MESH_UNSUPPORTED = {"dropout": 0.0, "weight_decay": 0.0, "residual": False,
                     "loss": "softmax", "dense": False}


def _mesh_config(config, train, log):
  """``config`` for the sharded stack: ``auto`` sizes resolved (every label active when
  the one-device default would be dense; 5 epochs, as it has no validation split), options
  it lacks refused."""
  from slidejax.train import CLASSIC
  from slidejax.train import TrainingError
  from slidejax.train import _plan
  for name in ("dropout", "lr"):   # no dropout; the sharded stack's constant Adam rate
    if getattr(config, name) == "auto":
      config = dataclasses.replace(config, **{name: CLASSIC[name]})
  unsupported = [name for name, default in _MESH_UNSUPPORTED.items()
                 if getattr(config, name) != default]
  if unsupported or config.validation not in ("auto", 0, 0.0):
    names = ", ".join(unsupported + (["validation"] if config.validation not in
                                     ("auto", 0, 0.0) else []))
    raise TrainingError(f"--mesh does not support {names} yet")
  if config.num_active == "auto":
    config = dataclasses.replace(
        config, num_active=_plan.auto_num_active(train.num_labels) or train.num_labels)
  if config.epochs == "auto":
    config = dataclasses.replace(config, epochs=5)
    log("--mesh: --epochs auto means 5 epochs (no validation split under --mesh yet)")
  log("--mesh: constant learning rate, output rows drawn with std 1/sqrt(labels) "
      "(--schedule and --output-init do not apply yet)")
  return dataclasses.replace(config, validation=0.0)


def train_sharded(config, train, test=None, mesh_spec: str = "data=1,model=1", *,
                  num_active_per_shard: int | None = None, devices=None, progress: bool = False,
                  log=print) -> dict[str, Any]:
  """Trains a SLIDE network whose output layer is sharded over a ``data x model`` mesh.

  Args:
    config: a :class:`slidejax.train.TrainConfig` (``mode`` must be ``shared``; ``dense``
      trains the exact softmax, sharded; ``builder`` is ignored: tables are built and queried
      in pure JAX on each shard's devices).
    train, test: :class:`slidejax.data.XCData`; with several processes every process passes the
      same data and seed (each feeds its addressable part of every batch).
    mesh_spec: ``"data=D,model=S"`` (:func:`parse_mesh`), over ``devices`` (default: all).
    num_active_per_shard: default ``ceil(config.num_active / S)``.
    progress: a tqdm bar (process 0 only); log: where the one-line layout summary goes.
  Returns:
    The keys of :func:`slidejax.train.fit` (``p@1``, ``p@3``, ``p@5``, ``ndcg@5``, ... when
    ``test`` is given; ``train_seconds``, ``samples_per_second``, ``steps``, ``rebuilds``,
    ``rebuild_seconds``, ``history``, ``config``, ``truncation``) plus ``mesh``,
    ``sharded_config``, ``bytes_per_device`` and ``state`` (the trained
    :class:`ShardedSlideState`).
  Raises:
    MeshSpecError (bad ``mesh_spec``), TrainingError, TrainingDiverged.
  """
  from slidejax import data as xcdata
  from slidejax.train import TrainingDiverged
  from slidejax.train import validate
  sizes = parse_mesh(mesh_spec)
  validate(config, train, test)
  config = _mesh_config(config, train, log)
  widths = xcdata.suggest_widths(train)
  max_features = config.max_features or int(widths[0])
  max_labels = config.max_labels or int(widths[1])
  config = dataclasses.replace(config, max_features=max_features, max_labels=max_labels)
  sharded = sharded_config_from(config, train.num_labels, sizes["model"], num_active_per_shard)
  _check(config, train, sizes, sharded)
  mesh = mesh_from_spec(mesh_spec, devices=devices)
  base_key = jax.random.key(config.seed)
  state = init_sharded(jax.random.fold_in(base_key, 1), mesh, train.num_features,
                       train.num_labels, config.hidden, sharded)
  if jax.process_index() == 0:
    layout = state.layout
    log(f"mesh {sizes} over {mesh.devices.size} devices ({jax.process_count()} processes): "
        f"{layout.num_shards} label shards of {layout.rows_per_shard} rows, "
        f"{layout.num_active} active per shard; output layer per device: "
        f"{_megabytes(per_device_bytes(state))}")
  rebuild_key = jax.random.fold_in(base_key, 0x5EED)
  schedule = config.rehash_schedule()
  position = {"step": 0, "train_seconds": 0.0, "rebuilds": 0, "rebuild_seconds": 0.0,
              "history": []}
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=math.ceil(train.num_points / config.batch_size) * config.epochs,
               unit="step", dynamic_ncols=True, desc=f"slide[{mesh_spec}]")
  truncation = None
  stop = False
  try:
    for epoch in range(config.epochs):
      stream = xcdata.iterate_batches(train, config.batch_size, max_features=max_features,
                                      max_labels=max_labels, seed=config.seed, epoch=epoch)
      for raw in stream:
        step = position["step"]
        t0 = time.perf_counter()
        state, loss = sharded_train_step(state, shard_batch(state, raw),
                                         jax.random.fold_in(base_key, step))
        loss = float(loss)  # waits for the step
        if not math.isfinite(loss):
          raise TrainingDiverged(f"step {step + 1}: the loss is {loss} (NaN/inf): diverged; "
                                 f"lower --lr")
        position["step"] = step + 1
        rebuild, redraw = (False, False) if sharded.all_active else schedule.is_rebuild_step(
            step + 1)
        if rebuild:
          r0 = time.perf_counter()
          state = sharded_rebuild(state, jax.random.fold_in(rebuild_key, step), redraw)
          jax.block_until_ready(state.tables)
          position["rebuilds"] += 1
          position["rebuild_seconds"] += time.perf_counter() - r0
        position["train_seconds"] += time.perf_counter() - t0
        if config.eval_every and position["step"] % config.eval_every == 0 and test is not None:
          p1 = evaluate_sharded(state, test, batch_size=config.batch_size,
                                max_features=max_features, points=config.eval_points)["p@1"]
          position["history"].append({"seconds": round(position["train_seconds"], 3),
                                      "step": position["step"], "p@1": p1})
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if config.time_budget and position["train_seconds"] >= config.time_budget:
          stop = True
          break
      truncation = getattr(stream, "report", truncation)
      if stop:
        break
  finally:
    if bar is not None:
      bar.close()
  result: dict[str, Any] = {}
  if test is not None:
    result.update(evaluate_sharded(state, test, batch_size=config.batch_size,
                                   max_features=max_features))
    if not position["history"] or position["history"][-1]["step"] != position["step"]:
      position["history"].append({"seconds": round(position["train_seconds"], 3),
                                  "step": position["step"], "p@1": result["p@1"]})
  seconds = max(position["train_seconds"], 1e-9)
  result.update(
      train_seconds=position["train_seconds"],
      samples_per_second=position["step"] * config.batch_size / seconds,
      steps=position["step"], rebuilds=position["rebuilds"],
      rebuild_seconds=position["rebuild_seconds"], history=position["history"],
      config=dataclasses.asdict(config), mesh=sizes,
      sharded_config=dataclasses.asdict(sharded),
      bytes_per_device=per_device_bytes(state),
      truncation=None if truncation is None else dict(truncation._asdict()),
      state=state)
  return result
