"""Saving and loading trained models: ``save``, ``load``, ``read_info``.

A model directory holds:

* ``model.json``: ``format_version``, ``library_version``, ``spec`` (what rebuilds a library
  model: ``model.spec`` of :class:`slidejax.nn.SlideMLP` / :class:`slidejax.nn.DenseMLP`, or
  None), ``metadata`` (the caller's dictionary, e.g. the training configuration and label
  counts) and ``state``: ``arrays`` (name -> shape and dtype of every saved array) and
  ``files`` (relative path -> size and SHA-256 of every file under ``state/``, checked before
  reading so that a damaged file is named instead of read).
* ``state/``: an orbax checkpoint of ``nnx.state(model)`` without transient variables
  (:class:`slidejax.nn.RowDelta`, :class:`slidejax.nn.ActiveIds`). Typed PRNG keys are stored
  as their raw key data; zero-size arrays (orbax refuses them) live in ``arrays`` alone.

The directory is written under a temporary sibling name and renamed when complete, so a
crash never leaves a partial model under the final name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT_VERSION = 1
INFO_FILE = "model.json"
STATE_DIR = "state"
_REQUIRED_FIELDS = ("format_version", "library_version", "spec", "metadata", "state")
_MESSAGE_LIMIT = 300


class ModelFileError(ValueError):
  """A model directory that is missing, damaged, too new, or does not fit the target model.

  ``str(err)`` is one line naming the path.
  """


# ------------------------------------------------------------------------------ state leaves


def _transient_filter():
  from slidejax.nn import ActiveIds
  from slidejax.nn import RowDelta
  return (RowDelta, ActiveIds)


def _segment(key) -> str:
  """One path entry of a pytree key path as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _named_leaves(state) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """(path segments per leaf, leaves, treedef) of a state pytree."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [tuple(_segment(k) for k in path) for path, _ in with_paths]
  return paths, [leaf for _, leaf in with_paths], treedef


def _is_key_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(leaf) -> dict:
  """``{"shape", "dtype"[, "key_impl"]}`` of an array, abstract array or scalar."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.asarray(leaf).dtype
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  entry = {"shape": [int(d) for d in shape], "dtype": str(dtype)}
  if _is_key_dtype(dtype) and isinstance(leaf, jax.Array):
    entry["key_impl"] = str(jax.random.key_impl(leaf))
  return entry


def _storable(leaf) -> jax.Array | np.ndarray:
  """What orbax stores for a leaf: the raw data of a key array, else the array."""
  if isinstance(leaf, jax.Array):
    return jax.random.key_data(leaf) if _is_key_dtype(leaf.dtype) else leaf
  return np.asarray(leaf)


def _nest(paths, values) -> dict:
  """A nested dictionary with ``values`` at ``paths`` (tuples of strings)."""
  tree: dict = {}
  for path, value in zip(paths, values):
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def _lookup(tree: dict, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree


def _name(path: tuple[str, ...]) -> str:
  return "/".join(path)


# -------------------------------------------------------------------------------------- save


def _jsonable(value):
  """``json.dumps`` default: NumPy/JAX arrays and scalars as lists and numbers."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, pathlib.PurePath):
    return str(value)
  raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serializable")


def _write_json(path: pathlib.Path, info: dict) -> None:
  text = json.dumps(info, indent=1, default=_jsonable) + "\n"
  with open(path, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _check_target_dir(directory: pathlib.Path, overwrite: bool) -> None:
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory}: exists and is not a directory")
  if directory.is_dir() and any(directory.iterdir()) and not overwrite:
    raise FileExistsError(f"{directory}: directory is not empty (pass overwrite=True to "
                          "replace it)")


def _write_state(path: pathlib.Path, paths, leaves) -> dict:
  """Writes the non-empty leaves to an orbax checkpoint at ``path``; returns the manifest."""
  import orbax.checkpoint as ocp
  manifest = {_name(p): _describe(leaf) for p, leaf in zip(paths, leaves)}
  stored = [(p, _storable(leaf)) for p, leaf in zip(paths, leaves)]
  stored = [(p, a) for p, a in stored if np.prod(np.shape(a)) > 0]
  if not stored:
    path.mkdir()
    return manifest
  tree = _nest([p for p, _ in stored], [a for _, a in stored])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
  return manifest


def _file_digest(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _list_files(state_path: pathlib.Path) -> dict:
  """``{relative path: {"size", "sha256"}}`` of every file under ``state_path``."""
  files = {}
  for path in sorted(state_path.rglob("*")):
    if path.is_file():
      files[path.relative_to(state_path).as_posix()] = {"size": path.stat().st_size,
                                                        "sha256": _file_digest(path)}
  return files


def _move_into_place(tmp: pathlib.Path, directory: pathlib.Path) -> None:
  """Renames the finished ``tmp`` to ``directory``, replacing an existing one."""
  if not directory.exists() or not any(directory.iterdir()):
    os.replace(tmp, directory)
    return
  trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
  os.replace(directory, trash / directory.name)
  os.replace(tmp, directory)
  shutil.rmtree(trash, ignore_errors=True)


def save(model: nnx.Module, directory: str | os.PathLike, *, metadata: dict | None = None,
         overwrite: bool = False) -> pathlib.Path:
  """Saves ``model`` (its state and, for library models, its ``spec``) to ``directory``.

  Args:
    model: an NNX module; ``model.spec`` (a JSON-able dict) is stored when present.
    directory: the model directory; it must not exist or be empty unless ``overwrite``.
    metadata: JSON-able extras stored in ``model.json`` (e.g. ``train_config``,
      ``label_counts`` and ``num_train_points`` for PSP@k); NumPy values become lists.
    overwrite: replace an existing non-empty directory (only once the new one is complete).

  Returns:
    The directory (absolute).
  """
  import slidejax
  directory = pathlib.Path(directory).absolute()
  _check_target_dir(directory, overwrite)
  directory.parent.mkdir(parents=True, exist_ok=True)
  state = nnx.state(model, nnx.Not(_transient_filter()))
  paths, leaves, _ = _named_leaves(state)
  spec = getattr(model, "spec", None)
  tmp = _temporary_dir(directory)
  primary = jax.process_index() == 0
  try:
    arrays = _write_state(tmp / STATE_DIR, paths, leaves)   # every process writes its shards
    if primary:
      info = {"format_version": FORMAT_VERSION, "library_version": slidejax.__version__,
              "spec": spec, "metadata": dict(metadata or {}),
              "state": {"arrays": arrays, "files": _list_files(tmp / STATE_DIR)}}
      _write_json(tmp / INFO_FILE, info)
      _move_into_place(tmp, directory)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  _all_processes_reach("slidejax.save")
  return directory


def _temporary_dir(directory: pathlib.Path) -> pathlib.Path:
  """A new temporary directory beside ``directory``: one for the whole job when several
  processes save together (process 0 names it; the others learn its name)."""
  if jax.process_count() == 1:
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  from jax.experimental import multihost_utils
  number = np.int64(secrets.randbits(62) if jax.process_index() == 0 else 0)
  number = int(multihost_utils.broadcast_one_to_all(number))
  tmp = directory.parent / f".{directory.name}.tmp-{number:x}"
  if jax.process_index() == 0:
    tmp.mkdir()
  _all_processes_reach("slidejax.save: temporary directory")
  return tmp


def _all_processes_reach(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# -------------------------------------------------------------------------------------- read


def _one_line(text: str) -> str:
  line = " ".join(str(text).split())
  return line if len(line) <= _MESSAGE_LIMIT else line[:_MESSAGE_LIMIT - 3] + "..."


def _check_info(path: pathlib.Path, info) -> None:
  if not isinstance(info, dict):
    raise ModelFileError(f"{path}: not a model description (a JSON object is expected)")
  missing = [f for f in _REQUIRED_FIELDS if f not in info]
  if missing:
    raise ModelFileError(f"{path}: missing field(s) {', '.join(missing)}")
  version = info["format_version"]
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ModelFileError(f"{path}: bad format_version {version!r}")
  if version > FORMAT_VERSION:
    raise ModelFileError(
        f"{path}: format version {version} was written by a newer slidejax "
        f"({info.get('library_version')}); this one ({_library_version()}) reads up to "
        f"version {FORMAT_VERSION}")
  state = info["state"]
  if (not isinstance(info["metadata"], dict) or not isinstance(state, dict)
      or not isinstance(state.get("arrays"), dict) or not isinstance(state.get("files"), dict)):
    raise ModelFileError(f"{path}: 'metadata' must be a JSON object and 'state' one with "
                         "'arrays' and 'files'")
  if info["spec"] is not None and not isinstance(info["spec"], dict):
    raise ModelFileError(f"{path}: 'spec' must be a JSON object or null")


def _library_version() -> str:
  import slidejax
  return slidejax.__version__


def read_info(directory: str | os.PathLike) -> dict:
  """The checked contents of ``directory/model.json`` (see the module docstring).

  Raises ModelFileError when there is no model, the file is damaged or too new.
  """
  directory = pathlib.Path(directory)
  path = directory / INFO_FILE
  if not directory.is_dir():
    raise ModelFileError(f"{directory}: no such model directory")
  if not path.is_file():
    raise ModelFileError(f"{directory}: not a model directory (no {INFO_FILE})")
  try:
    info = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError) as err:
    raise ModelFileError(f"{path}: cannot read: {_one_line(err)}") from err
  except json.JSONDecodeError as err:
    raise ModelFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
  _check_info(path, info)
  return info


# -------------------------------------------------------------------------------------- load


def _int_field(path, spec: dict, name: str) -> int:
  value = spec.get(name)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ModelFileError(f"{path}: spec field {name!r} must be a positive integer, got "
                         f"{value!r}")
  return value


def _spec_integers(path: pathlib.Path, spec: dict, field: str, lows: dict) -> dict | None:
  """``spec[field]``'s integer entries named in ``lows`` (each at least its low), checked; None
  when the field is absent."""
  part = spec.get(field)
  if part is None:
    return None
  if not isinstance(part, dict):
    raise ModelFileError(f"{path}: spec field {field!r} must be a JSON object")
  for name, low in lows.items():
    value = part.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ModelFileError(f"{path}: spec field '{field}.{name}' must be an integer of at "
                           f"least {low}, got {value!r}")
  return {name: part[name] for name in lows}


def _with_neighbours(path: pathlib.Path, spec: dict, build):
  """``build`` followed by an empty :class:`slidejax.nn.NeighbourVotes` of
  ``spec["neighbours"]`` (absent: ``build`` itself)."""
  from slidejax.nn import NeighbourVotes
  sizes = _spec_integers(path, spec, "neighbours",
                         {"k": 1, "width": 1, "max_list": 1, "rows": 1, "max_labels": 1,
                          "nnz": 0, "label_entries": 0})
  if sizes is None:
    return build
  votes = spec["neighbours"]
  power = votes.get("power")
  if not isinstance(power, (int, float)) or isinstance(power, bool) or not power > 0:
    raise ModelFileError(f"{path}: spec field 'neighbours.power' must be a positive number, "
                         f"got {power!r}")

  def build_with_votes():
    model = build()
    model.set_neighbours(NeighbourVotes(model.num_features, model.num_labels, k=sizes["k"],
                                        power=float(power), width=sizes["width"],
                                        max_list=sizes["max_list"], sizes=sizes))
    return model

  return build_with_votes


def _with_reranker(path: pathlib.Path, spec: dict, build):
  """``build`` followed by a :class:`slidejax.nn.Reranker` of ``spec["reranker"]`` (its
  weights restored with the model's; absent: ``build`` itself)."""
  from slidejax.nn import Reranker
  sizes = _spec_integers(path, spec, "reranker", {"hidden": 1, "candidates": 1})
  if sizes is None:
    return build

  def build_with_reranker():
    model = build()
    model.set_reranker(Reranker(np.zeros(model.num_labels), rngs=nnx.Rngs(0), **sizes))
    return model

  return build_with_reranker


def _constructor(path: pathlib.Path, spec: dict | None):
  """A no-argument function building the library model of ``spec``."""
  if spec is None:
    raise ModelFileError(f"{path}: no spec (not a library model): pass model= to load it")
  return _with_reranker(path, spec, _with_neighbours(path, spec, _model_constructor(path, spec)))


def _model_constructor(path: pathlib.Path, spec: dict):
  """:func:`_constructor` without the neighbour votes."""
  from slidejax.nn import DenseMLP
  from slidejax.nn import SlideMLP
  cls = spec.get("class")
  sizes = [_int_field(path, spec, n) for n in ("num_features", "num_labels", "hidden")]
  num_features, num_labels, hidden = sizes
  shortcut = spec.get("shortcut", 0)   # absent from files before the shortcut: none
  if not isinstance(shortcut, int) or isinstance(shortcut, bool) or shortcut < 0:
    raise ModelFileError(f"{path}: spec field 'shortcut' must be a non-negative integer, got "
                         f"{shortcut!r}")
  # trunk options (absent from files of slidejax 0.1: no dropout, no residual block)
  trunk = dict(hidden=hidden, dropout=float(spec.get("dropout", 0.0)),
               residual=bool(spec.get("residual", False)),
               output_init=str(spec.get("output_init", "small")),
               shortcut=shortcut)
  if cls == "DenseMLP":
    members = spec.get("members", 1)   # absent: one network
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
      raise ModelFileError(f"{path}: spec field 'members' must be a positive integer, got "
                           f"{members!r}")
    return lambda: DenseMLP(num_features, num_labels, rngs=nnx.Rngs(0), members=members,
                            **trunk)
  if cls != "SlideMLP":
    raise ModelFileError(f"{path}: unknown model class {cls!r} (known: SlideMLP, DenseMLP); "
                         "pass model= to load it")
  options = spec.get("output")
  if not isinstance(options, dict):
    raise ModelFileError(f"{path}: spec field 'output' must be a JSON object")
  options = dict(options)
  if options.get("sampler") == "unigram":   # the stored CDF replaces these counts
    options["label_counts"] = np.ones(num_labels, np.float32)
  return lambda: SlideMLP(num_features, num_labels, rngs=nnx.Rngs(0), **trunk, **options)


def _abstract_model(path: pathlib.Path, spec: dict | None) -> nnx.Module:
  build = _constructor(path, spec)
  try:
    return nnx.eval_shape(build)
  except (TypeError, ValueError) as err:
    raise ModelFileError(f"{path}: the spec does not build a model: {_one_line(err)}") from err


def _compare(state_path: pathlib.Path, manifest: dict, paths, targets) -> None:
  """Raises ModelFileError naming the first difference between the saved arrays
  (``manifest``) and the target model's leaves."""
  names = [_name(p) for p in paths]
  missing = [n for n in names if n not in manifest]
  extra = [n for n in manifest if n not in set(names)]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"the model has {', '.join(missing[:3])} that the file lacks")
    if extra:
      parts.append(f"the file has {', '.join(extra[:3])} that the model lacks")
    raise ModelFileError(f"{state_path}: does not match the model: {'; '.join(parts)}")
  for name, target in zip(names, targets):
    want, have = _describe(target), manifest[name]
    if not isinstance(have, dict) or "shape" not in have or "dtype" not in have:
      raise ModelFileError(f"{state_path}: bad array entry for {name} in {INFO_FILE}")
    if list(have["shape"]) != want["shape"] or have["dtype"] != want["dtype"]:
      raise ModelFileError(
          f"{state_path}: {name} is saved as {have['dtype']}{list(have['shape'])}, the model "
          f"expects {want['dtype']}{want['shape']}")
    if want["dtype"].startswith("key<") and "key_impl" not in have:
      raise ModelFileError(f"{state_path}: key array {name} lacks its key_impl in {INFO_FILE}")


def _raw_struct(entry: dict) -> jax.ShapeDtypeStruct:
  """Shape and dtype of what is stored for a manifest entry (a key array: its raw data)."""
  shape = tuple(entry["shape"])
  if "key_impl" in entry:
    key = jax.eval_shape(lambda: jax.random.key(0, impl=entry["key_impl"]))
    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, key.dtype))
  return jax.ShapeDtypeStruct(shape, np.dtype(entry["dtype"]))


def _stored_struct(entry: dict) -> jax.ShapeDtypeStruct | None:
  """What orbax holds for a manifest entry (None: a zero-size array, not stored)."""
  raw = _raw_struct(entry)
  return raw if int(np.prod(raw.shape)) > 0 else None


class _QuietOrbax:
  """Keeps orbax's failure noise off stderr while it reads; its exception reports the error.

  Silenced: absl log lines, asyncio's about failed tasks, and the "Event loop is closed"
  errors of reads still in flight when a failed restore closes its event loop (they arrive
  from other threads, so a failure waits ``grace`` seconds for them before unhooking).
  """
  names = ("absl", "asyncio")
  grace = 0.25

  def __enter__(self):
    self.levels = {name: logging.getLogger(name).level for name in self.names}
    for name in self.names:
      logging.getLogger(name).setLevel(logging.CRITICAL)
    self.hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    return self

  def _unraisable(self, unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)):
      self.hook(unraisable)

  def __exit__(self, exc_type, *exc):
    if exc_type is not None:
      time.sleep(self.grace)
    sys.unraisablehook = self.hook
    for name, level in self.levels.items():
      logging.getLogger(name).setLevel(level)


def _read_arrays(state_path: pathlib.Path, files: dict, structs: dict) -> dict:
  """Restores the nested dict of ShapeDtypeStructs ``structs`` from orbax at ``state_path``,
  once its ``files`` (see :func:`_check_files`) are intact."""
  import orbax.checkpoint as ocp
  if not state_path.is_dir():
    raise ModelFileError(f"{state_path}: missing (the model's arrays)")
  _check_files(state_path, files)
  if not structs:
    return {}
  device = jax.devices()[0]
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)),
      structs)
  try:
    with _QuietOrbax(), ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(state_path, target)
  except Exception as err:  # orbax/tensorstore raise many types for damaged files
    raise ModelFileError(f"{state_path}: damaged or incomplete checkpoint: "
                         f"{type(err).__name__}: {_one_line(err)}") from err
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      raise ModelFileError(f"{state_path}: holds {got.dtype}{list(got.shape)} where "
                           f"{INFO_FILE} says {want.dtype}{list(want.shape)}")
  return restored


def _check_files(state_path: pathlib.Path, files: dict) -> None:
  """Raises ModelFileError naming the first file under ``state_path`` that is missing or
  differs from what ``save`` wrote."""
  for name, entry in files.items():
    path = state_path / name
    if not isinstance(entry, dict) or not {"size", "sha256"} <= set(entry):
      raise ModelFileError(f"{state_path}: bad file entry for {name} in {INFO_FILE}")
    if not path.is_file():
      raise ModelFileError(f"{path}: missing (the model's arrays are incomplete)")
    size = path.stat().st_size
    if size != entry["size"]:
      raise ModelFileError(f"{path}: damaged ({size} bytes, {entry['size']} were written)")
    if _file_digest(path) != entry["sha256"]:
      raise ModelFileError(f"{path}: damaged (its contents differ from what was written)")


def _restored_leaf(entry: dict, stored):
  """The model leaf of a manifest entry from what orbax returned (None for zero-size)."""
  if stored is None:
    raw = _raw_struct(entry)
    stored = jnp.zeros(raw.shape, raw.dtype)
  if "key_impl" in entry:
    return jax.random.wrap_key_data(stored, impl=entry["key_impl"])
  return stored


def _restore_into(directory: pathlib.Path, info: dict, model: nnx.Module) -> nnx.Module:
  state_path = directory / STATE_DIR
  graphdef, transient, saved = nnx.split(model, _transient_filter(), ...)
  paths, targets, treedef = _named_leaves(saved)
  manifest = info["state"]["arrays"]
  _compare(state_path, manifest, paths, targets)
  try:
    structs = {p: _stored_struct(manifest[_name(p)]) for p in paths}
  except (TypeError, ValueError, KeyError) as err:
    raise ModelFileError(f"{directory / INFO_FILE}: bad array entry: {_one_line(err)}") from err
  stored_paths = [p for p in paths if structs[p] is not None]
  restored = _read_arrays(state_path, info["state"]["files"],
                          _nest(stored_paths, [structs[p] for p in stored_paths]))
  leaves = [_restored_leaf(manifest[_name(p)],
                           _lookup(restored, p) if structs[p] is not None else None)
            for p in paths]
  return nnx.merge(graphdef, transient, jax.tree_util.tree_unflatten(treedef, leaves))


def load(directory: str | os.PathLike, *, model: nnx.Module | None = None) -> nnx.Module:
  """Loads the model saved in ``directory``.

  Args:
    directory: written by :func:`save`.
    model: the module to restore into (concrete, or abstract from ``nnx.eval_shape``); by
      default the library model of the stored ``spec`` is rebuilt.

  Returns:
    The model with the saved state (a new module; ``model`` itself is not changed).

  Raises:
    ModelFileError: no model in ``directory``, a damaged or too new file, an unknown model
      class without ``model=``, or arrays that do not fit the model.
  """
  directory = pathlib.Path(directory).absolute()
  info = read_info(directory)
  if model is None:
    model = _abstract_model(directory / INFO_FILE, info["spec"])
  return _restore_into(directory, info, model)
