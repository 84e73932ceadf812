"""Training engine: NNX modules, sparse steps against dense references, loop, checkpoints."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slidejax
from slidejax import data as xcdata
from slidejax import nn
from slidejax import train
from slidejax.cli import main as cli_main


def _tiny_data(seed=0, points=600, features=300, labels=120):
  return xcdata.synthesize_split(num_points=points, num_features=features, num_labels=labels,
                                 avg_nnz=12, avg_labels=2, seed=seed)


def _batch(data, rows, max_features=16, max_labels=4):
  b = xcdata.pad_rows(data, np.asarray(rows), max_features=max_features, max_labels=max_labels)
  return train.TrainBatch(np.asarray(b.feature_ids, np.int32),
                          np.asarray(b.feature_values, np.float32),
                          np.asarray(b.label_ids, np.int32), np.asarray(rows, np.int32))


def test_slide_dense_with_every_neuron_active_equals_dense():
  layer = nn.SlideDense(8, 40, l=4, num_active=40, mode="shared", rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(1), (5, 8))
  labels = jnp.array([[1, 2], [39, -1], [0, 5], [-1, -1], [7, 7]], jnp.int32)
  out = layer(h, labels=labels, key=jax.random.key(2))
  assert sorted(np.asarray(out.ids).tolist()) == list(range(40))
  dense = h @ layer.kernel[...].T + layer.bias[...]
  np.testing.assert_allclose(out.logits, dense[:, out.ids], rtol=1e-5, atol=1e-5)

  def sparse_loss(layer):
    return nn.sampled_softmax_loss(layer(h, labels=labels, key=jax.random.key(2)))

  def dense_loss(layer):
    return nn.dense_softmax_loss(h @ layer.kernel[...].T + layer.bias[...], labels)

  np.testing.assert_allclose(sparse_loss(layer), dense_loss(layer), rtol=1e-5)
  gs = nnx.grad(sparse_loss)(layer)
  gd = nnx.grad(dense_loss)(layer)
  np.testing.assert_allclose(gs["kernel"][...], gd["kernel"][...], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gs["bias"][...], gd["bias"][...], rtol=1e-4, atol=1e-6)


def test_tables_are_a_variable_not_a_param():
  model = nn.SlideMLP(50, 60, hidden=8, l=3, num_active=16, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves)
  assert jax.tree.leaves(nnx.state(model, nn.HashTables))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  ids = jnp.zeros((2, 3), jnp.int32)
  vals = jnp.ones((2, 3), jnp.float32)
  labels = jnp.array([[1], [2]], jnp.int32)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: nn.sampled_softmax_loss(m(ids, vals, labels=labels, key=jax.random.key(0))))(
            model)
    optimizer.update(model, grads)
    return loss

  before = np.asarray(model.output.kernel[...]).copy()
  assert np.isfinite(float(step(model, optimizer)))
  assert not np.array_equal(before, np.asarray(model.output.kernel[...]))


def test_sparse_step_equals_dense_sgd_when_every_neuron_is_active():
  trn, _ = _tiny_data()
  model = nn.SlideMLP(trn.num_features, trn.num_labels, hidden=8, l=4,
                      num_active=trn.num_labels, rngs=nnx.Rngs(0))
  w_in, b_in = np.asarray(model.embed.kernel[...]), np.asarray(model.embed.bias[...])
  w_out, b_out = np.asarray(model.output.kernel[...]), np.asarray(model.output.bias[...])
  lr = 0.5
  trainer = train.Trainer(model, optax.sgd(lr), donate=False)
  batch = _batch(trn, np.arange(8))
  out = trainer.step(batch)

  def dense_loss(params):
    wi, bi, wo, bo = params
    h = jax.nn.relu(jnp.einsum("bf,bfh->bh", batch.feature_values, wi[batch.feature_ids]) + bi)
    return nn.dense_softmax_loss(h @ wo.T + bo, batch.label_ids)

  params = tuple(map(jnp.asarray, (w_in, b_in, w_out, b_out)))
  loss, grads = jax.value_and_grad(dense_loss)(params)
  np.testing.assert_allclose(out.loss, loss, rtol=1e-5)
  model = trainer.model
  for got, p, g in zip((model.embed.kernel, model.embed.bias, model.output.kernel,
                        model.output.bias), params, grads):
    np.testing.assert_allclose(got[...], p - lr * g, rtol=1e-4, atol=1e-6)


def test_fit_learns_and_reports(tmp_path):
  trn, tst = _tiny_data(points=3000)
  config = train.TrainConfig(hidden=32, l=8, num_active=48, batch_size=64, epochs=4, lr=5e-3,
                             rebuild_first=10, eval_every=20, eval_points=200)
  result = train.fit(config, trn, tst, progress=False)
  for key in ("p@1", "p@3", "p@5", "ndcg@5", "train_seconds", "samples_per_second", "steps",
              "rebuilds", "rebuild_seconds", "history", "config"):
    assert key in result
  assert result["rebuilds"] >= 2 and result["steps"] == 4 * -(-trn.num_points // 64)
  assert result["history"][0]["step"] == 20
  chance = 1.0 / trn.num_labels
  assert result["p@1"] > 20 * chance, result["p@1"]
  # The returned model is an ordinary module again: any batch size, exact and LSH inference.
  model = result["model"]
  batch = xcdata.pad_rows(tst, np.arange(37), max_features=32, max_labels=4)
  _, exact_ids = model.top_k(batch.feature_ids, batch.feature_values, 5)
  _, lsh_ids = model.top_k(batch.feature_ids, batch.feature_values, 5, exact=False)
  assert exact_ids.shape == lsh_ids.shape == (37, 5)
  assert np.all((np.asarray(lsh_ids) >= 0) & (np.asarray(lsh_ids) < trn.num_labels))
  hits = lambda ids: np.mean([ids[i, 0] in batch.label_ids[i] for i in range(37)])
  assert hits(np.asarray(lsh_ids)) > 10 * chance


def test_resume_equals_uninterrupted_run(tmp_path):
  trn, tst = _tiny_data(points=700)
  base = dict(hidden=16, l=4, num_active=32, batch_size=64, lr=5e-3, rebuild_first=5,
              rebuild_growth=1.5, seed=3, schedule="constant")
  full = train.fit(train.TrainConfig(epochs=3, **base), trn, tst, progress=False)
  ckdir = tmp_path / "ck"
  train.fit(train.TrainConfig(epochs=2, **base), trn, tst, checkpoint_dir=str(ckdir),
            progress=False)
  # The epoch count is not part of the state: extending a run of constant learning rate
  # continues it exactly (a decaying schedule is re-planned over the new epochs).
  resumed = train.fit(train.TrainConfig(epochs=3, **base), trn, tst, checkpoint_dir=str(ckdir),
                      resume=True, progress=False)
  assert resumed["steps"] == full["steps"]
  assert resumed["rebuilds"] == full["rebuilds"]
  for a, b in zip(jax.tree.leaves(nnx.state(full["model"], nnx.Param)),
                  jax.tree.leaves(nnx.state(resumed["model"], nnx.Param))):
    np.testing.assert_array_equal(a, b)
  assert resumed["p@1"] == full["p@1"]


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
  trn, tst = _tiny_data(points=200)
  ckdir = tmp_path / "ck"
  cfg = train.TrainConfig(hidden=8, l=2, num_active=16, batch_size=64, epochs=1)
  train.fit(cfg, trn, tst, checkpoint_dir=str(ckdir), progress=False)
  other = train.TrainConfig(hidden=16, l=2, num_active=16, batch_size=64, epochs=2)
  with pytest.raises(slidejax.checkpoint.CheckpointError, match="hidden"):
    train.fit(other, trn, tst, checkpoint_dir=str(ckdir), resume=True, progress=False)


def test_bad_inputs_fail_before_training():
  trn, tst = _tiny_data(points=200)
  cfg = train.TrainConfig(hidden=8, l=2, num_active=16, batch_size=32, epochs=1)
  wrong_dims = tst._replace(num_features=tst.num_features + 1)
  with pytest.raises(train.TrainingError, match="features"):
    train.fit(cfg, trn, wrong_dims, progress=False)
  bad_labels = tst._replace(label_ids=tst.label_ids.copy())
  bad_labels.label_ids[0] = trn.num_labels + 5
  with pytest.raises(train.TrainingError, match="label id"):
    train.fit(cfg, trn, bad_labels, progress=False)
  empty = xcdata.subset(trn, np.arange(0))
  with pytest.raises(train.TrainingError, match="empty"):
    train.fit(cfg, empty, tst, progress=False)
  with pytest.raises(train.TrainingError, match="num_active"):
    train.fit(dataclasses.replace(cfg, num_active=10_000), trn, tst, progress=False)


def test_nan_loss_stops_with_step_and_keeps_the_last_good_checkpoint(tmp_path):
  from slidejax.checkpoint import TrainingCheckpoints
  trn, tst = _tiny_data(points=640)
  ckdir = tmp_path / "ck"
  cfg = train.TrainConfig(hidden=8, l=2, num_active=16, batch_size=64, epochs=3, lr=1e30,
                          checkpoint_every=1)
  with pytest.raises(train.TrainingDiverged, match=r"step (\d+).*last good checkpoint") as info:
    train.fit(cfg, trn, tst, checkpoint_dir=str(ckdir), progress=False)
  bad_step = int(str(info.value).split()[1].rstrip(":"))
  with TrainingCheckpoints(ckdir) as checkpoints:
    kept = checkpoints.latest_step()
    # the newest checkpoint is the step before the NaN, and holds finite weights
    assert kept == bad_step - 1, (kept, bad_step)
    meta = checkpoints.read_meta(kept)
    assert meta["position"]["step"] == kept
    resolved, _ = train.resolve_config(cfg, trn)
    trainer = train.Trainer(train.build_model(resolved, trn.num_features, trn.num_labels),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr,
                                                                  weight_decay=0.0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.state)
    state, _, _ = checkpoints.restore({"trainer": abstract, "best": {}}, kept)
    state = state["trainer"]
  params = jax.tree.leaves(nnx.state(state, nnx.Param))
  assert params and all(bool(jnp.all(jnp.isfinite(x))) for x in params)


def test_rehash_schedule():
  s = train.RehashSchedule(first=50, growth=2.0, max_interval=300)
  assert s.rebuild_steps(1000) == [50, 150, 350, 650, 950]
  assert s.is_rebuild_step(150) == (True, False)
  assert s.is_rebuild_step(151) == (False, False)
  f = train.fixed_interval(10, redraw_every=2)
  assert f.rebuild_steps(40) == [10, 20, 30, 40]
  assert f.is_rebuild_step(20) == (True, True) and f.is_rebuild_step(30) == (True, False)


def test_cli_train_json(tmp_path):
  trn, tst = _tiny_data(points=300)
  xcdata.write_xc(tmp_path / "train.txt", trn)
  xcdata.write_xc(tmp_path / "test.txt", tst)
  out = tmp_path / "r.json"
  code = cli_main(["train", "--train", str(tmp_path / "train.txt"), "--test",
                   str(tmp_path / "test.txt"), "--hidden", "8", "--l", "2", "--num-active", "16",
                   "--epochs", "1", "--batch-size", "64", "--json", str(out), "--no-progress"])
  assert code == 0
  result = json.loads(out.read_text())
  assert {"p@1", "p@3", "p@5", "ndcg@5", "history", "config", "steps"} <= set(result)
  # --save keeps the model: evaluate on the saved model gives the training run's metrics
  code = cli_main(["train", "--train", str(tmp_path / "train.txt"), "--test",
                   str(tmp_path / "test.txt"), "--hidden", "8", "--l", "2", "--num-active", "16",
                   "--epochs", "1", "--batch-size", "64", "--json", str(out), "--no-progress",
                   "--save", str(tmp_path / "model")])
  assert code == 0
  trained = json.loads(out.read_text())
  assert cli_main(["evaluate", str(tmp_path / "model"), "--data", str(tmp_path / "test.txt"),
                   "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
  evaluated = json.loads((tmp_path / "e.json").read_text())
  for key in ("p@1", "p@3", "p@5", "ndcg@5", "psp@5"):
    assert abs(evaluated[key] - trained[key]) < 1e-6, (key, evaluated[key], trained[key])
  info = slidejax.checkpoint.read_info(tmp_path / "model")
  assert info["spec"]["output"]["num_active"] == 16
  assert sum(info["metadata"]["label_counts"]) == len(trn.label_ids)
  # a non-empty --save target is refused before training
  assert cli_main(["train", "--train", str(tmp_path / "train.txt"), "--no-progress",
                   "--save", str(tmp_path / "model")]) == 2
  code = cli_main(["train", "--train", str(tmp_path / "train.txt"), "--num-active", "100000",
                   "--no-progress"])
  assert code == 2


def test_ctrl_c_saves_checkpoint_and_resume_matches(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time
  trn, tst = _tiny_data(points=3000)
  xcdata.write_xc(tmp_path / "train.txt", trn)
  xcdata.write_xc(tmp_path / "test.txt", tst)
  common = [sys.executable, "-m", "slidejax", "train", "--train", str(tmp_path / "train.txt"),
            "--test", str(tmp_path / "test.txt"), "--hidden", "16", "--l", "4", "--num-active",
            "32", "--batch-size", "32", "--epochs", "3", "--no-progress"]
  env = dict(os.environ, SLIDEJAX_MALLOC="0")
  ckdir = tmp_path / "ck"
  proc = subprocess.Popen(common + ["--checkpoint", str(ckdir), "--checkpoint-every", "5"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  def has_checkpoint():
    return ckdir.is_dir() and any(p.name.isdigit() for p in ckdir.iterdir())
  while not has_checkpoint() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "checkpoint saved" in err
  from slidejax.checkpoint import TrainingCheckpoints
  with TrainingCheckpoints(ckdir) as checkpoints:
    meta = checkpoints.read_meta()
  assert meta["reason"] == "interrupted" and 0 < meta["step"] < 3 * 75
  resumed = subprocess.run(common + ["--checkpoint", str(ckdir), "--resume", "--json",
                                     str(tmp_path / "resumed.json")],
                           env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  straight = subprocess.run(common + ["--json", str(tmp_path / "straight.json")], env=env,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr
  a = json.loads((tmp_path / "resumed.json").read_text())
  b = json.loads((tmp_path / "straight.json").read_text())
  assert a["steps"] == b["steps"]
  assert (a["p@1"], a["p@5"], a["ndcg@5"]) == (b["p@1"], b["p@5"], b["ndcg@5"])


def test_pure_jax_builder_trains_without_host_callbacks():
  # What accelerators use by default: tables built and queried in pure JAX inside the step.
  trn, tst = _tiny_data(points=1500)
  config = train.TrainConfig(hidden=16, l=4, num_active=32, batch_size=64, epochs=3, lr=5e-3,
                             rebuild_first=5, builder="jax")
  result = train.fit(config, trn, tst, progress=False)
  assert result["rebuilds"] >= 2
  assert result["p@1"] > 10.0 / trn.num_labels
  hlo = _step_hlo(result["model"], _batch(trn, np.arange(64)))
  assert "callback" not in hlo.lower()
  # The check can fail: the host backend's step does contain its callback.
  host_model = nn.SlideMLP(trn.num_features, trn.num_labels, hidden=16, l=4, num_active=32,
                           backend="host", rngs=nnx.Rngs(0))
  assert "callback" in _step_hlo(host_model, _batch(trn, np.arange(64))).lower()


def _step_hlo(model, batch) -> str:
  optimizer = slidejax.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  return nnx.jit(train.train_step).lower(model, optimizer, batch).as_text()


def test_deferred_loss_checks_report_the_first_nan_step():
  trn, tst = _tiny_data(points=2000)
  cfg = train.TrainConfig(hidden=8, l=2, num_active=16, batch_size=64, epochs=2, lr=1e30,
                          rebuild_first=1000)
  steps = []
  for every in (1, 0):            # checkpoint_every=1 reads each loss; 0 reads them in groups
    with pytest.raises(train.TrainingDiverged) as info:
      train.fit(dataclasses.replace(cfg, checkpoint_every=every), trn, tst,
                checkpoint_dir=None, progress=False)
    steps.append(int(str(info.value).split()[1].rstrip(":")))
  assert steps[0] == steps[1] < train._loop.LOSS_CHECK_STEPS


def test_rebuild_eager_streams_the_same_tables_as_jitted_rebuild():
  trn, _ = _tiny_data()
  model = nn.SlideMLP(trn.num_features, trn.num_labels, hidden=8, l=3, num_active=32,
                      rngs=nnx.Rngs(0))
  trainer = train.Trainer(model, optax.adam(1e-2))
  for i in range(3):      # move the weights away from the ones the tables were built from
    trainer.step(_batch(trn, np.arange(8 * i, 8 * i + 8)))
  key = jax.random.key(7)

  @jax.jit
  def traced_rebuild(state):
    m, _ = nnx.merge(trainer.graphdef, state)
    nn.rebuild_tables(m, key)
    return m.output.tables.get_value()

  traced = traced_rebuild(jax.tree.map(jnp.copy, trainer.state))
  model = trainer.model
  old_buckets = model.output.tables.get_value().buckets
  nn.rebuild_tables(model, key, free_old=True)      # eager: streams; frees the old tables
  assert old_buckets.is_deleted()
  for a, b in zip(jax.tree.leaves(traced), model.output.tables.get_value()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
