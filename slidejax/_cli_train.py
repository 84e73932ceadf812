"""``slidejax train``: train a SLIDE (or dense) network on XC data or the synthetic default."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

DEFAULT_PRESET = "default"
# the names of slidejax.data.SYNTH_PRESETS (not imported here: the CLI starts without NumPy)
PRESETS = ("default", "mid", "amazon670k")


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "train", help="train a SLIDE or dense network",
      description="Train SparseInput -> hidden ReLU -> SLIDE output (or --dense: full softmax). "
                  "With no --train, the embedded synthetic default is generated and used.")
  p.add_argument("--train", help="training file (XC text format, or svmlight with --format)")
  p.add_argument("--test", help="test file (same format); default: a held-out synthetic split")
  p.add_argument("--format", choices=("xc", "svmlight"), default="xc")
  p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                 help="synthetic preset when no --train is given (default: %(default)s)")
  p.add_argument("--strict", action="store_true", help="treat data warnings as errors")
  p.add_argument("--hidden", type=int, help="embedding width (default: 512)")
  p.add_argument("--dropout", type=_auto_or(float), metavar="RATE|auto",
                 help="dropout rate on the embedding while training; auto: 0.7 "
                      "(default: auto)")
  p.add_argument("--weight-decay", type=float,
                 help="AdamW's decoupled weight decay; sparse rows decay when touched "
                      "(default: 0)")
  p.add_argument("--residual", action="store_true", default=None,
                 help="add a residual block h + relu(W h + b) after the embedding")
  p.add_argument("--members", type=_auto_or(int), metavar="M|auto",
                 help="networks trained one after the other, member i with seed --seed + i "
                      "(its own validation split) and 1/M of --time-budget, saved as one model "
                      "that ranks by the mean of their logits; needs a dense output layer "
                      "without a shortcut, residual block or mesh; auto: 3 there with a "
                      "validation split, else 1 (default: auto)")
  p.add_argument("--neighbours", type=_auto_or(int), metavar="K|auto",
                 help="mix into predictions the labels of each query's K most similar "
                      "training rows (cosine of the input), with a weight chosen on the "
                      "validation split at the end (0 unless it scores better); 0: none; "
                      "auto: K of 10, 30, 100 chosen there too, none without a validation "
                      "split or on a mesh (default: auto)")
  p.add_argument("--shortcut", type=_auto_or(int), metavar="N|auto",
                 help="each input feature adds to the scores of the N labels it co-occurs "
                      "with most in the training rows, in proportion to how often (one "
                      "learned scale; 0: none); auto: 32 with a sparse output layer, none "
                      "with the dense softmax or on a mesh's model axis (default: auto)")
  p.add_argument("--output-init", choices=("fan_in", "small"),
                 help="output rows drawn with std 1/sqrt(hidden) or 1/sqrt(labels) "
                      "(default: small)")
  p.add_argument("--loss", choices=("softmax", "sigmoid"),
                 help="softmax over the active set (or every label), or one-vs-all sigmoid "
                      "over the active set (default: softmax)")
  p.add_argument("--sampler", choices=("lsh", "uniform", "unigram"),
                 help="where negatives come from: LSH tables, uniform random ids, or the "
                      "training label frequency^0.75 with the log-q correction; the last two "
                      "build no tables and take no hash options (default: lsh)")
  add_hash_options(p)
  p.add_argument("--correction", choices=("none", "logq"),
                 help="logq: the random part of the active set stands in for every neuron "
                      "not selected (log-q logit correction; lsh and uniform samplers; "
                      "unigram always corrects) (default: none)")
  p.add_argument("--num-active", type=_auto_or(int), metavar="N|auto",
                 help="neurons of the output layer computed per step; auto: every one (the "
                      "dense softmax) up to 8192 labels, else 1/16 of them rounded to a "
                      "power of two, 2048 to 8192 (default: auto)")
  p.add_argument("--mode", choices=("shared", "per_sample"),
                 help="one active set for the batch, or one per sample (default: shared)")
  p.add_argument("--no-in-batch-negatives", dest="in_batch_negatives", action="store_false",
                 default=None,
                 help="per_sample: do not add the batch's labels to each sample's set")
  p.add_argument("--probe-every", type=int, metavar="STEPS",
                 help="selection telemetry every N steps (recall of the exact top logits in "
                      "the active set, table share, bucket occupancy; not timed)")
  p.add_argument("--builder", choices=("host", "jax"), default=None,
                 help="table builder/query backend (default: host on CPU, jax elsewhere)")
  p.add_argument("--batch-size", type=_auto_or(int), metavar="N|auto",
                 help="rows per step; auto: 128 for a dense output layer, 256 for a sparse "
                      "one (default: auto)")
  p.add_argument("--lr", type=_auto_or(float), metavar="RATE|auto",
                 help="peak learning rate of AdamW; auto: 0.001 for a dense output layer, "
                      "0.005 for a sparse one (default: auto)")
  p.add_argument("--schedule", choices=("cosine", "linear", "constant"),
                 help="learning rate over the planned steps (the epochs, or what "
                      "--time-budget buys) (default: cosine)")
  p.add_argument("--epochs", type=_auto_or(int), metavar="N|auto",
                 help="auto: up to 4-100 epochs (about 5,000 steps; with --time-budget, up to "
                      "100), ended by early stopping on a validation split (default: auto)")
  p.add_argument("--validation", type=_auto_or(float), metavar="SHARE|auto",
                 help="share of the training rows held out (seeded by --seed) to validate "
                      "on, stop early and keep the best model; auto: 10%% (200-5,000 rows) "
                      "with --epochs auto, else none (default: auto)")
  p.add_argument("--patience", type=int,
                 help="validations without a new best before stopping (default: 3)")
  p.add_argument("--calibrate", choices=("auto", "none"),
                 help="auto (default): at the end, on the validation split, multiply a label "
                      "shortcut's scale by the best factor of 0.8-2 (1 unless another scores "
                      "better), then shift a sampled output layer's biases by tau * log(1 + "
                      "training count), tau the best of -0.5 to 0.2 (0 likewise); none: leave "
                      "both")
  p.add_argument("--rerank", choices=("auto", "none"),
                 help="auto (default, with a validation split and one member): at the end, "
                      "fit a small network re-ranking the model's top labels and the votes' "
                      "on the validation split, kept when it scores better on the half it "
                      "was not fit on; none: rank by the model (and votes) alone")
  p.add_argument("--time-budget", type=float, metavar="SECONDS",
                 help="training seconds granted: the step count they buy is measured early "
                      "and the learning-rate schedule spans it")
  p.add_argument("--eval-every", type=int, metavar="STEPS",
                 help="evaluate P@k on --eval-points test rows every N steps (0: at the end)")
  p.add_argument("--eval-points", type=int, help="default: 2000")
  p.add_argument("--max-features", type=int)
  p.add_argument("--max-labels", type=int)
  p.add_argument("--seed", type=int, help="model, batches and validation split (default: 0)")
  p.add_argument("--dense", action="store_true", default=None,
                 help="the dense full-softmax baseline")
  p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory")
  p.add_argument("--checkpoint-every", type=int, metavar="STEPS")
  p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
  p.add_argument("--save", metavar="DIR",
                 help="save the trained model to DIR (a new or empty directory): an orbax "
                      "checkpoint plus model.json (architecture, every resolved option, the "
                      "training label counts); use it with `slidejax predict` / `evaluate`")
  p.add_argument("--mesh", metavar="SPEC",
                 help="lay the model out over a device mesh, e.g. data=2,model=4: batches split "
                      "over data, the output layer's neurons over model (each model shard "
                      "selects num_active / model of the total --num-active); on a CPU-only "
                      "host the devices are provided (see README: Scaling out)")
  p.add_argument("--json", metavar="PATH", help="write the results as JSON")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=run)


# LSH-only options: None means "not given" (the TrainConfig default applies); given with a
# sampler that does not hash, they are refused.
HASH_OPTIONS = {"hash": "--hash", "k": "--k", "l": "--l", "range_bits": "--range-bits",
                "bucket_capacity": "--bucket-capacity", "policy": "--policy",
                "uniform_share": "--uniform-share", "transform": "--transform",
                "rebuild_first": "--rebuild-first", "rebuild_growth": "--rebuild-growth",
                "rebuild_max_interval": "--rebuild-max-interval",
                "redraw_every": "--redraw-every"}


def add_hash_options(p) -> None:
  """The LSH options of ``train`` and ``bench`` (defaults: :class:`slidejax.train.TrainConfig`)."""
  p.add_argument("--hash", choices=("simhash", "wta", "dwta", "minhash"),
                 help="hash family (default: simhash)")
  p.add_argument("--k", type=int, help="hashes per table (default: by family)")
  p.add_argument("--l", type=int, help="hash tables (default: 50)")
  p.add_argument("--range-bits", type=int, help="bucket-id bits per table")
  p.add_argument("--bucket-capacity", type=int, help="default: 128")
  p.add_argument("--policy", choices=("vanilla", "topk", "threshold", "sample_topk"),
                 help="how candidates are chosen (default: vanilla)")
  p.add_argument("--uniform-share", type=float,
                 help="share of the non-label slots kept for uniform random negatives "
                      "(default: 0.5; 0 = the tables alone, as in SLIDE)")
  p.add_argument("--transform", choices=("none", "center", "mips"),
                 help="what the tables hash: the rows as they are, centered, or the "
                      "asymmetric MIPS transform (default: none)")
  p.add_argument("--rebuild-first", type=int, help="first rebuild after N steps (default: 50)")
  p.add_argument("--rebuild-growth", type=float,
                 help="rebuild interval growth factor (default: 2)")
  p.add_argument("--rebuild-max-interval", type=int, help="default: 2000")
  p.add_argument("--redraw-every", type=int, help="new hash functions every n-th rebuild")


def hash_settings(args, sampler: str | None = None) -> dict:
  """The LSH options given on the command line; refused (ValueError) with a sampler that
  does not hash (``sampler``: the run's, default ``args.sampler``)."""
  sampler = sampler or args.sampler
  given = {name: getattr(args, name) for name in HASH_OPTIONS
           if getattr(args, name, None) is not None}
  if given and sampler != "lsh":
    flags = ", ".join(HASH_OPTIONS[name] for name in given)
    raise ValueError(f"{flags}: hash options need --sampler lsh (--sampler {sampler} "
                     f"builds no tables)")
  return given


def load_data(args):
  """(train, test, description) from the arguments."""
  from slidejax import data as xcdata
  if args.train:
    read = xcdata.read_xc if args.format == "xc" else xcdata.read_svmlight
    train = read(args.train, strict=args.strict)
    test = read(args.test, strict=args.strict) if args.test else None
    return train, test, args.train
  if args.test:
    raise ValueError("--test needs --train")
  preset = xcdata.SYNTH_PRESETS[args.preset]
  train, test = xcdata.synthesize_split(**preset, seed=0 if args.seed is None else args.seed)
  return train, test, f"synthetic preset {args.preset!r}"


# TrainConfig fields set by flags of the same name (None: not given, TrainConfig's default)
CONFIG_FLAGS = ("hidden", "dropout", "weight_decay", "residual", "members", "neighbours",
                "shortcut",
                "output_init",
                "loss", "num_active", "mode", "sampler", "batch_size", "lr", "schedule", "epochs",
                "validation", "patience", "time_budget", "eval_every", "eval_points", "seed",
                "max_features", "max_labels", "dense", "builder", "checkpoint_every",
                "probe_every", "correction", "in_batch_negatives", "mesh", "calibrate",
                "rerank")


def _auto_or(kind):
  """argparse type: the word ``auto`` or a ``kind`` number."""
  def parse(text: str):
    if text == "auto":
      return "auto"
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected auto or {kind.__name__}, got {text!r}")
  parse.__name__ = f"auto or {kind.__name__}"
  return parse


def config_from_args(args):
  """The TrainConfig of the flags given (TrainConfig's defaults for the rest); TrainingError
  for values outside their meaning (exit 2)."""
  from slidejax.train import TrainConfig
  from slidejax.train import check_options
  given = {name: getattr(args, name) for name in CONFIG_FLAGS
           if getattr(args, name, None) is not None}
  sampler = given.get("sampler", TrainConfig.sampler)
  config = TrainConfig(**given, **hash_settings(args, sampler))
  check_options(config)
  return config


def provide_cpu_devices(mesh_spec: str) -> None:
  """Lets a CPU-only host run a mesh: one CPU device more than the mesh has (the first one
  stages host callbacks: see :func:`slidejax.distributed.make_mesh`; set before JAX starts
  its backends; it does not affect GPU/TPU devices)."""
  import math

  import jax
  from slidejax import distributed
  devices = math.prod(distributed.parse_mesh(mesh_spec).values())
  jax.config.update("jax_num_cpu_devices", devices + 1)


def _check_save_dir(path: str | None) -> None:
  """Refuses a --save target that exists and is not an empty directory (before training)."""
  if path is None:
    return
  target = pathlib.Path(path)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(f"--save {path}: exists and is not an empty directory")


def _save_model(model, path: str, train, result: dict) -> None:
  import numpy as np

  from slidejax import checkpoint
  from slidejax import data as xcdata
  counts = np.asarray(xcdata.label_counts(train)).astype(int).tolist()
  checkpoint.save(model, path, metadata={
      "train_config": result["config"], "label_counts": counts,
      "num_train_points": int(train.num_points)}, overwrite=True)


def run(args) -> int:
  from slidejax import checkpoint
  from slidejax import data as xcdata
  from slidejax import train as training
  try:
    _check_save_dir(args.save)
    if args.mesh:
      provide_cpu_devices(args.mesh)
    train, test, source = load_data(args)
    config = config_from_args(args)
    print(f"data: {source}: {train.num_points} train points, "
          f"{0 if test is None else test.num_points} test, {train.num_features} features, "
          f"{train.num_labels} labels", file=sys.stderr)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result = training.fit(config, train, test, checkpoint_dir=args.checkpoint,
                          resume=args.resume, progress=not args.no_progress, log=log)
    if args.save:
      _save_model(result["model"], args.save, train, result)
      log(f"model saved to {args.save}")
  except (xcdata.XCFormatError, training.TrainingError, checkpoint.CheckpointError,
          checkpoint.ModelFileError, ValueError, OSError) as err:
    print(f"slidejax train: error: {err}", file=sys.stderr)
    return 2
  except training.TrainingDiverged as err:
    print(f"slidejax train: {err}", file=sys.stderr)
    return 3
  result.pop("model", None)
  result.pop("state", None)
  keys = [k for k in ("p@1", "p@3", "p@5", "ndcg@5", "psp@5") if k in result]
  summary = "  ".join(f"{k}={result[k]:.4f}" for k in keys)
  print(f"{summary}  steps={result['steps']}  train_seconds={result['train_seconds']:.1f}  "
        f"samples/s={result['samples_per_second']:.0f}  rebuilds={result['rebuilds']} "
        f"({result['rebuild_seconds']:.1f} s)")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
  return 0
