"""The ``slidejax`` command line: ``data``, ``train``, ``predict``, ``evaluate`` and ``bench``.

Each command group lives in its own private module exposing ``add_parser(subparsers)``;
the parsers set ``func`` to a callable taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# glibc malloc settings that stop XLA's CPU runtime from returning and re-faulting its large
# temporary buffers every step (measured: about 2x faster steps; the price is a higher
# retained RSS). They only act if set before the process starts, so the CLI re-executes
# itself once with them for the heavy commands. SLIDEJAX_MALLOC=0 turns this off.
MALLOC_TUNING = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "268435456",
}
_HEAVY_COMMANDS = ("train", "bench", "predict", "evaluate")


def _reexec_with_malloc_tuning(argv: list[str]) -> None:
  if (not sys.platform.startswith("linux") or os.environ.get("SLIDEJAX_MALLOC") == "0"
      or all(os.environ.get(k) == v for k, v in MALLOC_TUNING.items())
      or not argv or argv[0] not in _HEAVY_COMMANDS):
    return
  env = dict(os.environ, **MALLOC_TUNING)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "slidejax", *argv], env)

_COMMAND_MODULES = (
    "slidejax._cli_data",
    "slidejax._cli_train",
    "slidejax._cli_bench",
    "slidejax._cli_predict",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="slidejax",
      description="SLIDE-style sparse training for extreme classification in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as err:
      if err.name == name:  # that command group is not built yet
        continue
      raise
    module.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; with ``argv=None`` (the console script) heavy commands re-exec once with
  tuned malloc settings."""
  if argv is None:
    _reexec_with_malloc_tuning(sys.argv[1:])
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
