"""``slidejax.checkpoint.save`` / ``load`` / ``read_info``: exact round trips and bad files."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slidejax
from slidejax import checkpoint
from slidejax import nn

NUM_FEATURES, NUM_LABELS, HIDDEN = 40, 32, 8


def _slide(**options) -> nn.SlideMLP:
  return nn.SlideMLP(NUM_FEATURES, NUM_LABELS, hidden=HIDDEN, num_active=12, rngs=nnx.Rngs(3),
                     **options)


BUILDERS = {
    "lsh": lambda: _slide(l=4, bucket_capacity=8, track_codes=True),
    # without codes the tables hold a zero-size [N, 0] array, which orbax cannot store
    "lsh-no-codes": lambda: _slide(l=4, bucket_capacity=8, hash="dwta", mode="per_sample"),
    "uniform": lambda: _slide(sampler="uniform", correction="logq"),
    "unigram": lambda: _slide(sampler="unigram",
                              label_counts=np.arange(NUM_LABELS, dtype=np.float32) ** 2),
    "dense": lambda: nn.DenseMLP(NUM_FEATURES, NUM_LABELS, hidden=HIDDEN, rngs=nnx.Rngs(3)),
    "ensemble": lambda: nn.DenseMLP(NUM_FEATURES, NUM_LABELS, hidden=HIDDEN, members=3,
                                    rngs=nnx.Rngs(3)),
}


def _perturb(model) -> None:
  """Moves every float array away from its initial value, so a load that rebuilt the model
  from its spec without restoring the state would be caught."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x + 0.25, params))


def _leaves(model) -> dict:
  """name -> NumPy array of every state leaf (keys as their raw data, with the dtype name)."""
  result = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
    name = jax.tree_util.keystr(path)
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      result[name] = (str(leaf.dtype), np.asarray(jax.random.key_data(leaf)))
    else:
      result[name] = (str(leaf.dtype), np.asarray(leaf))
  return result


def _assert_same_state(a, b) -> None:
  left, right = _leaves(a), _leaves(b)
  assert sorted(left) == sorted(right)
  for name in left:
    assert left[name][0] == right[name][0], name
    np.testing.assert_array_equal(left[name][1], right[name][1], err_msg=name)


def _inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, NUM_FEATURES, (6, 5)), jnp.int32)
  values = jnp.asarray(rng.random((6, 5)), jnp.float32)
  return ids, values


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_round_trip_is_exact(kind, tmp_path):
  model = BUILDERS[kind]()
  _perturb(model)
  counts = list(range(NUM_LABELS))
  directory = checkpoint.save(model, tmp_path / "model",
                              metadata={"label_counts": np.asarray(counts), "note": kind})
  loaded = checkpoint.load(tmp_path / "model")
  assert type(loaded) is type(model) and loaded.spec == model.spec
  _assert_same_state(model, loaded)
  ids, values = _inputs()
  for exact in (True, False):
    for got, want in zip(loaded.top_k(ids, values, 5, exact=exact),
                         model.top_k(ids, values, 5, exact=exact)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if kind in ("dense", "ensemble"):
    np.testing.assert_array_equal(loaded(ids, values), model(ids, values))
  else:
    key = jax.random.key(7)
    labels = jnp.asarray([[1, -1]] * 6, jnp.int32)
    for field in ("logits", "ids", "valid"):
      np.testing.assert_array_equal(getattr(loaded(ids, values, labels=labels, key=key), field),
                                    getattr(model(ids, values, labels=labels, key=key), field))
    # the selection stream continues where the saved model's stands
    np.testing.assert_array_equal(jax.random.key_data(loaded.output.rngs.select()),
                                  jax.random.key_data(model.output.rngs.select()))
    np.testing.assert_array_equal(loaded(ids, values).ids, model(ids, values).ids)
  info = checkpoint.read_info(directory)
  assert info["format_version"] == 1 and info["library_version"] == slidejax.__version__
  assert info["spec"] == model.spec and info["metadata"] == {"label_counts": counts, "note": kind}


def test_lsh_tables_and_keys_round_trip(tmp_path):
  model = BUILDERS["lsh"]()
  model.output.rngs.select()   # advance the stream: the count is state too
  checkpoint.save(model, tmp_path / "m")
  loaded = checkpoint.load(tmp_path / "m")
  for got, want in zip(loaded.output.tables.get_value(), model.output.tables.get_value()):
    assert got.dtype == want.dtype   # neuron_codes are uint16
    np.testing.assert_array_equal(got, want)
  assert model.output.tables.get_value().neuron_codes.dtype == jnp.uint16
  key = loaded.output.rngs.select.key.get_value()
  assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(key) == jax.random.key_impl(model.output.rngs.select.key.get_value())
  assert int(loaded.output.rngs.select.count.get_value()) == 1
  assert loaded.output.sampler_cdf is None and loaded.output.kernel_delta is None


class Tagger(nnx.Module):
  """A user's own module around a SlideDense layer (no ``spec``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.proj = nnx.Linear(6, HIDDEN, rngs=rngs)
    self.head = nn.SlideDense(HIDDEN, NUM_LABELS, num_active=8, l=3, bucket_capacity=4,
                              rngs=rngs)

  def top_k(self, x, k):
    return self.head.top_k(jax.nn.relu(self.proj(x)), k)


def test_user_model_loads_into_abstract_target(tmp_path):
  model = Tagger(nnx.Rngs(0))
  _perturb(model)
  checkpoint.save(model, tmp_path / "tagger")
  assert checkpoint.read_info(tmp_path / "tagger")["spec"] is None
  with pytest.raises(checkpoint.ModelFileError, match="no spec"):
    checkpoint.load(tmp_path / "tagger")
  abstract = nnx.eval_shape(lambda: Tagger(nnx.Rngs(42)))
  loaded = checkpoint.load(tmp_path / "tagger", model=abstract)
  _assert_same_state(model, loaded)
  x = jnp.asarray(np.random.default_rng(1).random((3, 6)), jnp.float32)
  np.testing.assert_array_equal(loaded.top_k(x, 4)[1], model.top_k(x, 4)[1])
  # a concrete target of other values works too and is left as it was
  other = Tagger(nnx.Rngs(9))
  before = _leaves(other)
  _assert_same_state(model, checkpoint.load(tmp_path / "tagger", model=other))
  assert all(np.array_equal(before[n][1], v[1]) for n, v in _leaves(other).items())


def test_save_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
  first, second = BUILDERS["dense"](), BUILDERS["lsh"]()
  checkpoint.save(first, tmp_path / "m")
  (tmp_path / "empty").mkdir()
  checkpoint.save(first, tmp_path / "empty")   # an empty directory is fine
  with pytest.raises(FileExistsError, match="not empty"):
    checkpoint.save(second, tmp_path / "m")
  _assert_same_state(first, checkpoint.load(tmp_path / "m"))
  checkpoint.save(second, tmp_path / "m", overwrite=True)
  _assert_same_state(second, checkpoint.load(tmp_path / "m"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]   # no temporary left


# ------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("saved") / "model"
  checkpoint.save(BUILDERS["lsh"](), directory)
  return directory


def _copy(saved: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  import shutil
  return pathlib.Path(shutil.copytree(saved, tmp_path / "copy"))


def _load_error(directory, **kwargs) -> str:
  with pytest.raises(checkpoint.ModelFileError) as info:
    checkpoint.load(directory, **kwargs)
  message = str(info.value)
  assert "\n" not in message and str(directory) in message
  return message


def _rewrite_info(directory: pathlib.Path, change) -> None:
  info = json.loads((directory / "model.json").read_text())
  change(info)
  (directory / "model.json").write_text(json.dumps(info))


def _state_files(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in (directory / "state").rglob("*") if p.is_file()),
                key=lambda p: -p.stat().st_size)


def test_errors_no_model(tmp_path):
  (tmp_path / "empty").mkdir()
  assert "no model.json" in _load_error(tmp_path / "empty")
  assert "no such model directory" in _load_error(tmp_path / "absent")
  with pytest.raises(checkpoint.ModelFileError, match="no model.json"):
    checkpoint.read_info(tmp_path / "empty")


def test_error_newer_format(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  _rewrite_info(directory, lambda info: info.update(format_version=999))
  message = _load_error(directory)
  assert "format version 999" in message and "newer" in message


def test_error_bad_json_and_missing_fields(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  _rewrite_info(directory, lambda info: info.pop("state"))
  assert "missing field(s) state" in _load_error(directory)
  (directory / "model.json").write_text('{"format_version": 1,')
  assert "not valid JSON" in _load_error(directory)


def test_error_unknown_class(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  _rewrite_info(directory, lambda info: info["spec"].update({"class": "Transformer"}))
  assert "unknown model class 'Transformer'" in _load_error(directory)
  # with model= the spec is not used
  target = nnx.eval_shape(BUILDERS["lsh"])
  _assert_same_state(checkpoint.load(saved), checkpoint.load(directory, model=target))


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_error_damaged_state(saved, tmp_path, damage):
  directory = _copy(saved, tmp_path)
  victim = _state_files(directory)[0]   # the largest file: array data
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(victim.stat().st_size // 2)
  elif damage == "delete":
    victim.unlink()
  else:
    with open(victim, "r+b") as f:
      f.seek(victim.stat().st_size // 2)
      f.write(b"\x00\xff" * 4)
  message = _load_error(directory)
  assert str(victim) in message
  assert {"truncate": "damaged (", "delete": "missing",
          "overwrite": "contents differ"}[damage] in message


def test_error_orbax_failure_is_reported(saved, tmp_path):
  """Damage the file list does not know about reaches orbax, whose error is reported."""
  directory = _copy(saved, tmp_path)
  os.remove(directory / "state" / "manifest.ocdbt")
  _rewrite_info(directory, lambda info: info["state"]["files"].pop("manifest.ocdbt"))
  assert "damaged or incomplete checkpoint" in _load_error(directory)
  _assert_same_state(checkpoint.load(saved), BUILDERS["lsh"]())   # later loads still work


def test_error_state_missing(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  import shutil
  shutil.rmtree(directory / "state")
  assert "state: missing" in _load_error(directory)


def test_error_target_does_not_match(saved, tmp_path):
  wider = nnx.eval_shape(lambda: nn.SlideMLP(NUM_FEATURES, NUM_LABELS, hidden=HIDDEN + 1,
                                             num_active=12, l=4, bucket_capacity=8,
                                             rngs=nnx.Rngs(0)))
  message = _load_error(saved, model=wider)
  assert "embed/bias/value is saved as float32[8], the model expects float32[9]" in message
  uniform = nnx.eval_shape(BUILDERS["uniform"])
  assert "the file has" in _load_error(saved, model=uniform)


def test_relative_directories_save_and_load(tmp_path, monkeypatch):
  model = _slide()
  _perturb(model)
  monkeypatch.chdir(tmp_path)
  slidejax.save(model, "models/m")
  _assert_same_state(model, slidejax.load("models/m"))
