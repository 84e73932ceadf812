"""``slidejax bench``: dense-vs-sparse step timings and time-to-accuracy, side by side."""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from slidejax._cli_train import HASH_OPTIONS
from slidejax._cli_train import PRESETS
from slidejax._cli_train import add_hash_options
from slidejax._cli_train import hash_settings


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "bench", help="benchmark sparse against dense training on this machine",
      description="Times the dense JAX step and slidejax's sparse steps alternately in one "
                  "process (medians, speed-ups, breakdown, peak RSS), or with "
                  "--time-to-accuracy trains both and compares P@1 against wall time.")
  p.add_argument("scenario", nargs="?", default="amazon670k",
                 help="amazon670k | delicious200k | amazon67k | small | custom "
                      "(default: %(default)s)")
  p.add_argument("--features", type=int)
  p.add_argument("--labels", type=int)
  p.add_argument("--hidden", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--nnz", type=int)
  p.add_argument("--labels-per-point", type=int)
  p.add_argument("--modes", default="shared:2048,shared:8192,per_sample:1024",
                 help="comma-separated MODE:NUM_ACTIVE list (default: %(default)s)")
  p.add_argument("--sampler", choices=("lsh", "uniform", "unigram"), default="lsh",
                 help="negatives of the timed sparse modes (default: %(default)s)")
  add_hash_options(p)
  p.add_argument("--builder", choices=("host", "jax"), default=None)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--no-dense", action="store_true",
                 help="time the sparse modes alone (their own peak RSS; no speed-up ratio)")
  p.add_argument("--label-scaling", type=int, metavar="LABELS",
                 help="time the sparse modes at the scenario's labels and at LABELS, "
                      "alternating in one process, and report the ratio")
  p.add_argument("--mesh", metavar="SPEC",
                 help="time the shared step on a device mesh (e.g. data=2,model=2) beside one "
                      "device, and the bytes each mesh step communicates; --num-active is "
                      "the total active set, split over model")
  p.add_argument("--time-to-accuracy", action="store_true",
                 help="train every run of --runs on the same data, P@1 against seconds")
  p.add_argument("--runs", default="dense,uniform,unigram,lsh,lsh:per_sample",
                 help="time-to-accuracy runs: comma-separated SAMPLER[:MODE], SAMPLER one of "
                      "dense, uniform, unigram, lsh; MODE shared or per_sample "
                      "(default: %(default)s)")
  p.add_argument("--per-sample-active", type=int, default=1024,
                 help="num_active of per_sample runs (default: %(default)s)")
  p.add_argument("--probe-every", type=int, default=0, metavar="STEPS",
                 help="selection telemetry of every sparse run every N steps")
  p.add_argument("--preset", default="mid", choices=PRESETS, help="synthetic preset for --time-to-accuracy")
  p.add_argument("--accuracy", action="store_true",
                 help="slidejax (train's defaults and --time-budget) beside napkinXC's PLT "
                      "and Omikuji (when installed: pip install 'slidejax[trees]') on each "
                      "--train/--test pair: P@1/3/5, PSP@5, training and prediction seconds")
  p.add_argument("--methods", default="slidejax,napkinxc,omikuji",
                 help="--accuracy: comma-separated methods (default: %(default)s)")
  p.add_argument("--train", action="append",
                 help="training file (XC format) for --time-to-accuracy (one) or --accuracy "
                      "(repeat with --test for several data sets)")
  p.add_argument("--test", action="append", help="test file (XC format), one per --train")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--num-active", type=int, default=4096,
                 help="num_active of the shared-mode runs (default: %(default)s)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-points", type=int, default=2000)
  p.add_argument("--time-budget", type=float, default=None,
                 help="seconds per run (time to accuracy)")
  p.add_argument("--plot", default="time_to_accuracy.png", help="PNG path (needs matplotlib)")
  p.add_argument("--json", metavar="PATH")
  p.set_defaults(func=run)


def _scenario(args):
  from slidejax.bench import steps
  base = steps.SCENARIOS.get(args.scenario)
  if base is None:
    if args.scenario != "custom":
      raise ValueError(f"unknown scenario {args.scenario!r}; expected one of "
                       f"{sorted(steps.SCENARIOS)} or custom")
    if not (args.features and args.labels):
      raise ValueError("custom scenario needs --features and --labels")
    base = steps.Scenario("custom", args.features, args.labels)
  overrides = {"features": args.features, "labels": args.labels, "hidden": args.hidden,
               "batch_size": args.batch_size, "nnz": args.nnz,
               "labels_per_point": args.labels_per_point}
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v})


def _modes(text: str):
  out = []
  for item in text.split(","):
    mode, _, size = item.partition(":")
    if mode not in ("shared", "per_sample") or not size.isdigit():
      raise ValueError(f"--modes: {item!r} is not MODE:NUM_ACTIVE with MODE shared|per_sample")
    out.append((mode, int(size)))
  return tuple(out)


def _tta_runs(args, num_labels: int, common: dict) -> dict:
  """The named TrainConfigs of ``--runs``."""
  from slidejax import train
  hashing = hash_settings(argparse.Namespace(**{**vars(args), "sampler": "lsh"}))
  runs = {}
  for item in args.runs.split(","):
    sampler, _, mode = item.partition(":")
    mode = mode or "shared"
    if sampler not in ("dense", "uniform", "unigram", "lsh") or mode not in ("shared",
                                                                             "per_sample"):
      raise ValueError(f"--runs: {item!r} is not SAMPLER[:MODE] (SAMPLER dense, uniform, "
                       f"unigram or lsh; MODE shared or per_sample)")
    if sampler == "dense":
      runs["dense"] = train.TrainConfig(dense=True, **common)
      continue
    size = args.num_active if mode == "shared" else args.per_sample_active
    options = hashing if sampler == "lsh" else {}
    name = sampler if mode == "shared" else f"{sampler}:{mode}"
    runs[name] = train.TrainConfig(sampler=sampler, mode=mode, num_active=min(size, num_labels),
                                   builder=args.builder, probe_every=args.probe_every,
                                   **options, **common)
  return runs


def _time_to_accuracy(args) -> dict:
  from slidejax import data as xcdata
  from slidejax.bench import steps
  from slidejax import train
  from slidejax.bench import time_to_accuracy as tta
  if args.train:
    if len(args.train) != 1 or len(args.test or []) != 1:
      raise ValueError("--time-to-accuracy takes one --train and one --test")
    trn = xcdata.read_xc(args.train[0])
    tst = xcdata.read_xc(args.test[0])
  else:
    trn, tst = xcdata.synthesize_split(**xcdata.SYNTH_PRESETS[args.preset], seed=0)
  # the classic network and constant rate: the curves compare samplers step for step
  common = dict(train.CLASSIC, epochs=args.epochs, lr=args.lr, eval_every=args.eval_every,
                eval_points=args.eval_points, time_budget=args.time_budget,
                batch_size=args.batch_size or train.CLASSIC["batch_size"],
                hidden=args.hidden or train.CLASSIC["hidden"])
  runs = _tta_runs(args, trn.num_labels, common)
  baseline = "uniform" if "uniform" in runs else next(iter(runs))
  result = tta.run(trn, tst, runs, baseline=baseline, log=lambda m: print(m, file=sys.stderr))
  if args.plot and tta.plot(result, args.plot):
    result["plot"] = args.plot
    print(f"plot: {args.plot}")
  elif args.plot:
    print("plot skipped: matplotlib is not installed (pip install 'slidejax[plot]')")
  print(tta.summary(result))
  probes = {name: e["probes"][-1] for name, e in result["runs"].items() if e.get("probes")}
  if probes:
    print(steps.probe_table(probes))
  return result


def _step_hashing(args) -> dict:
  """Hash options of the step benchmark (which times hash, l and k only)."""
  hashing = hash_settings(args)
  unused = sorted(HASH_OPTIONS[n] for n in hashing if n not in ("hash", "l", "k"))
  if unused:
    raise ValueError(f"{', '.join(unused)}: only --hash, --l and --k apply to step timings")
  return hashing


def _accuracy(args) -> dict:
  from slidejax import train
  from slidejax.bench import accuracy
  pairs = list(zip(args.train or [], args.test or []))
  if not pairs or len(args.train) != len(args.test or []):
    raise ValueError("--accuracy needs --train and --test, as many of each")
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(accuracy.METHODS))
  if unknown:
    raise ValueError(f"--methods: unknown {', '.join(unknown)} (known: "
                     f"{', '.join(accuracy.METHODS)})")
  config = train.TrainConfig(time_budget=args.time_budget)
  train.check_options(config)
  results = {}
  for train_path, test_path in pairs:
    name = pathlib.Path(train_path).stem.removesuffix("_train")
    results[name] = accuracy.compare(train_path, test_path, methods=methods, config=config,
                                     log=lambda m: print(m, file=sys.stderr))
  print(accuracy.table(results))
  return results


def run(args) -> int:
  try:
    if args.accuracy:
      result = _accuracy(args)
    elif args.time_to_accuracy:
      result = _time_to_accuracy(args)
    elif args.mesh:
      from slidejax._cli_train import provide_cpu_devices
      from slidejax.bench import mesh
      provide_cpu_devices(args.mesh)
      hashing = _step_hashing(args)
      if hashing:
        raise ValueError("--mesh times the default hash settings")
      result = mesh.run(_scenario(args), args.mesh, num_active=args.num_active,
                        repeats=args.repeats, backend=args.builder)
    elif args.label_scaling is not None:
      from slidejax.bench import steps
      scenario = _scenario(args)
      if not 0 < args.label_scaling < scenario.labels:
        raise ValueError(f"--label-scaling must be between 1 and {scenario.labels - 1}")
      hashing = _step_hashing(args)
      result = steps.run_label_scaling(scenario, args.label_scaling, modes=_modes(args.modes),
                                       hash_name=hashing.get("hash", "simhash"),
                                       l=hashing.get("l", 50), k=hashing.get("k"),
                                       repeats=args.repeats, backend=args.builder)
      print(f"largest step-time ratio {result['max_ratio']:.2f} "
            f"({scenario.labels} vs {args.label_scaling} labels)")
    else:
      from slidejax.bench import steps
      hashing = _step_hashing(args)
      result = steps.run(_scenario(args), modes=_modes(args.modes),
                         hash_name=hashing.get("hash", "simhash"), l=hashing.get("l", 50),
                         k=hashing.get("k"), repeats=args.repeats, backend=args.builder,
                         with_dense=not args.no_dense, sampler=args.sampler)
      print(f"best sparse {result['sparse_step_ms']:.1f} ms vs dense "
            f"{result['dense_step_ms']:.1f} ms: {result['speedup']:.1f}x; "
            f"peak RSS {result['peak_rss_mb']:.0f} MB (parameters + Adam state "
            f"{result['params_and_adam_mb']:.0f} MB)")
  except (ValueError, OSError) as err:
    print(f"slidejax bench: error: {err}", file=sys.stderr)
    return 2
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
  return 0
