"""Train slidejax (and the dense baseline) on a real extreme-classification data set.

Usage::

  python examples/train_real.py ../shared/data/bibtex/xc_format/bibtex_train.txt \
      ../shared/data/bibtex/xc_format/bibtex_test.txt [--epochs 30] [--num-active 64]

Files are in the Extreme Classification Repository text format. Prints P@1/3/5 of the SLIDE
model and of the same network trained densely, with their training times.
"""
from __future__ import annotations

import argparse

from slidejax import data as xcdata
from slidejax import train


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("train_path")
  parser.add_argument("test_path")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--num-active", type=int, default=None,
                      help="active labels per batch (default: a quarter of the labels)")
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  trn = xcdata.read_xc(args.train_path)
  tst = xcdata.read_xc(args.test_path)
  num_active = args.num_active or max(16, trn.num_labels // 4)
  common = dict(train.CLASSIC, hidden=args.hidden, lr=args.lr, epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed)
  for name, config in (
      ("slide", train.TrainConfig(num_active=num_active, l=16, **common)),
      ("dense", train.TrainConfig(dense=True, **common))):
    result = train.fit(config, trn, tst, progress=False)
    print(f"{name:6s} P@1 {result['p@1']:.4f}  P@3 {result['p@3']:.4f}  "
          f"P@5 {result['p@5']:.4f}  train {result['train_seconds']:.1f} s")


if __name__ == "__main__":
  main()
