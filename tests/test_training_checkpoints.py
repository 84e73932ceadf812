"""TrainingCheckpoints: orbax-backed training checkpoints (issue #11, point 5)."""
from __future__ import annotations

import gc
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slidejax.checkpoint import CheckpointError
from slidejax.checkpoint import TrainingCheckpoints

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Moments(NamedTuple):
  """A NamedTuple node, as optimizer states have."""
  mu: jax.Array
  count: jax.Array


def make_state(step: int) -> dict:
  """A state whose every leaf depends on ``step``; floats include NaN, -0.0 and a subnormal."""
  floats = jnp.asarray(np.array([np.nan, -0.0, 1e-45, np.inf, 0.1 * step], np.float32))
  return {
    "params": {"w": jax.random.normal(jax.random.key(step), (40, 24), jnp.float32),
               "ids": (jnp.arange(300, dtype=jnp.uint16) * step).astype(jnp.uint16),
               "special": floats},
    "opt": Moments(mu=jnp.full((24,), step, jnp.int32), count=jnp.int32(step)),
    "rngs": {"key": jax.random.key(100 + step),
             "keys": jax.random.split(jax.random.key(200 + step, impl="rbg"), 3)},
  }


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _bits(x) -> np.ndarray:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def assert_bit_equal(got, want) -> None:
  """Same structure, dtypes (key dtypes included) and bytes, leaf by leaf."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert _bits(g).tobytes() == _bits(w).tobytes()


def save_steps(directory, steps, *, keep=2) -> None:
  with TrainingCheckpoints(directory, keep=keep) as ckpts:
    for step in steps:
      ckpts.save(step, make_state(step), {"step": step, "position": {"epoch": step % 3}})


def newest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file of a step (OCDBT ``d/`` files)."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  return max(files, key=lambda f: f.stat().st_size)


def test_round_trip_is_bit_exact_with_typed_keys(tmp_path):
  state = make_state(3)
  with TrainingCheckpoints(tmp_path / "ck") as ckpts:
    path = ckpts.save(3, state, {"step": 3, "position": {"batch": (1, 2)}})
    assert path == tmp_path / "ck" / "3" and path.is_dir()
    assert ckpts.latest_step() == 3
    got, meta, where = ckpts.restore(abstract(state))
  assert where == path
  assert meta == {"step": 3, "position": {"batch": [1, 2]}}
  assert_bit_equal(got, state)
  assert got["rngs"]["key"].dtype == jax.random.key(0).dtype
  assert str(jax.random.key_impl(got["rngs"]["keys"])) == "rbg"
  assert isinstance(got["opt"], Moments)
  again = jax.random.normal(got["rngs"]["key"], (4,))
  assert np.array_equal(again, jax.random.normal(state["rngs"]["key"], (4,)))


def test_restore_places_leaves_on_the_requested_sharding(tmp_path):
  state = make_state(1)
  device = jax.devices()[-1]
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
    x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), state)
  with TrainingCheckpoints(tmp_path) as ckpts:
    ckpts.save(1, state, {})
    got, _, _ = ckpts.restore(target)
  assert_bit_equal(got, state)
  assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(got))


def test_keeps_the_last_n_and_restores_each(tmp_path):
  save_steps(tmp_path, [1, 2, 3, 4], keep=3)
  ckpts = TrainingCheckpoints(tmp_path, keep=3)
  assert ckpts.all_steps() == [2, 3, 4]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", "4"]
  for step in (2, 3, 4):
    got, meta, _ = ckpts.restore(abstract(make_state(0)), step)
    assert meta["step"] == step
    assert_bit_equal(got, make_state(step))
  assert ckpts.read_meta() == {"step": 4, "position": {"epoch": 1}}
  assert ckpts.read_meta(2)["step"] == 2
  with pytest.raises(CheckpointError, match="no complete checkpoint of step 1"):
    ckpts.restore(abstract(make_state(0)), 1)
  ckpts.close()


def test_saving_an_earlier_step_drops_the_abandoned_later_ones(tmp_path):
  save_steps(tmp_path, [1, 2, 3], keep=3)
  with TrainingCheckpoints(tmp_path, keep=3) as ckpts:
    ckpts.save(2, make_state(7), {"step": 2, "again": True})
    assert ckpts.all_steps() == [1, 2]
    got, meta, _ = ckpts.restore(abstract(make_state(0)))
  assert meta == {"step": 2, "again": True}
  assert_bit_equal(got, make_state(7))


def test_empty_directory_has_no_latest(tmp_path):
  with TrainingCheckpoints(tmp_path / "new") as ckpts:
    assert ckpts.latest_step() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
      ckpts.restore(abstract(make_state(0)))


@pytest.mark.parametrize("files", [("latest",), ("step_000000010/arrays.npz",),
                                   ("latest", "step_000000010/arrays.npz",
                                    "step_000000010/meta.json")])
def test_old_npz_format_is_refused(tmp_path, files):
  for name in files:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("step_000000010\n")
  with pytest.raises(CheckpointError) as err:
    TrainingCheckpoints(tmp_path)
  message = str(err.value)
  assert "\n" not in message
  assert str(tmp_path) in message and "old .npz format" in message
  assert "earlier slidejax" in message and "re-train" in message and "convert" in message


@pytest.mark.parametrize("change, expected", [
  (lambda s: s["params"].update(w=jnp.zeros((40, 25), jnp.float32)),
   "leaf ['params']['w'] is float32[40, 24] in the checkpoint, expected float32[40, 25]"),
  (lambda s: s["params"].update(ids=jnp.zeros((300,), jnp.int32)),
   "leaf ['params']['ids'] is uint16[300] in the checkpoint, expected int32[300]"),
  (lambda s: s["rngs"].update(key=jax.random.key(0, impl="rbg")),
   "leaf ['rngs']['key'] is key<fry>[] in the checkpoint, expected key<rbg>[]"),
  (lambda s: s["params"].pop("special"),
   "leaf ['params']['special'] is in the checkpoint but not in the expected state"),
  (lambda s: s.update(extra=jnp.zeros(2)),
   "leaf ['extra'] of the expected state is not in the checkpoint"),
])
def test_mismatching_abstract_state_names_the_first_difference(tmp_path, change, expected):
  save_steps(tmp_path, [1])
  other = make_state(1)
  change(other)
  with TrainingCheckpoints(tmp_path) as ckpts:
    with pytest.raises(CheckpointError) as err:
      ckpts.restore(abstract(other))
  message = str(err.value)
  assert "\n" not in message
  assert message == f"{tmp_path / '1'}: does not match the expected state: {expected}"


def _truncate_data(step_dir):
  f = newest_data_file(step_dir)
  os.truncate(f, f.stat().st_size // 2)


def _flip_a_byte(step_dir):
  f = newest_data_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0xFF
  f.write_bytes(bytes(data))


def _delete_meta(step_dir):
  (step_dir / "meta" / "metadata").unlink()


def _delete_manifest(step_dir):
  (step_dir / "manifest" / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _flip_a_byte, _delete_meta,
                                    _delete_manifest])
def test_damaged_newest_checkpoint_raises_and_older_one_restores(tmp_path, damage):
  save_steps(tmp_path, [1, 2])
  damage(tmp_path / "2")
  with TrainingCheckpoints(tmp_path) as ckpts:
    assert ckpts.latest_step() == 2
    for step in (None, 2):
      with pytest.raises(CheckpointError) as err:
        ckpts.restore(abstract(make_state(0)), step)
      message = str(err.value)
      assert "\n" not in message and len(message) < 500
      assert message.startswith(f"{tmp_path / '2'}: damaged checkpoint")
    del err
    gc.collect()  # orbax's abandoned reads must not surface as "Exception ignored" here
    got, meta, _ = ckpts.restore(abstract(make_state(0)), 1)
  assert meta["step"] == 1
  assert_bit_equal(got, make_state(1))


def test_read_meta_of_damaged_checkpoint_raises(tmp_path):
  save_steps(tmp_path, [1])
  _delete_meta(tmp_path / "1")
  with TrainingCheckpoints(tmp_path) as ckpts:
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
      ckpts.read_meta()


_KILLED_SAVE = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, sys.argv[2])
  from orbax.checkpoint._src.path import atomicity
  from slidejax.checkpoint import TrainingCheckpoints
  from test_training_checkpoints import make_state

  directory, where = sys.argv[1], sys.argv[3]
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killing_finalize(self):
    # 'item': dies before renaming the first finished item (meta) inside 2.orbax-checkpoint-tmp;
    # 'step': dies before renaming 2.orbax-checkpoint-tmp to 2, with every file written.
    final = self.get_final()
    if (where == "step" and final.name == "2") or (
        where == "item" and final.parent.name.startswith("2.orbax-checkpoint-tmp")):
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
  ckpts = TrainingCheckpoints(directory)
  ckpts.save(1, make_state(1), {"step": 1})
  print("saved 1", flush=True)
  ckpts.save(2, make_state(2), {"step": 2})
  print("saved 2", flush=True)
""")


@pytest.mark.parametrize("where", ["item", "step"])
def test_save_killed_mid_write_is_never_picked_up(tmp_path, where):
  directory = tmp_path / "ck"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "-c", _KILLED_SAVE, str(directory), str(pathlib.Path(__file__).parent), where],
    env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == -9, done.stderr
  assert done.stdout.split("\n")[:2] == ["saved 1", ""]
  leftover = directory / f"2{TMP_SUFFIX}"
  assert leftover.is_dir() and any(p.is_file() for p in leftover.rglob("*"))
  assert not (directory / "2").exists()

  ckpts = TrainingCheckpoints(directory)
  assert ckpts.latest_step() == 1 and ckpts.all_steps() == [1]
  got, meta, path = ckpts.restore(abstract(make_state(0)))
  assert (meta, path) == ({"step": 1}, directory / "1")
  assert_bit_equal(got, make_state(1))
  assert ckpts.read_meta() == {"step": 1}
  assert leftover.is_dir()  # reading removes nothing

  ckpts.save(3, make_state(3), {"step": 3})  # another step: orbax alone would leave 2's tmp
  assert not list(directory.glob(f"*{TMP_SUFFIX}*"))
  assert ckpts.all_steps() == [1, 3]
  got, meta, _ = ckpts.restore(abstract(make_state(0)))
  ckpts.close()
  assert meta == {"step": 3}
  assert_bit_equal(got, make_state(3))


def test_orbax_info_logging_is_silenced(tmp_path):
  records = []

  class Capture(logging.Handler):
    def emit(self, record):
      records.append(record)

  absl_logger = logging.getLogger("absl")
  handler, level = Capture(logging.DEBUG), absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.DEBUG)
  try:
    with TrainingCheckpoints(tmp_path) as ckpts:
      ckpts.save(1, make_state(1), {})
      ckpts.restore(abstract(make_state(0)))
    logging.getLogger("absl").info("not from orbax")
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)
  assert [r.getMessage() for r in records] == ["not from orbax"]
