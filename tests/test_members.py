"""Ensembles of dense networks (``--members``): the combined model against its members and
``fit``'s bagging (own splits, resume, refusals)."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slidejax
from slidejax import data as xcdata
from slidejax import nn
from slidejax import train
from slidejax.cli import main as cli_main
from slidejax.train import _plan

FEATURES, LABELS, HIDDEN = 40, 12, 8
IDS = jnp.array([[1, 2, 3], [4, 5, -1], [39, 0, 7]], jnp.int32)
VALUES = jnp.array([[1.0, 0.5, 0.2], [0.3, 0.3, 0.0], [0.9, 0.1, 0.4]], jnp.float32)


def _members(count: int) -> list:
  """One-member models with distinct, non-zero biases (a combination that summed them, or
  dropped the embedding's, would rank differently)."""
  models = [nn.DenseMLP(FEATURES, LABELS, hidden=HIDDEN, dropout=0.5, rngs=nnx.Rngs(seed))
            for seed in range(count)]
  for i, model in enumerate(models):
    model.bias[...] = 3.0 * jax.random.normal(jax.random.key(i), (LABELS,))
    model.embed.bias[...] = jax.random.normal(jax.random.key(10 + i), (HIDDEN,))
  return models


def _log_probs(model) -> jax.Array:
  return jax.nn.log_softmax(model.hidden(IDS, VALUES) @ model.kernel[...].T + model.bias[...])


def test_from_members_ranks_by_the_mean_log_probability():
  models = _members(3)
  ensemble = nn.DenseMLP.from_members(models)
  assert ensemble.members == 3 and ensemble.spec["members"] == 3
  mean = sum(_log_probs(m) for m in models) / 3
  _, ids = ensemble.top_k(IDS, VALUES, LABELS)
  np.testing.assert_array_equal(ids, jnp.argsort(-mean, axis=1))
  # the members disagree, so the test would see a combination that followed one of them
  assert any(not np.array_equal(jnp.argsort(-_log_probs(m), 1), ids) for m in models)
  assert nn.DenseMLP.from_members(models[:1]) is models[0]


def test_from_members_refuses_mixed_shapes_and_shortcuts():
  wide = nn.DenseMLP(FEATURES, LABELS, hidden=2 * HIDDEN, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one shape"):
    nn.DenseMLP.from_members([_members(1)[0], wide])
  with pytest.raises(ValueError, match="residual"):
    nn.DenseMLP(FEATURES, LABELS, hidden=HIDDEN, members=2, residual=True, rngs=nnx.Rngs(0))


def test_a_members_call_gives_the_mean_of_the_members_logits():
  models = _members(3)
  ensemble = nn.DenseMLP.from_members(models)
  for model in [ensemble, *models]:
    model.eval()   # no dropout: the calls must match exactly
  mean = sum(m(IDS, VALUES) for m in models) / 3
  np.testing.assert_allclose(ensemble(IDS, VALUES), mean, rtol=1e-5, atol=1e-5)
  assert not np.allclose(models[0](IDS, VALUES), mean, atol=1e-3)   # not one member's


def _dense_data():
  return xcdata.synthesize_split(num_points=500, num_features=120, num_labels=30, avg_nnz=8,
                                 avg_labels=2, seed=3)


CONFIG = dict(hidden=16, epochs=3, validation=0.2, batch_size=32, lr=0.01)


def _top(model, data, max_features):
  batch = xcdata.pad_rows(data, np.arange(64), max_features=max_features, max_labels=1)
  return np.asarray(model.top_k(np.asarray(batch.feature_ids, np.int32),
                                np.asarray(batch.feature_values, np.float32), 5)[1])


def test_fit_with_members_is_the_ensemble_of_fits_with_their_seeds(tmp_path):
  trn, tst = _dense_data()
  quiet = dict(progress=False, log=lambda *a: None)
  both = train.fit(train.TrainConfig(members=2, seed=4, **CONFIG), trn, tst,
                   checkpoint_dir=str(tmp_path / "run"), **quiet)
  assert [m["seed"] for m in both["members"]] == [4, 5]
  alone = [train.fit(train.TrainConfig(members=1, seed=s, **CONFIG), trn, tst, **quiet)
           for s in (4, 5)]
  rows = both["validation"]["rows"]
  splits = [_plan.split_validation(trn, rows, s)[1] for s in (4, 5)]
  assert not np.array_equal(splits[0].feature_ids, splits[1].feature_ids)   # own splits
  for member, single in zip(both["members"], alone):
    assert member["validation"]["best_step"] == single["validation"]["best_step"]
  combined = nn.DenseMLP.from_members([r["model"] for r in alone])
  # the ensemble's votes: the median k and mean weight of the members' own choices
  chosen = [r["neighbours"] for r in alone]
  assert [m["neighbours"] for m in both["members"]] == chosen
  voting = sorted(c["k"] for c in chosen if c["weight"])
  assert both["neighbours"] == (None if not voting else {
      "k": voting[len(voting) // 2], "weight": round(float(np.mean([c["weight"]
                                                                    for c in chosen])), 6)})
  train.attach_neighbours(combined, trn, both["neighbours"])
  width = both["config"]["max_features"]
  np.testing.assert_array_equal(_top(both["model"], tst, width), _top(combined, tst, width))
  assert both["steps"] == sum(r["steps"] for r in alone)
  # resumed: the finished members are read back, the missing one is trained again, the same
  shutil.rmtree(tmp_path / "run" / "member-1")
  again = train.fit(train.TrainConfig(members=2, seed=4, **CONFIG), trn, tst,
                    checkpoint_dir=str(tmp_path / "run"), resume=True, **quiet)
  np.testing.assert_array_equal(_top(again["model"], tst, width), _top(both["model"], tst, width))
  assert again["p@1"] == both["p@1"] and again["steps"] == both["steps"]
  with pytest.raises(slidejax.checkpoint.CheckpointError, match="no member's checkpoint"):
    train.fit(train.TrainConfig(members=2, seed=4, **CONFIG), trn, tst,
              checkpoint_dir=str(tmp_path / "empty"), resume=True, **quiet)


def test_members_auto_and_refusals():
  trn, _ = _dense_data()
  resolve = lambda **kw: train.resolve_config(train.TrainConfig(**kw), trn)[0].members  # noqa: E731
  assert resolve() == _plan.AUTO_MEMBERS                       # dense, a validation split
  assert resolve(epochs=3) == 1                                # no validation split
  assert resolve(num_active=16) == 1                           # a sparse output layer
  assert resolve(residual=True) == 1
  for bad in (dict(members=2, num_active=16), dict(members=2, shortcut=4),
              dict(members=2, residual=True)):
    with pytest.raises(train.TrainingError, match="members=2 cannot"):
      train.resolve_config(train.TrainConfig(**bad), trn)
  with pytest.raises(train.TrainingError, match="members"):
    train.check_options(train.TrainConfig(members=0))


def test_cli_refuses_zero_members(capsys):
  assert cli_main(["train", "--members", "0", "--no-progress"]) == 2
  assert "members" in capsys.readouterr().err


def test_a_run_ended_by_early_stopping_resumes_to_its_results(tmp_path):
  # (a finished member is read back this way; before, a resume trained another epoch)
  trn, tst = _dense_data()
  quiet = dict(progress=False, log=lambda *a: None)
  config = train.TrainConfig(members=1, hidden=64, lr=0.05, batch_size=32, epochs=40,
                             validation=0.3, patience=2, schedule="constant")
  first = train.fit(config, trn, tst, checkpoint_dir=str(tmp_path), **quiet)
  assert first["steps"] < 40 * -(-(trn.num_points - first["validation"]["rows"]) // 32)
  again = train.fit(config, trn, tst, checkpoint_dir=str(tmp_path), resume=True, **quiet)
  assert again["steps"] == first["steps"] and again["p@1"] == first["p@1"]
