"""Time to accuracy: several training runs on the same data, P@1 against wall-clock time.

Every run uses :func:`slidejax.train.fit` with periodic evaluation on the same test rows;
training seconds exclude evaluation and selection probes. The result holds each run's curve,
final P@1/P@5 and the seconds it needed to reach the *baseline* run's final P@1 (by default
the uniform-negatives sampler: the bar LSH selection has to clear).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from slidejax import data as xcdata
from slidejax import train

RUN_KEYS = ("p@1", "p@3", "p@5", "psp@5", "train_seconds", "history", "probes",
            "samples_per_second", "steps", "rebuilds", "rebuild_seconds")


def time_to_reach(history: list[dict], target: float) -> float | None:
  """Training seconds of the first evaluation with ``p@1 >= target`` (None if never)."""
  for point in history:
    if point["p@1"] >= target:
      return point["seconds"]
  return None


def run(trn: xcdata.XCData, tst: xcdata.XCData, runs: dict[str, train.TrainConfig], *,
        baseline: str = "uniform", log=print, progress: bool = True) -> dict:
  """Trains each named config in turn; returns curves, finals and times to the baseline's
  final P@1 (``baseline`` must name one of ``runs``)."""
  if baseline not in runs:
    raise ValueError(f"the baseline run {baseline!r} is not among {sorted(runs)}")
  out: dict = {"baseline": baseline, "runs": {}}
  for name, config in runs.items():
    log(f"training {name} ...")
    result = train.fit(config, trn, tst, progress=progress, log=log)
    out["runs"][name] = {k: result[k] for k in RUN_KEYS if k in result}
    out["runs"][name]["config"] = dataclasses.asdict(config)
    log(f"{name}: P@1 {result['p@1']:.4f} P@5 {result['p@5']:.4f} in "
        f"{result['train_seconds']:.1f} s ({result['steps']} steps)")
  base = out["runs"][baseline]
  out["target_p@1"] = base["p@1"]
  for entry in out["runs"].values():
    reached = time_to_reach(entry["history"], base["p@1"])
    entry["seconds_to_target"] = reached
    entry["time_ratio"] = base["train_seconds"] / reached if reached else None
    entry["p@1_minus_baseline"] = entry["p@1"] - base["p@1"]
  return out


def summary(result: dict) -> str:
  """One line per run: finals, time to the baseline's final P@1, and the time ratio."""
  lines = [f"{'run':>22} {'P@1':>7} {'P@5':>7} {'seconds':>8} {'to target':>10} "
           f"{'speed-up':>9} {'dP@1':>7}"]
  for name, e in result["runs"].items():
    to = "never" if e["seconds_to_target"] is None else f"{e['seconds_to_target']:.1f}"
    ratio = "-" if e["time_ratio"] is None else f"{e['time_ratio']:.2f}x"
    lines.append(f"{name:>22} {e['p@1']:7.4f} {e['p@5']:7.4f} {e['train_seconds']:8.1f} "
                 f"{to:>10} {ratio:>9} {e['p@1_minus_baseline']:+7.4f}")
  lines.append(f"target: the {result['baseline']} run's final P@1 {result['target_p@1']:.4f}")
  return "\n".join(lines)


def plot(result: dict, path: str | pathlib.Path) -> bool:
  """Saves P@1-vs-seconds curves of every run as PNG; False when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
  for name, entry in result["runs"].items():
    hist = entry["history"]
    ax.plot([p["seconds"] for p in hist], [p["p@1"] for p in hist], "o-", ms=2.5,
            label=f"{name} (final P@1 {entry['p@1']:.3f})")
  ax.axhline(result["target_p@1"], color="gray", ls="--", lw=1,
             label=f"{result['baseline']} final")
  ax.set_xlabel("training seconds (evaluation excluded)")
  ax.set_ylabel("P@1 (test subset)")
  ax.set_title("slidejax: time to accuracy by sampler")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def save_json(result: dict, path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_text(json.dumps(result, indent=1, default=float) + "\n")
