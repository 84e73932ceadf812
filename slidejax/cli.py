"""The ``slidejax`` command line: ``slidejax data ...``, ``slidejax train ...``, ``slidejax bench ...``.

Each command group lives in its own private module exposing ``add_parser(subparsers)``;
the parsers set ``func`` to a callable taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "slidejax._cli_data",
    "slidejax._cli_train",
    "slidejax._cli_bench",
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
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
