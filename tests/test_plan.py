"""Defaults that fit the data: auto options, option checks, the validation split, early
stopping that keeps the best model, a time budget planned as steps, exact resume."""
import dataclasses
import itertools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slidejax import data as xcdata
from slidejax import nn
from slidejax import train
from slidejax.cli import main as cli_main
from slidejax.train import _loop
from slidejax.train import _plan


def _data(seed=0, points=900, features=300, labels=100):
  return xcdata.synthesize_split(num_points=points, num_features=features, num_labels=labels,
                                 avg_nnz=12, avg_labels=2, seed=seed)


def _flat(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# -- refusing nonsense --------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--lr", "-1"], "lr must be a positive number"),
    (["--lr", "0"], "lr must be a positive number"),
    (["--lr", "nan"], "lr must be a positive number"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "weight_decay must be a non-negative"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--epochs", "many"], "expected auto or int"),
    (["--num-active", "-5"], "num_active must be a positive integer"),
    (["--validation", "0.9"], "validation must be in [0, 0.5]"),
    (["--patience", "0"], "patience must be a positive integer"),
    (["--time-budget", "-3"], "time_budget must be a positive number"),
    (["--hidden", "0"], "hidden must be a positive integer"),
    (["--uniform-share", "1.5"], "uniform_share must be in [0, 1]"),
])
def test_nonsense_options_exit_2_before_training(flags, words, capsys):
  with pytest.raises(SystemExit) as stop:   # argparse's own refusals exit 2 as well
    raise SystemExit(cli_main(["train", "--no-progress", *flags]))
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert words in err and "Traceback" not in err


def test_cli_defaults_are_train_config_defaults():
  import argparse
  from slidejax import _cli_train
  parser = argparse.ArgumentParser()
  _cli_train.add_parser(parser.add_subparsers())
  args = parser.parse_args(["train"])
  assert _cli_train.config_from_args(args) == train.TrainConfig()
  # the CLI's preset names (kept without importing the data module) are the library's
  assert sorted(_cli_train.PRESETS) == sorted(xcdata.SYNTH_PRESETS)


# -- auto -----------------------------------------------------------------------------------

def test_auto_num_active_is_dense_for_few_labels_and_a_share_for_many():
  small, _ = _data(labels=100)
  config, notes = train.resolve_config(train.TrainConfig(), small)
  assert config.dense and "dense" in notes["num_active"]
  many = _plan.AUTO_DENSE_LABELS * 4
  picked = _plan.auto_num_active(many)
  assert picked < many and picked & (picked - 1) == 0     # a power of two, a share
  assert picked >= _plan.AUTO_MIN_ACTIVE
  assert _plan.auto_num_active(_plan.AUTO_DENSE_LABELS + 1) <= _plan.AUTO_DENSE_LABELS + 1


def test_auto_batch_size_and_rate_follow_the_output_layer():
  small, _ = _data(labels=100)
  dense, notes = train.resolve_config(train.TrainConfig(), small)
  assert (dense.batch_size, dense.lr) == (_plan.AUTO_BATCH_DENSE, _plan.AUTO_LR_DENSE)
  assert "dense" in notes["batch_size"]
  sparse, notes = train.resolve_config(train.TrainConfig(num_active=64), small)
  assert (sparse.batch_size, sparse.lr) == (_plan.AUTO_BATCH_SPARSE, _plan.AUTO_LR_SPARSE)
  assert _plan.AUTO_BATCH_SPARSE != _plan.AUTO_BATCH_DENSE and "sparse" in notes["batch_size"]
  # on a mesh, auto rounds up to a multiple of the data axis; an explicit size stays
  meshed, _ = train.resolve_config(train.TrainConfig(num_active=64, mesh="data=3,model=1"),
                                   small)
  assert meshed.batch_size % 3 == 0 and 0 < meshed.batch_size - _plan.AUTO_BATCH_SPARSE < 3
  assert train.resolve_config(train.TrainConfig(batch_size=50), small)[0].batch_size == 50


def test_auto_epochs_and_validation_follow_the_data():
  trn, _ = _data(points=3000)
  config, notes = train.resolve_config(train.TrainConfig(batch_size=50), trn)
  held = _plan.validation_rows(trn.num_points, config.validation)
  assert 200 <= held <= trn.num_points // 5
  steps_per_epoch = -(-(trn.num_points - held) // 50)
  assert config.epochs == _plan.auto_epochs(steps_per_epoch, 50)
  # the epochs that pass AUTO_ROWS rows, whatever the batch
  assert _plan.auto_epochs(_plan.AUTO_ROWS // 1280, 128) == 10
  assert _plan.auto_epochs(_plan.AUTO_ROWS // 2560, 256) == 10
  assert "early stopping" in notes["epochs"]
  # explicit epochs: no validation unless asked for
  fixed, _ = train.resolve_config(train.TrainConfig(epochs=3), trn)
  assert fixed.validation == 0 and fixed.epochs == 3


def test_validation_split_is_seeded_disjoint_and_complete():
  trn, _ = _data(points=500)
  part, held = _plan.split_validation(trn, 50, seed=3)
  again, held_again = _plan.split_validation(trn, 50, seed=3)
  _, other = _plan.split_validation(trn, 50, seed=4)
  assert held.num_points == 50 and part.num_points == trn.num_points - 50

  def rows(d):
    return {tuple(d.feature_ids[d.feature_indptr[i]:d.feature_indptr[i + 1]])
            for i in range(d.num_points)}
  assert rows(held) == rows(held_again) and rows(held) != rows(other)
  assert rows(held) | rows(part) == rows(trn)
  np.testing.assert_array_equal(part.label_ids, again.label_ids)


def test_learning_rate_schedules():
  def lr(step, schedule):
    return _plan.learning_rate(step, base=2.0, horizon=100, schedule=schedule)

  assert lr(0, "cosine") == 2.0 and lr(50, "cosine") == pytest.approx(1.0)
  assert lr(100, "cosine") == pytest.approx(0.0) and lr(150, "cosine") == pytest.approx(0.0)
  assert lr(25, "linear") == pytest.approx(1.5)
  assert lr(99, "constant") == 2.0
  assert _plan.learning_rate(10, base=2.0, horizon=None, schedule="cosine") == 2.0


def test_trainer_sets_an_injected_learning_rate():
  trn, _ = _data()
  model = nn.DenseMLP(trn.num_features, trn.num_labels, hidden=8, rngs=nnx.Rngs(0))
  trainer = train.Trainer(model, optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
  batch = xcdata.pad_rows(trn, np.arange(32), max_features=16, max_labels=4)
  batch = train.TrainBatch(np.asarray(batch.feature_ids, np.int32),
                           np.asarray(batch.feature_values, np.float32),
                           np.asarray(batch.label_ids, np.int32), np.arange(32, dtype=np.int32))
  before = _flat(trainer.model)
  trainer.set_hyperparams(learning_rate=0.0)
  trainer.step(batch)
  for a, b in zip(before, _flat(trainer.model)):
    np.testing.assert_array_equal(a, b)
  trainer.set_hyperparams(learning_rate=1e-2)
  trainer.step(batch)
  assert any(not np.array_equal(a, b) for a, b in zip(before, _flat(trainer.model)))
  with pytest.raises(KeyError, match="momentum"):
    trainer.set_hyperparams(momentum=0.9)


# -- early stopping --------------------------------------------------------------------------

def _overfitting_config(**kw):
  # a large learning rate on few rows: the validation score peaks early and then falls
  base = dict(hidden=64, lr=0.05, batch_size=32, epochs=40, validation=0.3, patience=4,
              schedule="constant", output_init="fan_in", members=1, neighbours=0,
              rerank="none")
  return train.TrainConfig(**{**base, **kw})


def test_early_stopping_restores_the_best_model():
  trn, tst = _data(points=700)
  config = _overfitting_config()
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  val = result["validation"]
  assert val["best_step"] < result["steps"]      # it went on past the best, then stopped
  assert result["steps"] < result["config"]["epochs"] * -(-(trn.num_points - val["rows"]) // 32)
  # the returned model is the best one: its validation score is the best score
  held_rows = _plan.validation_rows(trn.num_points, result["config"]["validation"])
  _, held = _plan.split_validation(trn, held_rows, config.seed)
  model = result["model"]
  scored = train.evaluate_model(
      lambda ids, values: model.top_k(ids, values, 5)[1], held, batch_size=32,
      max_features=result["config"]["max_features"])
  assert _plan.validation_score(scored) == pytest.approx(val["best_score"], abs=1e-6)
  last = val["history"][-1]["score"]
  assert last < val["best_score"]


def test_time_budget_is_planned_as_steps_with_a_fake_clock(monkeypatch):
  trn, tst = _data(points=900)
  clock = itertools.count()
  monkeypatch.setattr(_loop, "_now", lambda: next(clock) * 0.01)   # 10 ms per reading
  config = train.TrainConfig(hidden=16, epochs=200, validation=0.1, patience=1000,
                             time_budget=20.0, batch_size=32, members=1)
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  planned = result["planned_steps"]
  assert planned is not None and planned < 200 * 26      # the budget, not the epochs, binds
  assert result["steps"] == planned                     # the plan ran to its end
  assert result["train_seconds"] <= 20.0 + 0.5


def test_a_budget_that_buys_every_epoch_trains_alike_whatever_the_clock(monkeypatch):
  # the plan is made once about 3% of the budget has passed, a wall-clock moment: before it
  # the rates were constant, so two runs planned at different steps trained differently
  trn, tst = _data(points=600)
  config = train.TrainConfig(hidden=16, epochs=6, validation=0.1, patience=1000,
                             time_budget=20.0, batch_size=32, members=1)
  params, logs = [], []
  for tick in (0.01, 0.03):   # the plan comes three times sooner in steps on the slow clock
    clock = itertools.count()
    monkeypatch.setattr(_loop, "_now", lambda clock=clock, tick=tick: next(clock) * tick)
    result = train.fit(config, trn, tst, progress=False, log=logs.append)
    epoch = -(-(trn.num_points - result["validation"]["rows"]) // 32)
    assert result["planned_steps"] == result["steps"] == 6 * epoch   # every epoch: the cap
    params.append(jax.tree.leaves(nnx.state(result["model"], nnx.Param)))
  planned = [line for line in logs if "steps planned" in line]
  assert len(planned) == 2 and planned[0] != planned[1]   # planned at different steps
  for a, b in zip(*params):
    np.testing.assert_array_equal(a, b)


def _ticking_clock(monkeypatch) -> list[float]:
  """Replaces the loop's clock by one that advances 10 ms per reading; returns its [seconds],
  which a test may advance itself."""
  clock = [0.0]

  def now():
    clock[0] += 0.01
    return clock[0]

  monkeypatch.setattr(_loop, "_now", now)
  return clock


def test_a_short_budget_is_not_planned_from_the_first_rebuilds(monkeypatch):
  # the first table rebuild (compiling) falls in the plan's measuring window: counted as step
  # time it made a 60 s budget on pypi-names plan a third of the steps it buys
  trn, tst = _data(points=900, labels=100)
  clock = _ticking_clock(monkeypatch)
  slow_rebuild, calls = train.Trainer.rebuild, []

  def rebuild(self, **kw):   # the first one compiles: 3 s
    clock[0] += 3.0 if not calls else 0.0
    calls.append(1)
    return slow_rebuild(self, **kw)

  monkeypatch.setattr(train.Trainer, "rebuild", rebuild)
  config = train.TrainConfig(hidden=16, num_active=32, epochs=200, validation=0.1,
                             patience=1000, time_budget=20.0, batch_size=32, rebuild_first=5,
                             calibrate="none")
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  assert result["rebuilds"] >= 1 and result["steps"] == result["planned_steps"]
  assert 0.75 * 20.0 <= result["train_seconds"] <= 20.0 + 0.5


def test_budget_steps_reserve_the_validations_beyond_the_slack():
  plain = _plan.budget_steps(600.0, 18.0, 30, 0.025)
  assert plain == (30 + int(582.0 * (1 - _plan.PLAN_SLACK) / 0.025), 10)
  # validations that fit in half the slack change nothing
  assert _plan.budget_steps(600.0, 18.0, 30, 0.025, validation_seconds=1.0,
                            end_validations=12, steps_per_epoch=1500) == plain
  # a short budget: one validation per run, and the steps get what the passes leave
  steps, per_run = _plan.budget_steps(30.0, 1.5, 30, 0.05, validation_seconds=1.3,
                                      end_validations=12, steps_per_epoch=1500)
  assert per_run == 1 and 200 < steps - 30
  assert (steps - 30) * 0.05 + 1.3 * (per_run + 12) <= 28.5 * (1 - _plan.PLAN_SLACK / 2)
  # short epochs: a validation per epoch, each paid for by the steps
  steps, per_run = _plan.budget_steps(20.0, 0.6, 30, 0.01, validation_seconds=0.2,
                                      end_validations=12, steps_per_epoch=40)
  spent = (steps - 30) * 0.01 + 0.2 * (steps / 40 + 12)
  assert 0.9 * 19.4 - 0.2 <= spent <= 19.4 * (1 - _plan.PLAN_SLACK / 2) + 0.2


def _fit_with_slow_validations(monkeypatch, batch_seconds: float, **changes):
  """(result, log lines) of a 20 s budget on a fake clock (10 ms a reading) where each
  validation batch costs ``batch_seconds``."""
  trn, _ = _data(points=2000, labels=300)
  clock = _ticking_clock(monkeypatch)

  def slow_evaluate(predict, data, *, batch_size, **kw):
    rows = kw.get("points") or data.num_points
    clock[0] += batch_seconds * -(-min(rows, data.num_points) // batch_size)
    return evaluate(predict, data, batch_size=batch_size, **kw)

  evaluate = _loop.evaluate_model
  monkeypatch.setattr(_loop, "evaluate_model", slow_evaluate)
  logs = []
  config = _sampled_config(**{**dict(epochs=200, time_budget=20.0), **changes})
  return train.fit(config, trn, None, progress=False, log=logs.append), logs


@pytest.mark.parametrize("batch_seconds", [0.004, 0.01])
def test_a_budget_reserves_its_validations_and_calibration(monkeypatch, batch_seconds):
  # validations (every tenth of the run, and a calibration's dozen at the end) were left to
  # the plan's 10% slack: a 30 s budget on pypi-names trained 47 s. (Batches of 8: epochs
  # longer than a tenth of the run.)
  result, logs = _fit_with_slow_validations(monkeypatch, batch_seconds, batch_size=8)
  assert result["calibration"] is not None and result["config"]["shortcut"]
  assert result["steps"] == result["planned_steps"]
  assert 0.75 * 20.0 <= result["train_seconds"] <= 20.0 + 0.5
  assert not [line for line in logs if "warning" in line]


def test_validations_before_the_plan_are_not_step_time(monkeypatch):
  # with epochs of a few steps, validations fall in the window the step time is measured
  # over: counted as step time, they made a slower validation plan fewer steps (here 14.7
  # against 10.8 ms a step; on delicious, 10.9 against 6.8 to 8.0 ms in separate runs)
  plans = []
  for batch_seconds in (0.001, 0.02):
    result, logs = _fit_with_slow_validations(monkeypatch, batch_seconds)
    assert result["validation"]["history"][0]["step"] < result["steps"] // 10
    plans.append([line.split(":")[1].split(",")[0] for line in logs if "steps planned" in line])
  assert plans[0] == plans[1] and plans[0][0].endswith("ms per step")


def test_a_budget_too_small_for_its_validations_warns(monkeypatch):
  trn, _ = _data(points=2000, labels=300)
  _ticking_clock(monkeypatch)
  monkeypatch.setattr(_loop._Run, "time_one_validation", lambda self: 3.0)
  logs = []
  train.fit(_sampled_config(epochs=200, time_budget=20.0), trn, None, progress=False,
            log=logs.append)
  assert [line for line in logs if "1 per run and 12 at the end" in line]
  assert [line for line in logs if line.startswith("warning") and "will overrun" in line]


def test_resume_is_exact_with_a_plan_validation_and_best_model(tmp_path, monkeypatch):
  trn, tst = _data(points=700)
  config = _overfitting_config(epochs=12, patience=100, time_budget=12.0)

  def fake_clock():
    clock = itertools.count()
    monkeypatch.setattr(_loop, "_now", lambda: next(clock) * 0.05)

  fake_clock()
  full_dir = tmp_path / "full"
  full = train.fit(config, trn, tst, checkpoint_dir=str(full_dir), progress=False,
                   keep_checkpoints=100, log=lambda m: None)
  train_config = dataclasses.replace(config, checkpoint_every=20)
  fake_clock()
  part_dir = tmp_path / "part"
  train.fit(train_config, trn, tst, checkpoint_dir=str(part_dir), progress=False,
            keep_checkpoints=100, log=lambda m: None)
  steps = sorted(int(p.name) for p in part_dir.iterdir() if p.name.isdigit())
  middle = [s for s in steps if 0 < s < full["steps"]]
  assert len(middle) >= 2 and full["planned_steps"] == full["steps"] < 12 * 16
  resume_at = max(middle)   # after the best step: the best model must come from the checkpoint
  assert resume_at > full["validation"]["best_step"]
  for step in steps:
    if step > resume_at:
      shutil.rmtree(part_dir / str(step))
  fake_clock()
  resumed = train.fit(train_config, trn, tst, checkpoint_dir=str(part_dir), resume=True,
                      progress=False, keep_checkpoints=100, log=lambda m: None)
  assert resumed["planned_steps"] == full["planned_steps"]
  assert resumed["validation"]["best_step"] == full["validation"]["best_step"]
  for a, b in zip(_flat(full["model"]), _flat(resumed["model"])):
    np.testing.assert_array_equal(a, b)
  assert resumed["p@1"] == full["p@1"]


# -- output-bias calibration ---------------------------------------------------------------

def _sampled_config(**kw):
  # (no neighbour votes or reranker: the model these tests score again is the calibrated one
  # alone)
  base = dict(hidden=32, num_active=64, batch_size=32, epochs=3, validation=0.2, patience=100,
              neighbours=0, rerank="none")
  return train.TrainConfig(**{**base, **kw})


def _output_bias(model):
  return np.asarray(model.output.bias[...])


def _log_scale(model):
  return float(np.asarray(model.shortcut.log_scale[...]))


def test_calibration_shifts_the_sampled_biases_once_by_the_best_prior(monkeypatch):
  monkeypatch.setattr(_plan, "CALIBRATION_GRID", (-0.3, 0.3))   # a shift is always tried
  trn, tst = _data(points=900, labels=300)
  config = _sampled_config(shortcut=0)
  plain = train.fit(dataclasses.replace(config, calibrate="none"), trn, tst, progress=False,
                    log=lambda m: None)
  assert plain["calibration"] is None
  held_rows = _plan.validation_rows(trn.num_points, config.validation)
  part, held = _plan.split_validation(trn, held_rows, config.seed)
  counts = xcdata.label_counts(part)
  model = plain["model"]
  base_bias = _output_bias(model)
  scores = {}
  for tau in (-0.3, 0.0, 0.3):   # what each shift scores on the held-out rows
    model.output.bias.set_value(jnp.asarray(base_bias + _plan.prior_shift(counts, tau, 300)))
    scores[tau] = _plan.validation_score(train.evaluate_model(
        lambda ids, values: model.top_k(ids, values, 5)[1], held, batch_size=32,
        max_features=plain["config"]["max_features"]))
  assert len(set(scores.values())) > 1          # the shifts change the ranking
  best = _plan.best_shift(scores)
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  assert result["calibration"]["tau"] == best
  assert result["calibration"]["before"] == pytest.approx(scores[0.0], abs=1e-6)
  assert result["calibration"]["after"] == pytest.approx(scores[best], abs=1e-6)
  np.testing.assert_array_equal(_output_bias(result["model"]),
                                base_bias + _plan.prior_shift(counts, best, 300))
  np.testing.assert_array_equal(np.asarray(result["model"].output.kernel[...]),
                                np.asarray(plain["model"].output.kernel[...]))


def test_calibration_scales_the_shortcut_by_the_best_factor_then_shifts(monkeypatch):
  monkeypatch.setattr(_plan, "SHORTCUT_GRID", (0.5, 3.0))
  monkeypatch.setattr(_plan, "CALIBRATION_GRID", (-0.3, 0.3))
  trn, tst = _data(points=900, labels=300)
  config = _sampled_config(shortcut=8)
  plain = train.fit(dataclasses.replace(config, calibrate="none"), trn, tst, progress=False,
                    log=lambda m: None)
  held_rows = _plan.validation_rows(trn.num_points, config.validation)
  part, held = _plan.split_validation(trn, held_rows, config.seed)
  counts = xcdata.label_counts(part)
  model, base = plain["model"], _log_scale(plain["model"])
  base_bias = _output_bias(model)

  def score():
    return _plan.validation_score(train.evaluate_model(
        lambda ids, values: model.top_k(ids, values, 5)[1], held, batch_size=32,
        max_features=plain["config"]["max_features"]))

  factors = {}
  for factor in (0.5, 1.0, 3.0):   # each factor, the biases as trained
    model.shortcut.log_scale.set_value(
        jnp.asarray(base + np.log(factor) / nn.LabelShortcut.SCALE_GAIN, jnp.float32))
    factors[factor] = score()
  assert len(set(factors.values())) > 1          # the factors change the ranking
  factor = _plan.best_factor(factors)
  assert factor != 1.0   # the data must move it, or a factor not applied goes unseen
  model.shortcut.log_scale.set_value(
      jnp.asarray(base + np.log(factor) / nn.LabelShortcut.SCALE_GAIN, jnp.float32))
  shifts = {}
  for tau in (-0.3, 0.0, 0.3):     # then each shift, with that factor
    model.output.bias.set_value(jnp.asarray(base_bias + _plan.prior_shift(counts, tau, 300)))
    shifts[tau] = score()
  tau = _plan.best_shift(shifts)
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  assert result["calibration"]["shortcut_factor"] == factor
  assert result["calibration"]["tau"] == tau
  assert result["calibration"]["before"] == pytest.approx(factors[1.0], abs=1e-6)
  assert result["calibration"]["after"] == pytest.approx(shifts[tau], abs=1e-6)
  assert _log_scale(result["model"]) == pytest.approx(
      base + np.log(factor) / nn.LabelShortcut.SCALE_GAIN, abs=1e-6)
  np.testing.assert_array_equal(_output_bias(result["model"]),
                                base_bias + _plan.prior_shift(counts, tau, 300))
  # the public function does the same to the model as trained
  model.shortcut.log_scale.set_value(jnp.asarray(base, jnp.float32))
  model.output.bias.set_value(jnp.asarray(base_bias))
  assert train.calibrate(model, held, counts, batch_size=32,
                         max_features=plain["config"]["max_features"]) == result["calibration"]
  assert _log_scale(model) == _log_scale(result["model"])
  np.testing.assert_array_equal(_output_bias(model), _output_bias(result["model"]))


def test_a_bias_shift_rebuilds_tables_that_hash_the_biases(monkeypatch):
  """With ``--transform mips`` the tables hash each neuron's bias: after the calibration's
  shift every bucket must count the neurons the final weights hash to (without the rebuild
  they count those of the last scheduled one)."""
  monkeypatch.setattr(_plan, "CALIBRATION_GRID", (-1.0,))
  monkeypatch.setattr(_plan, "best_shift", lambda scores: -1.0)   # always shift
  trn, tst = _data(points=900, labels=300)
  result = train.fit(_sampled_config(transform="mips", shortcut=0), trn, tst, progress=False,
                     log=lambda m: None)
  assert result["calibration"]["tau"] == -1.0
  out = result["model"].output
  codes = np.asarray(out.family.codes(out.hash_params.get_value(), out._hashed_rows()))
  counts = np.asarray(out.tables.get_value().counts)
  for table in range(codes.shape[1]):
    np.testing.assert_array_equal(np.bincount(codes[:, table], minlength=counts.shape[1]),
                                  counts[table])


def test_calibration_reaches_the_kept_best_model_and_is_not_repeated_on_resume(tmp_path, monkeypatch):
  monkeypatch.setattr(_plan, "CALIBRATION_GRID", (-1.0,))
  monkeypatch.setattr(_plan, "best_shift", lambda scores: -1.0)   # always shift
  monkeypatch.setattr(_plan, "SHORTCUT_GRID", (2.0,))
  monkeypatch.setattr(_plan, "best_factor", lambda scores: 2.0)   # always scale
  trn, tst = _data(points=700, labels=300)
  # early stopping past the best step: the resumed run restores the kept best model, which
  # must be the calibrated one
  config = _overfitting_config(num_active=64)
  first = train.fit(config, trn, tst, checkpoint_dir=str(tmp_path / "ck"), progress=False,
                    log=lambda m: None)
  plain = train.fit(dataclasses.replace(config, calibrate="none"), trn, tst, progress=False,
                    log=lambda m: None)
  assert first["validation"]["best_step"] < first["steps"]
  assert first["calibration"]["tau"] == -1.0
  assert first["calibration"]["shortcut_factor"] == 2.0
  assert not np.allclose(_output_bias(first["model"]), _output_bias(plain["model"]))
  assert _log_scale(first["model"]) == pytest.approx(
      _log_scale(plain["model"]) + np.log(2.0) / nn.LabelShortcut.SCALE_GAIN, abs=1e-6)
  again = train.fit(config, trn, tst, checkpoint_dir=str(tmp_path / "ck"), resume=True,
                    progress=False, log=lambda m: None)
  assert again["calibration"] == first["calibration"]
  np.testing.assert_array_equal(_output_bias(again["model"]), _output_bias(first["model"]))
  assert _log_scale(again["model"]) == _log_scale(first["model"])


# -- model options ---------------------------------------------------------------------------

def test_dropout_only_in_training_calls_and_residual_changes_the_function():
  model = nn.DenseMLP(40, 12, hidden=16, dropout=0.5, residual=True, rngs=nnx.Rngs(0))
  ids = jnp.array([[1, 2, 3], [4, 5, -1]], jnp.int32)
  values = jnp.ones((2, 3), jnp.float32)
  np.testing.assert_array_equal(model.top_k(ids, values, 3)[0], model.top_k(ids, values, 3)[0])
  assert not np.array_equal(model(ids, values), model(ids, values))   # fresh masks
  model.eval()
  np.testing.assert_array_equal(model(ids, values), model(ids, values))   # no masks
  plain = nn.DenseMLP(40, 12, hidden=16, rngs=nnx.Rngs(0))
  assert not np.allclose(plain.hidden(ids, values), model.hidden(ids, values))


def test_dense_sigmoid_loss_is_binary_cross_entropy_over_every_label():
  model = nn.DenseMLP(40, 12, hidden=8, rngs=nnx.Rngs(0))
  batch = train.TrainBatch(np.array([[1, 2], [3, -1]], np.int32),
                           np.ones((2, 2), np.float32),
                           np.array([[0, 5], [11, -1]], np.int32), np.array([0, 1], np.int32))
  got, _ = train.batch_loss(model, batch, nn.sampled_sigmoid_loss)
  logits = np.asarray(model(batch.feature_ids, batch.feature_values), np.float64)
  targets = np.zeros_like(logits)
  targets[0, [0, 5]] = 1
  targets[1, 11] = 1
  bce = np.log1p(np.exp(logits)) - targets * logits
  np.testing.assert_allclose(got, bce.sum(axis=1).mean(), rtol=1e-5)
  softmax, _ = train.batch_loss(model, batch, nn.sampled_softmax_loss)
  np.testing.assert_allclose(softmax, nn.dense_softmax_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(batch.label_ids)), rtol=1e-5)


def test_model_options_survive_save_and_load(tmp_path):
  import slidejax
  model = nn.SlideMLP(40, 64, hidden=8, dropout=0.3, residual=True, num_active=16, l=2,
                      rngs=nnx.Rngs(0))
  slidejax.save(model, tmp_path / "m")
  loaded = slidejax.load(tmp_path / "m")
  assert loaded.spec == model.spec and loaded.block is not None
  ids = jnp.array([[1, 2, 3]], jnp.int32)
  values = jnp.ones((1, 3), jnp.float32)
  np.testing.assert_array_equal(model.top_k(ids, values, 4)[1], loaded.top_k(ids, values, 4)[1])


# -- data stats ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [("", "the file is empty"),
                                         ("0 10 5\n", "no data rows")])
def test_data_stats_on_an_empty_file_is_an_error(tmp_path, capsys, text, words):
  path = tmp_path / "empty.txt"
  path.write_text(text)
  assert cli_main(["data", "stats", str(path)]) == 2
  err = capsys.readouterr().err
  assert words in err and str(path) in err
