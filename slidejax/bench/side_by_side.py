"""Two or more training paths stepped on the same batches, timed alternately.

The examples compare a user's model under two paths (``slidejax.Optimizer`` against
``nnx.Optimizer``; a sparse hidden layer against its dense twin) with this one loop: each batch
is fed to every path in turn, so machine drift hits them alike, and LSH tables are rebuilt on
SLIDE's schedule between steps.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from slidejax import data as xcdata
from slidejax import nn
from slidejax import train


def train_alternately(paths: dict[str, dict], data: xcdata.XCData, *, steps: int,
                      batch_size: int, max_features: int, max_labels: int,
                      log: Callable[[str], None] = print, log_every: int = 100
                      ) -> dict[str, float]:
  """Trains every path ``steps`` steps on the same batches of ``data``.

  Args:
    paths: name -> ``{"model", "optimizer", "step"}``, where ``step(model, optimizer, ids,
      values, labels)`` is the path's (jitted) training step returning the loss.

  Returns:
    name -> median milliseconds per step (the first two steps, which compile, left out).
  """
  if steps < 3:
    raise ValueError(f"steps must be at least 3 (two compile), got {steps}")
  schedule = train.RehashSchedule()   # SLIDE's: first rebuild after 50 steps, then growing
  times = {name: [] for name in paths}
  losses = {}
  step = epoch = 0
  while step < steps:
    for b in xcdata.iterate_batches(data, batch_size, max_features=max_features,
                                    max_labels=max_labels, seed=0, epoch=epoch):
      step += 1
      for name, path in paths.items():
        t0 = time.perf_counter()
        loss = path["step"](path["model"], path["optimizer"], b.feature_ids,
                            b.feature_values, b.label_ids)
        losses[name] = float(loss)   # waits for the step
        times[name].append(time.perf_counter() - t0)
        if schedule.is_rebuild_step(step)[0]:
          nn.rebuild_tables(path["model"])   # eagerly, between steps (keys: the layer's stream)
      if step % log_every == 0:
        log(f"step {step}: " + "  ".join(f"{n} loss {v:.3f}" for n, v in losses.items()))
      if step >= steps:
        break
    epoch += 1
  return {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}
