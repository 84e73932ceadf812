"""``TrainConfig``: what a training run is given, the checks that refuse nonsense before any
time is spent, and the resolution of its ``auto`` fields from the data."""
from __future__ import annotations

import dataclasses
import math

from slidejax import data as xcdata
from slidejax.train import _plan
from slidejax.train._schedule import RehashSchedule


# The SLIDE paper's network with slidejax 0.1's training settings (before the defaults were
# tuned for accuracy): what the README's selection and Amazon-670K results were measured with.
CLASSIC = {"hidden": 128, "dropout": 0.0, "lr": 1e-3, "schedule": "constant",
           "output_init": "small", "shortcut": 0, "batch_size": 128}


class TrainingError(ValueError):
  """Bad training input or configuration, raised before any training time is spent."""


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Configuration of a training run (the ``slidejax train`` flags).

  ``"auto"`` fields are resolved from the data by :func:`resolve_config` (see
  ``slidejax.train._plan``): ``num_active`` (dense below a label count), ``shortcut``
  (with a sparse output layer of one block), ``epochs`` (an upper
  bound, with early stopping on a validation split), ``validation`` (the share of training
  rows held out; 0 without ``epochs="auto"``), ``members`` (3 networks, each on its own split,
  with a dense output layer and a validation split; else 1), ``neighbours`` (votes of the
  nearest training rows, k and weight chosen on the validation split; none without one or on
  a mesh), ``rerank`` (a :class:`slidejax.nn.Reranker` fit on the validation split at the end
  and kept when it pays; none without one, with members or on a mesh).
  """
  hidden: int = 512             # embedding width
  dropout: float | str = "auto"   # on the embedding, training calls only
  weight_decay: float = 0.0    # AdamW's decoupled decay (rows: when touched)
  residual: bool = False       # a residual block h + relu(W h + b) after the embedding
  members: int | str = "auto"   # networks, each on its own validation split; mean logits
  shortcut: int | str = "auto"   # labels per feature of a LabelShortcut (0: none)
  neighbours: int | str = "auto"   # k of NeighbourVotes (0: none; auto: k chosen too)
  output_init: str = "small"   # or "fan_in" (std 1/sqrt(hidden))
  hash: str = "simhash"
  k: int | None = None
  l: int = 50
  bucket_capacity: int = 128
  range_bits: int | None = None
  num_active: int | str = "auto"
  policy: str = "vanilla"
  threshold: int = 2
  mode: str = "shared"
  batch_size: int | str = "auto"   # 128 with a dense output layer, 256 with a sparse one
  lr: float | str = "auto"
  schedule: str = "cosine"     # learning rate over the planned steps (see _plan)
  epochs: int | str = "auto"
  validation: float | str = "auto"
  patience: int = 3            # validations without a new best before stopping
  time_budget: float | None = None   # training seconds: the run is planned to fill them
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
  mesh: str | None = None   # "data=D,model=S": the model laid out over D x S devices
  calibrate: str = "auto"   # "auto": the shortcut's scale times a factor, then a sampled
                            # output layer's biases + tau * log(1 + label count), both chosen
                            # on the validation split (see _plan); "none": neither
  rerank: str = "auto"   # "auto": a Reranker fit on the validation split at the end, kept
                         # when it scores better on rows it was not fit on; "none"

  # Fields that shape the model, its state and the run's plan: a checkpoint must agree.
  STATE_FIELDS = ("hidden", "dropout", "weight_decay", "residual", "members", "shortcut",
                  "output_init",
                  "hash", "k",
                  "l", "bucket_capacity", "range_bits", "num_active", "policy", "mode",
                  "batch_size", "max_features", "max_labels", "dense", "seed", "lr",
                  "schedule", "validation", "patience", "sampler", "uniform_share",
                  "correction", "transform", "loss", "in_batch_negatives", "mesh",
                  "calibrate")

  @property
  def uses_tables(self) -> bool:
    """Whether the run selects through LSH tables (and so rebuilds them)."""
    return not self.dense and self.sampler == "lsh"

  def rehash_schedule(self) -> RehashSchedule:
    return RehashSchedule(first=self.rebuild_first, growth=self.rebuild_growth,
                          max_interval=self.rebuild_max_interval,
                          redraw_every=self.redraw_every)



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
  check_options(config)
  _check_mesh_options(config)
  if (not config.dense and config.num_active != "auto"
      and config.num_active > train.num_labels):
    raise TrainingError(f"num_active={config.num_active} is larger than the output layer "
                        f"({train.num_labels} labels); lower --num-active, use --num-active "
                        f"auto or --dense")


def mesh_sizes(config: TrainConfig) -> dict[str, int]:
  """``{"data": D, "model": S}`` of ``config.mesh`` (both 1 without one)."""
  from slidejax.distributed import MeshSpecError
  from slidejax.distributed import parse_mesh
  try:
    return parse_mesh(config.mesh or "")
  except MeshSpecError as err:
    raise TrainingError(str(err)) from None


def _check_mesh_options(config: TrainConfig) -> None:
  """What a run on a mesh needs: batches that split over ``data``, an active set that
  splits over ``model``, the options a layer of several blocks supports, and (several
  processes) a plan that does not hang on each process's own clock."""
  import jax
  if config.time_budget and jax.process_count() > 1:
    raise TrainingError(f"--time-budget needs a single process ({jax.process_count()} run "
                        f"here): each would plan its steps from its own clock; use --epochs")
  sizes = mesh_sizes(config)
  if config.batch_size != "auto" and config.batch_size % sizes["data"]:
    raise TrainingError(f"batch_size {config.batch_size} must be a multiple of the mesh's "
                        f"data axis ({sizes['data']})")
  shards = sizes["model"]
  if shards == 1 or config.dense:
    return
  if config.num_active != "auto" and config.num_active % shards:
    raise TrainingError(f"num_active {config.num_active} (the total active set) must split "
                        f"evenly over the mesh's model axis ({shards})")
  if (config.mode != "shared" or config.sampler == "unigram" or config.correction != "none"
      or config.shortcut not in (0, "auto")):
    raise TrainingError("a mesh with a model axis supports mode shared, samplers lsh and "
                        "uniform, no correction and no shortcut")


def _positive(value, name: str, *, integer: bool = False, zero: bool = False) -> None:
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or (
      value < 0 or (value == 0 and not zero)):
    what = "a positive integer" if integer else "a positive number"
    if zero:
      what = what.replace("positive", "non-negative")
    raise TrainingError(f"{name} must be {what}, got {value!r}")


def _share(value, name: str, *, high: float = 1.0, closed: bool = True) -> None:
  inside = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      0.0 <= value <= high if closed else 0.0 <= value < high)
  if not inside:
    interval = f"[0, {high:g}]" if closed else f"[0, {high:g})"
    raise TrainingError(f"{name} must be in {interval}, got {value!r}")


_CHOICES = {"hash": ("simhash", "wta", "dwta", "minhash"),
            "policy": ("vanilla", "topk", "threshold", "sample_topk"),
            "mode": ("shared", "per_sample"), "sampler": ("lsh", "uniform", "unigram"),
            "correction": ("none", "logq"), "transform": ("none", "center", "mips"),
            "loss": ("softmax", "sigmoid"), "schedule": _plan.SCHEDULES,
            "output_init": ("fan_in", "small"), "calibrate": ("auto", "none"),
            "rerank": ("auto", "none")}


def check_options(config: TrainConfig) -> None:
  """Refuses (TrainingError, naming the flag's field) any option outside its meaning: a
  learning rate of -1 trains nothing; it is an error, not a run."""
  for name in ("hidden", "l", "bucket_capacity", "patience"):
    _positive(getattr(config, name), name, integer=True)
  if config.batch_size != "auto":
    _positive(config.batch_size, "batch_size", integer=True)
  for name in ("k", "range_bits", "max_features", "max_labels"):
    if getattr(config, name) is not None:
      _positive(getattr(config, name), name, integer=True)
  for name in ("eval_every", "checkpoint_every", "probe_every", "redraw_every",
               "rebuild_first", "rebuild_max_interval", "seed"):
    _positive(getattr(config, name), name, integer=True, zero=True)
  _positive(config.eval_points, "eval_points", integer=True)
  if config.lr != "auto":
    _positive(config.lr, "lr")
  _positive(config.weight_decay, "weight_decay", zero=True)
  if config.time_budget is not None:
    _positive(config.time_budget, "time_budget")
  if not (isinstance(config.rebuild_growth, (int, float)) and config.rebuild_growth >= 1):
    raise TrainingError(f"rebuild_growth must be at least 1, got {config.rebuild_growth!r}")
  if config.dropout != "auto":
    _share(config.dropout, "dropout", closed=False)
  _share(config.uniform_share, "uniform_share")
  for name, value in (("num_active", config.num_active), ("epochs", config.epochs)):
    if value != "auto":
      _positive(value, name, integer=True)
  if config.shortcut != "auto":
    _positive(config.shortcut, "shortcut", integer=True, zero=True)
  if config.members != "auto":
    _positive(config.members, "members", integer=True)
  if config.neighbours != "auto":
    _positive(config.neighbours, "neighbours", integer=True, zero=True)
  if config.validation != "auto":
    _share(config.validation, "validation", high=0.5)
  for name, choices in _CHOICES.items():
    if getattr(config, name) not in choices:
      raise TrainingError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")


def resolve_config(config: TrainConfig, train: xcdata.XCData) -> tuple[TrainConfig, dict]:
  """``config`` with its ``auto`` fields resolved for ``train`` (the full training file), and
  a dict saying what each ``auto`` became and why (for the log and the results)."""
  notes = {}
  if config.mesh:   # one spelling, so a checkpoint compares meshes, not strings
    sizes = mesh_sizes(config)
    config = dataclasses.replace(config, mesh=f"data={sizes['data']},model={sizes['model']}")
  if config.num_active == "auto":
    picked = None if config.dense else _plan.auto_num_active(train.num_labels)
    if picked is None:
      config = dataclasses.replace(config, dense=True, num_active=train.num_labels)
      notes["num_active"] = (f"dense: {train.num_labels} labels <= "
                             f"{_plan.AUTO_DENSE_LABELS} (or --dense)")
    else:
      shards = mesh_sizes(config)["model"]
      picked = max(shards, picked - picked % shards)   # splits over the model axis
      config = dataclasses.replace(config, num_active=picked)
      notes["num_active"] = f"{picked} of {train.num_labels} labels"
  if config.shortcut == "auto":
    if config.dense or mesh_sizes(config)["model"] > 1:
      config = dataclasses.replace(config, shortcut=0)
      notes["shortcut"] = ("0 (a dense output layer)" if config.dense else
                           "0 (an output layer in blocks over the mesh's model axis)")
    else:
      config = dataclasses.replace(config, shortcut=_plan.AUTO_SHORTCUT)
      notes["shortcut"] = f"{_plan.AUTO_SHORTCUT} labels per feature"
  if config.lr == "auto":
    lr = _plan.AUTO_LR_DENSE if config.dense else _plan.AUTO_LR_SPARSE
    config = dataclasses.replace(config, lr=lr)
    notes["lr"] = f"{lr:g} ({'dense' if config.dense else 'sparse'} output layer)"
  if config.dropout == "auto":
    config = dataclasses.replace(config, dropout=_plan.AUTO_DROPOUT)
    notes["dropout"] = f"{_plan.AUTO_DROPOUT:g}"
  if config.batch_size == "auto":
    base = _plan.AUTO_BATCH_DENSE if config.dense else _plan.AUTO_BATCH_SPARSE
    data_axis = mesh_sizes(config)["data"]
    batch = data_axis * math.ceil(base / data_axis)   # splits over the mesh's data axis
    config = dataclasses.replace(config, batch_size=batch)
    notes["batch_size"] = f"{batch} ({'dense' if config.dense else 'sparse'} output layer)"
  if config.validation == "auto":
    rows = 0
    if config.epochs == "auto":
      low, high = _plan.AUTO_VALIDATION_ROWS
      rows = min(high, max(low, round(train.num_points * _plan.AUTO_VALIDATION)))
      rows = min(rows, train.num_points // 5)
    config = dataclasses.replace(config, validation=round(rows / train.num_points, 6))
  config = _resolve_members(config, notes)
  config = _resolve_neighbours(config, notes)
  config = _resolve_rerank(config, notes)
  if config.epochs == "auto":
    kept = train.num_points - _plan.validation_rows(train.num_points, config.validation)
    epochs = _plan.auto_epochs(math.ceil(kept / config.batch_size), config.batch_size,
                               budgeted=bool(config.time_budget))
    config = dataclasses.replace(config, epochs=epochs)
    notes["epochs"] = f"at most {epochs}, early stopping on the validation split"
  return config, notes


def _resolve_neighbours(config: TrainConfig, notes: dict) -> TrainConfig:
  """``neighbours`` resolved (after ``validation``): auto stays auto (k chosen from
  ``_plan.NEIGHBOUR_KS``) with a validation split and no mesh, else 0; a number without a
  split (the votes' weight is chosen on it) or on a mesh is refused."""
  unfit = [why for why, bad in (("no validation split", not config.validation),
                                ("a mesh", bool(config.mesh))) if bad]
  if config.neighbours == "auto":
    if unfit:
      notes["neighbours"] = f"0 ({unfit[0]})"
      return dataclasses.replace(config, neighbours=0)
    notes["neighbours"] = (f"k of {', '.join(map(str, _plan.NEIGHBOUR_KS))} and the votes' "
                           "weight chosen on the validation split at the end")
    return config
  if config.neighbours and unfit:
    raise TrainingError(f"neighbours={config.neighbours} cannot have {unfit[0]} (the votes' "
                        f"weight is chosen on the validation split; not on a mesh)")
  return config


def _resolve_rerank(config: TrainConfig, notes: dict) -> TrainConfig:
  """``rerank`` resolved (after ``members`` and ``validation``): auto stays auto with a
  validation split, one member and no mesh, else none."""
  if config.rerank != "auto":
    return config
  unfit = [why for why, bad in (("no validation split", not config.validation),
                                ("members", config.members > 1),
                                ("a mesh", bool(config.mesh))) if bad]
  if unfit:
    notes["rerank"] = f"none ({unfit[0]})"
    return dataclasses.replace(config, rerank="none")
  notes["rerank"] = "fit on the validation split at the end, kept when it pays"
  return config


def _resolve_members(config: TrainConfig, notes: dict) -> TrainConfig:
  """``members`` resolved (after ``dense``, ``shortcut`` and ``validation``): auto is
  ``_plan.AUTO_MEMBERS`` for a dense output layer with a validation split (each member holds
  out its own rows) and no shortcut, residual block or mesh; else 1. More than one member
  elsewhere is refused."""
  unfit = [why for why, bad in (("a sparse output layer", not config.dense),
                                ("a shortcut", bool(config.shortcut)),
                                ("a residual block", config.residual),
                                ("a mesh", bool(config.mesh))) if bad]
  if config.members == "auto":
    members = 1 if unfit or not config.validation else _plan.AUTO_MEMBERS
    reason = (unfit[0] if unfit else "no validation split") if members == 1 else \
        "a dense output layer, each member on its own validation split"
    notes["members"] = f"{members} ({reason})"
    return dataclasses.replace(config, members=members)
  if config.members > 1 and unfit:
    raise TrainingError(f"members={config.members} cannot have {unfit[0]} (members need a "
                        f"dense output layer, without a shortcut, residual block or mesh)")
  return config
