"""Training checkpoints on orbax: state pytree, JSON metadata, last ``keep`` kept.

Layout of a checkpoint directory (written by :class:`orbax.checkpoint.CheckpointManager`)::

  DIR/<step>/state/      the state's leaves, flattened to ``{"00000": array, ...}`` (OCDBT)
  DIR/<step>/meta/       the caller's JSON metadata (loop position, configuration)
  DIR/<step>/manifest/   slidejax's own JSON: leaf paths, shapes, dtypes, CRC-32 checksums

Orbax writes a step into ``DIR/<step>.orbax-checkpoint-tmp`` and renames it to ``DIR/<step>``
once every file is written (on a local file system), so a step directory without the
suffix is complete. A save killed half-way leaves a ``*.orbax-checkpoint-tmp`` directory:
readers never see it and the first :meth:`TrainingCheckpoints.save` of a later process
removes it (reading never deletes anything, so another process may read while one trains).

Typed PRNG keys are stored as their ``jax.random.key_data`` and rebuilt with
``jax.random.wrap_key_data``. Restoring compares the expected state with the manifest
first (a different configuration is reported by its first differing leaf) and checks every
leaf's checksum afterwards, so a damaged checkpoint raises rather than loading garbage.
"""
from __future__ import annotations

import gc
import inspect
import json
import math
import logging
import os
import pathlib
import shutil
import sys
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "slidejax-orbax-1"
_ITEMS = ("state", "meta", "manifest")
_ABANDONED_READ = "_read_array_index_and_device_put"


class CheckpointError(ValueError):
  """A checkpoint that is missing, damaged, of an old format or from another configuration."""


class _QuietOrbax(logging.Filter):
  """Drops orbax's records below WARNING (it logs every save and restore at INFO)."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return record.levelno >= logging.WARNING or not from_orbax


def _quiet_orbax_logging() -> None:
  """Installs :class:`_QuietOrbax` once on the ``absl`` logger, which orbax logs through."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())


def _one_line(err: BaseException, limit: int = 200) -> str:
  """``err`` in one short line (tensorstore appends kilobytes of JSON spec to its errors)."""
  lines = str(err).strip().splitlines()
  text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _collect_abandoned_reads() -> None:
  """Collects, quietly, the array reads orbax leaves behind when one read of a restore fails.

  They are coroutines that turn the ``GeneratorExit`` of their closing into an ``Exception``
  (orbax's ``_read_array_index_and_device_put``), which Python would report as "Exception
  ignored" whenever the garbage collector happens to reach them.
  """
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    stray = getattr(unraisable.object, "__qualname__", "") == _ABANDONED_READ
    if not (inspect.iscoroutine(unraisable.object) and stray):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe(x) -> tuple[tuple[int, ...], str]:
  return tuple(int(d) for d in x.shape), str(x.dtype)


def _fmt(shape: tuple[int, ...], dtype: str) -> str:
  return f"{dtype}{list(shape)}"


def _host_value(array) -> np.ndarray:
  """The whole value of a leaf on this host (gathered when it spans several processes)."""
  from slidejax.distributed import host_value
  return host_value(array)


def _crc(array: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _old_format(root: pathlib.Path) -> bool:
  """True when ``root`` holds the hand-made ``step_*/arrays.npz`` + ``latest`` format."""
  return (root / "latest").is_file() or any(root.glob("step_*/arrays.npz"))


def _flatten(state) -> list[tuple[str, Any]]:
  pairs, _ = jax.tree_util.tree_flatten_with_path(state)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in pairs]


def _stored_leaf(path: str, leaf) -> jax.Array:
  """The array orbax stores for ``leaf``: its key data for a typed key, else itself."""
  if not isinstance(leaf, jax.Array):
    raise TypeError(f"state leaf {path} is a {type(leaf).__name__}; checkpoints hold jax arrays")
  return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _leaf_record(path: str, leaf, stored: np.ndarray) -> dict:
  shape, dtype = _describe(leaf)
  record = {"path": path, "shape": list(shape), "dtype": dtype, "crc32": _crc(stored)}
  if _is_key(leaf):
    record["key_impl"] = str(jax.random.key_impl(leaf))
  return record


def _first_mismatch(saved: list[dict], expected: list[tuple[str, Any]]) -> str | None:
  """Describes the first difference between the manifest's leaves and ``expected``."""
  want = {path: _describe(leaf) for path, leaf in expected}
  have = {r["path"]: (tuple(r["shape"]), r["dtype"]) for r in saved}
  for path, (shape, dtype) in have.items():
    if path not in want:
      return f"leaf {path} is in the checkpoint but not in the expected state"
    if want[path] != (shape, dtype):
      return (f"leaf {path} is {_fmt(shape, dtype)} in the checkpoint, expected "
              f"{_fmt(*want[path])}")
  for path in want:
    if path not in have:
      return f"leaf {path} of the expected state is not in the checkpoint"
  if list(have) != list(want):
    return "the leaves are in another order than in the expected state"
  return None


def _default_sharding() -> jax.sharding.Sharding:
  """Where a leaf without a placement is restored: this process's first device."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_target(record: dict, leaf) -> jax.ShapeDtypeStruct:
  """What orbax restores for one leaf: key data for a typed key (placed as the key; its
  extra trailing axis is not split), else the leaf itself."""
  sharding = getattr(leaf, "sharding", None) or _default_sharding()
  if "key_impl" in record:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _rebuild_leaf(record: dict, leaf, restored: jax.Array) -> jax.Array:
  if "key_impl" not in record:
    return restored
  return jax.random.wrap_key_data(restored, impl=record["key_impl"])


class TrainingCheckpoints:
  """Numbered training checkpoints in one directory, the newest ``keep`` kept.

  ``save`` is synchronous: it returns once the step is committed. Saving step ``s`` first
  removes any checkpoint of a step ``>= s`` (a continuation abandoned by a resume from an
  earlier step), so the newest checkpoint is always the last one saved.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    self._root = pathlib.Path(directory).absolute()
    if _old_format(self._root):
      raise CheckpointError(
          f"{self._root}: holds checkpoints in the old .npz format (step_*/arrays.npz, latest) "
          "of an earlier slidejax; re-train, or convert them, to use this version")
    _quiet_orbax_logging()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True,
        cleanup_tmp_directories=False, lightweight_initialize=True)
    self._manager = ocp.CheckpointManager(self._root, item_names=_ITEMS, options=options)
    self._cleaned = False

  @property
  def directory(self) -> pathlib.Path:
    """The checkpoint directory (absolute)."""
    return self._root

  def step_path(self, step: int) -> pathlib.Path:
    """The directory of ``step``'s checkpoint (whether or not it exists)."""
    return self._root / str(int(step))

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first."""
    self._reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict) -> pathlib.Path:
    """Writes ``state`` (a pytree of jax arrays) and ``meta`` (JSON-able) as ``step``.

    Returns the step's directory once the checkpoint is committed; steps beyond the newest
    ``keep`` are deleted.
    """
    step = int(step)
    meta = json.loads(json.dumps(meta))
    leaves = _flatten(state)
    stored = [_stored_leaf(path, leaf) for path, leaf in leaves]
    host = [_host_value(a) for a in stored]
    manifest = {"format": FORMAT, "step": step,
                "leaves": [_leaf_record(p, leaf, h) for (p, leaf), h in zip(leaves, host)]}
    self._prepare_save(step)
    # orbax refuses empty arrays: the manifest's shape and dtype recreate them on restore
    arrays = {f"{i:05d}": a for i, a in enumerate(stored) if a.size}
    args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                              meta=ocp.args.JsonSave(meta),
                              manifest=ocp.args.JsonSave(manifest))
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()
    return self.step_path(step)

  def read_meta(self, step: int | None = None) -> dict:
    """The metadata saved with ``step`` (None: the newest complete checkpoint)."""
    step = self._resolve(step)
    return self._read_json(step, "meta")

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, pathlib.Path]:
    """Loads ``step`` (None: the newest complete one) into ``abstract_state``'s structure.

    ``abstract_state`` is a pytree of :class:`jax.ShapeDtypeStruct` (typed key dtypes
    included; a ``sharding`` on a leaf places the restored array). Returns
    ``(state, meta, step_directory)``. Raises CheckpointError when there is no such
    checkpoint, when it does not match ``abstract_state`` or when it is damaged.
    """
    step = self._resolve(step)
    path = self.step_path(step)
    manifest = self._read_json(step, "manifest")
    expected, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    expected = [(jax.tree_util.keystr(p), leaf) for p, leaf in expected]
    mismatch = _first_mismatch(manifest.get("leaves", []), expected)
    if mismatch:
      raise CheckpointError(f"{path}: does not match the expected state: {mismatch}")
    records = manifest["leaves"]
    targets = [_restore_target(r, leaf) for r, (_, leaf) in zip(records, expected)]
    target = {f"{i:05d}": t for i, t in enumerate(targets) if math.prod(t.shape)}
    restored = self._restore_items(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    arrays = [restored.state[f"{i:05d}"] if f"{i:05d}" in target
              else jnp.zeros(t.shape, t.dtype) for i, t in enumerate(targets)]
    self._verify(path, records, arrays)
    leaves = [_rebuild_leaf(r, leaf, a) for r, (_, leaf), a in zip(records, expected, arrays)]
    return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored.meta), path

  def close(self) -> None:
    """Waits for pending orbax work and releases its resources."""
    self._manager.close()

  def __enter__(self) -> TrainingCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _reload(self) -> None:
    self._manager.reload()

  def _resolve(self, step: int | None) -> int:
    """``step`` when it is complete on disk, the newest when None; else CheckpointError."""
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"{self._root}: no complete checkpoint")
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointError(
          f"{self.step_path(step)}: no complete checkpoint of step {step} (complete: {steps})")
    return int(step)

  def _prepare_save(self, step: int) -> None:
    """Removes stale temporary directories (once) and checkpoints of steps ``>= step``."""
    if not self._cleaned:
      if jax.process_index() == 0:   # one process cleans; the others wait for it
        for tmp in self._root.glob(f"*{ocp.path.step.TMP_DIR_SUFFIX}*"):
          shutil.rmtree(tmp, ignore_errors=True)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("slidejax: stale temporary checkpoints removed")
      self._cleaned = True
    for old in self.all_steps():
      if old >= step:
        self._manager.delete(old)

  def _restore_items(self, step: int, args) -> Any:
    try:
      return self._manager.restore(step, args=args)
    except Exception as err:  # orbax and tensorstore raise many kinds of errors
      reason = _one_line(err)
    # Not chained: the error's frames would keep orbax's abandoned reads alive.
    _collect_abandoned_reads()
    raise CheckpointError(f"{self.step_path(step)}: damaged checkpoint, cannot be read "
                          f"({reason}); restore an earlier step or re-train")

  def _read_json(self, step: int, item: str) -> dict:
    restored = self._restore_items(step, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    value = restored[item]
    if not isinstance(value, dict) or (item == "manifest" and value.get("format") != FORMAT):
      raise CheckpointError(
          f"{self.step_path(step)}: damaged checkpoint, its {item} is missing or unreadable")
    return dict(value)

  def _verify(self, path: pathlib.Path, records: list[dict], arrays: list[jax.Array]) -> None:
    for record, array in zip(records, arrays):
      if _crc(_host_value(array)) != record["crc32"]:
        raise CheckpointError(
            f"{path}: damaged checkpoint, leaf {record['path']} fails its checksum; "
            "restore an earlier step or re-train")
