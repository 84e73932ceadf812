"""Reproduces the README's accuracy table: SLIDE vs dense on bibtex, delicious, synthetic.

Usage: ``python examples/accuracy_table.py [DATA_DIR]`` (default ``../shared/data``; real
datasets that are absent are skipped). Runs ``slidejax train`` for each row (JSON results under
``runs/``) and prints a markdown table.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROWS = [
    ("bibtex", ["--hidden", "512", "--lr", "5e-4", "--epochs", "20", "--num-active", "40",
                "--l", "16"]),
    ("delicious", ["--hidden", "128", "--lr", "1e-3", "--epochs", "10", "--num-active", "512",
                   "--l", "16"]),
    ("synthetic default", []),
]


def main() -> None:
  data_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
  out_dir = pathlib.Path("runs")
  out_dir.mkdir(exist_ok=True)
  lines = ["| data | model | P@1 | P@3 | P@5 | train s | command |", "|---|---|---|---|---|---|---|"]
  for name, options in ROWS:
    if name.startswith("synthetic"):
      data = []
    else:
      folder = data_dir / name / "xc_format"
      if not folder.is_dir():
        print(f"skipping {name}: {folder} not found", file=sys.stderr)
        continue
      data = ["--train", str(folder / f"{name}_train.txt"),
              "--test", str(folder / f"{name}_test.txt")]
    for model in ("slide", "dense"):
      tag = name.split()[-1]
      json_path = out_dir / f"accuracy_{tag}_{model}.json"
      cmd = ["slidejax", "train", *data, *options, *(["--dense"] if model == "dense" else []),
             "--no-progress", "--json", str(json_path)]
      print(" ".join(cmd), file=sys.stderr)
      subprocess.run(cmd, check=True)
      r = json.loads(json_path.read_text())
      shown = " ".join(c for c in cmd if c not in ("--no-progress",) and not c.endswith(".json")
                       and c != "--json")
      lines.append(f"| {name} | {model} | {r['p@1']:.4f} | {r['p@3']:.4f} | {r['p@5']:.4f} | "
                   f"{r['train_seconds']:.1f} | `{shown}` |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
