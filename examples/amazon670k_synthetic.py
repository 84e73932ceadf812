"""SLIDE training at Amazon-670K shape on synthetic data (135,909 features, 670,091 labels).

Usage: ``python examples/amazon670k_synthetic.py [--points 200000] [--time-budget 300]``

Generates the data (under a minute), then trains the batch-shared SLIDE network with the
default rehash schedule and prints P@k and throughput. Needs about 4 GB of memory.
"""
from __future__ import annotations

import argparse

from slidejax import data as xcdata
from slidejax import train


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=200_000)
  parser.add_argument("--num-active", type=int, default=8192)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--time-budget", type=float, default=300.0)
  parser.add_argument("--hash", default="simhash", choices=("simhash", "wta", "dwta", "minhash"))
  args = parser.parse_args()
  preset = dict(xcdata.SYNTH_PRESETS["amazon670k"], num_points=args.points)
  trn, tst = xcdata.synthesize_split(**preset, seed=0)
  print(f"{trn.num_points} train / {tst.num_points} test points, {trn.num_features} features, "
        f"{trn.num_labels} labels")
  config = train.TrainConfig(**train.CLASSIC, num_active=args.num_active, hash=args.hash,
                             epochs=args.epochs,
                             time_budget=args.time_budget, eval_every=200, eval_points=1000)
  result = train.fit(config, trn, xcdata.subset(tst, range(min(5000, tst.num_points))))
  print(f"P@1 {result['p@1']:.4f}  P@5 {result['p@5']:.4f}  {result['steps']} steps in "
        f"{result['train_seconds']:.1f} s ({result['samples_per_second']:.0f} samples/s), "
        f"{result['rebuilds']} rebuilds taking {result['rebuild_seconds']:.1f} s")


if __name__ == "__main__":
  main()
