"""When to rebuild the LSH tables and when to draw new hash functions."""
from __future__ import annotations

import math
from typing import NamedTuple


class RehashSchedule(NamedTuple):
  """SLIDE's schedule: first rebuild after ``first`` steps, then intervals growing by
  ``growth`` per rebuild (``growth=1``: a fixed interval), capped at ``max_interval``.
  ``redraw_every``: draw new hash functions at every n-th rebuild (0: never).
  """
  first: int = 50
  growth: float = 2.0
  max_interval: int = 2000
  redraw_every: int = 0

  def rebuild_steps(self, until: int) -> list[int]:
    """The steps (1-based counts of finished steps) after which a rebuild runs, up to ``until``."""
    steps, interval, at = [], float(self.first), self.first
    while at <= until:
      steps.append(at)
      interval = min(interval * self.growth, float(self.max_interval))
      at += max(1, int(math.floor(interval)))
    return steps

  def is_rebuild_step(self, step: int) -> tuple[bool, bool]:
    """(rebuild?, redraw?) after ``step`` finished steps."""
    if self.first <= 0 or step < self.first:
      return False, False
    steps = self.rebuild_steps(step)
    if not steps or steps[-1] != step:
      return False, False
    index = len(steps)  # 1-based number of this rebuild
    return True, bool(self.redraw_every) and index % self.redraw_every == 0


def fixed_interval(every: int, *, redraw_every: int = 0) -> RehashSchedule:
  """Rebuild every ``every`` steps."""
  return RehashSchedule(first=every, growth=1.0, max_interval=every, redraw_every=redraw_every)
