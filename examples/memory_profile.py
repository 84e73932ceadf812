"""Resident memory of a sparse training process at Amazon-670K shape, phase by phase.

Usage: ``python examples/memory_profile.py`` (default malloc; prefix the CLI's malloc
settings, see ``slidejax.cli.MALLOC_TUNING``, to measure those).
Prints VmRSS (now) and VmHWM (peak so far) from /proc/self/status after each phase.
"""
from __future__ import annotations

import jax
import optax
from flax import nnx

from slidejax import nn
from slidejax import train
from slidejax.bench import steps


def rss() -> str:
  with open("/proc/self/status", encoding="ascii") as f:
    fields = dict(line.split(":", 1) for line in f if ":" in line)
  now, peak = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
  return f"rss {now:6.0f} MB   peak {peak:6.0f} MB"


def main() -> None:
  s = steps.SCENARIOS["amazon670k"]
  batches = steps.random_batches(s, 2)
  print(f"{'start':>22}: {rss()}")
  model = nn.SlideMLP(s.features, s.labels, hidden=s.hidden, num_active=2048, rngs=nnx.Rngs(0))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"{'model + tables':>22}: {rss()}   (parameters + Adam: {12 * params / 2**20:.0f} MB)")
  trainer = train.Trainer(model, optax.adam(1e-4))
  print(f"{'optimizer (Adam)':>22}: {rss()}")
  trainer.compile(s.batch_size, s.max_features, batches[0].label_ids.shape[1])
  print(f"{'step compiled':>22}: {rss()}")
  for i in range(10):
    out = trainer.step(batches[i % 2])
  out.loss.block_until_ready()
  print(f"{'10 steps':>22}: {rss()}")
  trainer.rebuild()
  print(f"{'rebuild':>22}: {rss()}")
  for i in range(10):
    out = trainer.step(batches[i % 2])
  out.loss.block_until_ready()
  print(f"{'10 more steps':>22}: {rss()}")

if __name__ == "__main__":
  main()
