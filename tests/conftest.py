"""Test configuration: several CPU devices, warnings as errors (pyproject).

Strict dtype promotion is on for our own numerical code through the ``strict_promotion``
fixture; it is not global because optax's Adam itself mixes Python floats with int32 counts.
"""
import os

# Several CPU devices for the sharding tests (4 for a data=2,model=2 mesh and the first one,
# where host callbacks stage their arguments); set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 5)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path of ../shared/data; skips the test when it is absent (a user's clone has none)."""
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is not present")
  return SHARED_DATA


@pytest.fixture
def strict_promotion():
  """Runs the test under ``jax_numpy_dtype_promotion='strict'``."""
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture
def example():
  """``example(name)``: imports ``examples/<name>.py`` as a module."""
  import importlib.util
  root = pathlib.Path(__file__).resolve().parent.parent / "examples"

  def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", root / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load
