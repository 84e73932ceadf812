"""slidejax: SLIDE-style LSH sparse training for extreme classification in JAX/Flax NNX.

The public names below are defined in their subpackages and loaded on first use, so that
``import slidejax`` (and the CLI's ``--help`` and ``data`` commands) do not import jax, flax
or orbax.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Optimizer": "slidejax.optim",
    "RowGrad": "slidejax.optim",
    "value_and_grad": "slidejax.nn",
    "grad": "slidejax.nn",
    "save": "slidejax.checkpoint",
    "load": "slidejax.checkpoint",
}
_SUBPACKAGES = ("bench", "checkpoint", "data", "distributed", "lsh", "metrics", "nn", "optim",
                "train")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
  import importlib
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in _SUBPACKAGES:
    value = importlib.import_module(f"slidejax.{name}")
  else:
    raise AttributeError(f"module 'slidejax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
