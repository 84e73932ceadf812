"""Screening of selection settings on a validation split (never the test split).

Two measurements, as in README "Selection":

  # P@1/P@5 on 4,000 validation points after a fixed training-time budget, one run per config
  python examples/selection_screen.py train 100000 90 '{"sampler":"uniform","num_active":4096}' \
      '{"num_active":4096,"uniform_share":0.5}'

  # retrieval quality of several selection configs on ONE model trained with uniform negatives
  python examples/selection_screen.py probe 100000 60 '{"num_active":4096,"policy":"topk"}'

DATA is a label count (synthetic, 220K points, 100K features, 75 nonzeros and 5 labels a point,
seed 1) or an XC-format training file; the validation split is 4,000 points carved from it (seed
7). Each CONFIG is JSON of :class:`slidejax.train.TrainConfig` fields (probe: of
:class:`slidejax.nn.SlideDense` options). Runs are sequential: never run two screens at once on
a small machine, the budgets are wall-clock.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slidejax import data as xcdata
from slidejax import nn
from slidejax import train

VALIDATION_POINTS = 4000


def load(source: str):
  if source.isdigit():
    full, _ = xcdata.synthesize_split(num_points=220_000, num_features=100_000,
                                      num_labels=int(source), avg_nnz=75, avg_labels=5,
                                      test_fraction=0.0001, seed=1)
  else:
    full = xcdata.read_xc(source)
  perm = np.random.default_rng(7).permutation(full.num_points)
  return (xcdata.subset(full, np.sort(perm[VALIDATION_POINTS:])),
          xcdata.subset(full, np.sort(perm[:VALIDATION_POINTS])))


def screen_training(trn, val, budget: float, configs: list[str]) -> None:
  for spec in configs:
    config = train.TrainConfig(**{**train.CLASSIC, "epochs": 1000, "time_budget": budget,
                                  "eval_points": VALIDATION_POINTS, **json.loads(spec)})
    r = train.fit(config, trn, val, progress=False, log=lambda m: None)
    print(json.dumps({"config": spec, "p@1": round(r["p@1"], 4), "p@5": round(r["p@5"], 4),
                      "steps": r["steps"], "seconds": round(r["train_seconds"], 1),
                      "rebuild_seconds": round(r["rebuild_seconds"], 1)}), flush=True)


def screen_retrieval(trn, val, budget: float, configs: list[str]) -> None:
  r = train.fit(train.TrainConfig(**train.CLASSIC, sampler="uniform", num_active=4096, epochs=1000,
                                  time_budget=budget), trn, val, progress=False,
                log=lambda m: None)
  model, cfg = r["model"], r["config"]
  print(json.dumps({"trained_p@1": round(r["p@1"], 4), "steps": r["steps"]}), flush=True)
  kernel, bias = model.output.kernel[...], model.output.bias[...]
  batches = [xcdata.pad_rows(val, np.arange(i * 128, (i + 1) * 128),
                             max_features=cfg["max_features"], max_labels=cfg["max_labels"])
             for i in range(3)]
  for spec in configs:
    layer = nn.SlideDense(model.output.in_features, trn.num_labels, rngs=nnx.Rngs(1),
                          kernel_init=lambda key, shape, dtype: kernel, **json.loads(spec))
    layer.bias.set_value(bias)
    sums: dict[str, list[float]] = {}
    for i, b in enumerate(batches):
      h = model.hidden(jnp.asarray(b.feature_ids, jnp.int32),
                       jnp.asarray(b.feature_values, jnp.float32))
      probe = nn.selection_probe(layer, h, jnp.asarray(b.label_ids, jnp.int32),
                                 jax.random.key(i))
      for k, v in probe.items():
        sums.setdefault(k, []).append(v)
    print(json.dumps({"config": spec, **{k: round(float(np.mean(v)), 3)
                                         for k, v in sums.items()}}), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("train", "probe"))
  p.add_argument("data", help="a label count (synthetic) or an XC training file")
  p.add_argument("budget", type=float, help="training seconds per run")
  p.add_argument("configs", nargs="+", help="JSON objects")
  p.add_argument("--adam-eps", type=float, default=None,
                 help="Adam's epsilon for every parameter (default: optax's 1e-8)")
  args = p.parse_args()
  if args.adam_eps is not None:
    adam = optax.adam
    optax.adam = lambda lr, **kw: adam(lr, eps=args.adam_eps, **kw)
  trn, val = load(args.data)
  (screen_training if args.what == "train" else screen_retrieval)(trn, val, args.budget,
                                                                   args.configs)


if __name__ == "__main__":
  main()
