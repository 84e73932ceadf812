"""Time to accuracy: sparse and dense training on the same data, P@1 against wall-clock time.

Both runs use :func:`slidejax.train.fit` with periodic evaluation on the same test rows;
training seconds exclude evaluation. The result holds both curves, each run's final P@1 and
the seconds each needed to reach the dense model's final P@1 minus ``tolerance``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from slidejax import data as xcdata
from slidejax import train


def time_to_reach(history: list[dict], target: float) -> float | None:
  """Training seconds of the first evaluation with ``p@1 >= target`` (None if never)."""
  for point in history:
    if point["p@1"] >= target:
      return point["seconds"]
  return None


def run(trn: xcdata.XCData, tst: xcdata.XCData, *, sparse: train.TrainConfig,
        dense: train.TrainConfig, tolerance: float = 0.01, log=print) -> dict:
  """Trains dense then sparse; returns curves, finals and times to the common target."""
  log("training dense ...")
  dense_result = train.fit(dense, trn, tst, progress=True)
  log(f"dense: P@1 {dense_result['p@1']:.4f} in {dense_result['train_seconds']:.1f} s")
  log("training sparse ...")
  sparse_result = train.fit(sparse, trn, tst, progress=True)
  log(f"sparse: P@1 {sparse_result['p@1']:.4f} in {sparse_result['train_seconds']:.1f} s")
  target = dense_result["p@1"] - tolerance
  t_dense = time_to_reach(dense_result["history"], target)
  t_sparse = time_to_reach(sparse_result["history"], target)
  out = {"target_p@1": target, "tolerance": tolerance,
         "dense": {k: dense_result[k] for k in ("p@1", "p@5", "train_seconds", "history",
                                                "samples_per_second", "steps")},
         "sparse": {k: sparse_result[k] for k in ("p@1", "p@5", "train_seconds", "history",
                                                  "samples_per_second", "steps", "rebuilds",
                                                  "rebuild_seconds")},
         "dense_seconds_to_target": t_dense, "sparse_seconds_to_target": t_sparse,
         "time_ratio": (t_dense / t_sparse) if (t_dense and t_sparse) else None,
         "dense_config": dataclasses.asdict(dense), "sparse_config": dataclasses.asdict(sparse)}
  return out


def plot(result: dict, path: str | pathlib.Path) -> bool:
  """Saves P@1-vs-seconds curves as PNG; False when matplotlib is not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for name, style in (("dense", "o-"), ("sparse", "s-")):
    hist = result[name]["history"]
    ax.plot([p["seconds"] for p in hist], [p["p@1"] for p in hist], style, ms=3,
            label=f"{name} (final P@1 {result[name]['p@1']:.3f})")
  ax.axhline(result["target_p@1"], color="gray", ls="--", lw=1,
             label=f"dense final - {result['tolerance']:.2f}")
  ax.set_xlabel("training seconds (evaluation excluded)")
  ax.set_ylabel("P@1 (test subset)")
  ax.set_title("slidejax: time to accuracy")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def save_json(result: dict, path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_text(json.dumps(result, indent=1, default=float) + "\n")
