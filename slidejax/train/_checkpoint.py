"""Atomic, pickle-free checkpoints of training state.

A checkpoint is a directory ``step_XXXXXXXX`` holding ``arrays.npz`` (every leaf of the
state pytree, in flattening order, saved with ``allow_pickle=False``) and ``meta.json``
(step, loop position, configuration, shapes). It is written into a temporary directory,
flushed, then renamed, and only then does the ``latest`` pointer move (written to a
temporary file and ``os.replace``d): a crash leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that is missing, damaged or from another configuration."""


def _to_numpy(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(leaf))
  return np.asarray(leaf)


def _fsync_dir(path: pathlib.Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def save_checkpoint(directory: str | os.PathLike, state: Any, meta: dict, *, keep: int = 2
                    ) -> pathlib.Path:
  """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON-able) atomically.

  Returns the checkpoint's directory. Older checkpoints beyond the newest ``keep`` are removed.
  """
  root = pathlib.Path(directory)
  root.mkdir(parents=True, exist_ok=True)
  step = int(meta["step"])
  leaves = [_to_numpy(leaf) for leaf in jax.tree.leaves(state)]
  meta = dict(meta, num_leaves=len(leaves),
              shapes=[list(a.shape) for a in leaves], dtypes=[str(a.dtype) for a in leaves])
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
  try:
    with open(tmp / "arrays.npz", "wb") as f:
      np.savez(f, **{f"a{i}": a for i, a in enumerate(leaves)})
      f.flush()
      os.fsync(f.fileno())
    with open(tmp / "meta.json", "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    final = root / f"step_{step:09d}"
    if final.exists():
      shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  pointer_tmp = root / ".latest.tmp"
  pointer_tmp.write_text(final.name + "\n")
  os.replace(pointer_tmp, root / "latest")
  _fsync_dir(root)
  kept = sorted(p for p in root.glob("step_*") if p.is_dir())
  for old in kept[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return final


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
  """The newest complete checkpoint in ``directory``, or None."""
  root = pathlib.Path(directory)
  pointer = root / "latest"
  if not pointer.is_file():
    return None
  path = root / pointer.read_text().strip()
  return path if (path / "meta.json").is_file() and (path / "arrays.npz").is_file() else None


def read_meta(path: str | os.PathLike) -> dict:
  path = pathlib.Path(path)
  try:
    return json.loads((path / "meta.json").read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise CheckpointError(f"{path}: cannot read meta.json: {err}") from err


def load_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
  """Loads a checkpoint into the structure of ``template`` (a state of the same config).

  Raises CheckpointError when the number, shape or dtype of arrays differ (a checkpoint
  from another configuration), naming the first mismatch.
  """
  path = pathlib.Path(path)
  meta = read_meta(path)
  leaves, treedef = jax.tree.flatten(template)
  if meta.get("num_leaves") != len(leaves):
    raise CheckpointError(
        f"{path}: holds {meta.get('num_leaves')} arrays, this model's state has {len(leaves)}: "
        "it was written by another configuration")
  with np.load(path / "arrays.npz", allow_pickle=False) as data:
    loaded = []
    for i, leaf in enumerate(leaves):
      arr = data[f"a{i}"]
      is_key = isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
      want = _to_numpy(leaf) if is_key else leaf
      if tuple(arr.shape) != tuple(want.shape) or arr.dtype != np.dtype(want.dtype):
        raise CheckpointError(
            f"{path}: array {i} has shape {arr.shape} {arr.dtype}, this model expects "
            f"{tuple(want.shape)} {np.dtype(want.dtype)}: the checkpoint is from another "
            "configuration")
      loaded.append(jax.random.wrap_key_data(arr) if is_key else jnp.asarray(arr))
  return jax.tree.unflatten(treedef, loaded), meta
