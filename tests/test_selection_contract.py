"""Selection contract end to end: where every true label lands (query slots, model slots,
loss columns) and one full Adam step of the sparse trainer against a hand-written dense step.

Each test is built to fail on the bug it is named after: a label whose slot points at another
id, a dropped-label count that disagrees with the slots, a sparse step whose loss, gradients,
Adam moments or updated parameters differ from the dense computation when every neuron is
active.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from slidejax import data as xcdata
from slidejax import lsh
from slidejax import nn
from slidejax import train

LR = 1e-2
B1, B2 = 0.9, 0.999


# -- one sparse Adam step against a dense Adam step ------------------------------------------
def _contract_batch(num_labels):
  """A batch of 6 rows that exercises every corner of the step.

  Row 0: a repeated label and a repeated feature id; row 1: the two highest label ids;
  row 2: a real row without labels; row 4: a padding row (``rows == -1``) that still carries
  the stale features and labels of another row (its weight, not its content, must drop it).
  """
  trn, _ = xcdata.synthesize_split(num_points=64, num_features=50, num_labels=num_labels,
                                   avg_nnz=6, avg_labels=2, seed=0)
  rows = np.array([0, 1, 2, 3, -1, 5])
  b = xcdata.pad_rows(trn, rows, max_features=8, max_labels=4)
  feature_ids = np.asarray(b.feature_ids, np.int32).copy()
  feature_values = np.asarray(b.feature_values, np.float32).copy()
  label_ids = np.asarray(b.label_ids, np.int32).copy()
  n = num_labels
  assert feature_values[0, 7] == 0                                     # a free feature slot
  feature_ids[0, 7], feature_values[0, 7] = feature_ids[0, 0], 0.5   # repeated feature id
  label_ids[0] = [3, 3, 11, -1]                                        # repeated label
  label_ids[1] = [-1, n - 1, -1, n - 2]                                # padding between labels
  label_ids[2] = -1                                                    # no label at all
  feature_ids[4], feature_values[4] = feature_ids[3], feature_values[3]  # stale padding row
  label_ids[4] = [n - 1, 0, 7, 7]
  return train.TrainBatch(feature_ids, feature_values, label_ids, rows.astype(np.int32)), trn


def _dense_targets(label_ids, num_labels):
  """float32 ``[B, N]``: each label entry of a row gets ``1 / (entries of the row)`` (a
  repeated label collects one share per entry; -1 padding gets none)."""
  targets = np.zeros((label_ids.shape[0], num_labels), np.float32)
  for b, row in enumerate(label_ids):
    row = row[row >= 0]
    for label in row:
      targets[b, label] += 1.0 / row.size
  return jnp.asarray(targets)


def _dense_step(params, batch):
  """Loss, gradients, Adam state and parameters after one dense Adam step, in plain JAX
  (no slidejax code: the loss is written out here)."""
  targets = _dense_targets(batch.label_ids, params[3].shape[0])
  weight = jnp.asarray((batch.rows >= 0) & (batch.label_ids >= 0).any(axis=1), jnp.float32)

  def dense_loss(params):
    wi, bi, wo, bo = params
    h = jax.nn.relu(jnp.einsum("bf,bfh->bh", batch.feature_values, wi[batch.feature_ids]) + bi)
    per_sample = -jnp.sum(targets * jax.nn.log_softmax(h @ wo.T + bo, axis=1), axis=1)
    return jnp.sum(weight * per_sample) / jnp.sum(weight)

  loss, grads = jax.value_and_grad(dense_loss)(params)
  tx = optax.adam(LR, b1=B1, b2=B2)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return loss, grads, opt_state[0], optax.apply_updates(params, updates)


def _close(got, want, what, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol,
                             err_msg=what)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_one_step_equals_dense_adam_step(mode):
  num_labels = 20
  batch, trn = _contract_batch(num_labels)
  model = nn.SlideMLP(trn.num_features, num_labels, hidden=8, l=4, num_active=num_labels,
                      mode=mode, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(5))   # non-zero biases: a wrong bias row shows
  model.embed.bias[...] = 0.1 * jax.random.normal(keys[0], model.embed.bias.shape)
  model.output.bias[...] = jax.random.normal(keys[1], model.output.bias.shape)
  params = tuple(jnp.asarray(np.asarray(v[...]).copy()) for v in (
      model.embed.kernel, model.embed.bias, model.output.kernel, model.output.bias))
  trainer = train.Trainer(model, optax.adam(LR, b1=B1, b2=B2), donate=False)
  metrics = trainer.step(batch)

  loss, grads, adam, new_params = _dense_step(params, batch)
  _close(metrics.loss, loss, "loss")
  assert int(metrics.forced_dropped) == 0
  model, optimizer = trainer.model, trainer.optimizer
  assert int(optimizer.step[...]) == 1
  state = nnx.as_pure(optimizer.opt_state)[0]   # optax.adam's ScaleByAdamState
  got = {   # name -> (updated parameter, Adam mu, Adam nu, Adam count)
      f"{layer}.{name}": (getattr(getattr(model, layer), name)[...], state.mu[layer][name],
                          state.nu[layer][name], state.count)
      for layer, name in (("embed", "kernel"), ("embed", "bias"), ("output", "kernel"),
                          ("output", "bias"))}
  for i, name in enumerate(got):
    param, mu, nu, count = got[name]
    assert int(count) == int(adam.count) == 1, name
    # After one step mu = (1 - b1) g and nu = (1 - b2) g^2: the moments are the gradients.
    _close(np.asarray(mu) / (1 - B1), grads[i], f"{name}: gradient (Adam mu / (1 - b1))")
    _close(mu, adam.mu[i], f"{name}: Adam mu", atol=1e-7)
    _close(nu, adam.nu[i], f"{name}: Adam nu", rtol=3e-5, atol=1e-12)
    _close(param, new_params[i], f"{name}: updated parameter")
  # Non-vacuous: the step moved the output rows of every label in the batch.
  labels = np.unique(batch.label_ids[(batch.label_ids >= 0) & (batch.rows[:, None] >= 0)])
  moved = np.asarray(got["output.kernel"][0])[labels] != np.asarray(params[2])[labels]
  assert moved.any(axis=1).all()


# -- every label sits at its slot: query level -----------------------------------------------
BATCH, NUM_FORCED, NUM_TABLES, RANGE_BITS = 4, 5, 3, 3


@functools.lru_cache(maxsize=None)
def _tables(num_neurons, seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**RANGE_BITS, size=(num_neurons, NUM_TABLES)).astype(np.int32)
  return lsh.build_tables(jnp.asarray(codes), range_bits=RANGE_BITS, bucket_capacity=4,
                          backend="jax")


@functools.partial(jax.jit, static_argnames=("shared", "num_active", "num_neurons", "backend"))
def _query(tables, codes, forced, key, *, shared, num_active, num_neurons, backend):
  query = lsh.query_shared if shared else lsh.query
  return query(tables, codes, num_active=num_active, num_neurons=num_neurons, key=key,
               forced_ids=forced, backend=backend)


def _forced_labels(rng, num_neurons, pool_size):
  """int32 ``[B, f]`` from a small pool that always holds ``n - 1`` and ``n - 2``, with -1
  padding, out-of-range ids and a repeated id inside row 0."""
  edge = [num_neurons - 1, num_neurons - 2]
  others = rng.choice(num_neurons - 2, size=min(pool_size, num_neurons - 2), replace=False)
  pool = np.concatenate([edge, others, [-1, -1, num_neurons]]).astype(np.int32)
  forced = rng.choice(pool, size=(BATCH, NUM_FORCED)).astype(np.int32)
  forced[0, 1] = forced[0, 3] = forced[0, 0] = edge[rng.integers(2)]
  forced[1, -1] = -1
  return forced


def _check_slots(forced, slots, ids, valid, num_neurons):
  """ids[slot] is the label for every in-range entry that has a slot, -1 for all others.

  ``ids`` ``[m]`` (shared) or ``[B, m]`` (per-sample). Returns the in-range mask.
  """
  in_range = (forced >= 0) & (forced < num_neurons)
  assert (slots[~in_range] == -1).all(), (forced, slots)
  assert (slots < ids.shape[-1]).all()
  b, j = np.nonzero(in_range & (slots >= 0))
  row_ids = ids if ids.ndim == 1 else ids[b]
  row_valid = valid if valid.ndim == 1 else valid[b]
  if ids.ndim == 1:
    got, ok = row_ids[slots[b, j]], row_valid[slots[b, j]]
  else:
    got, ok = row_ids[np.arange(b.size), slots[b, j]], row_valid[np.arange(b.size), slots[b, j]]
  np.testing.assert_array_equal(got, forced[b, j], err_msg=f"forced={forced} slots={slots}")
  assert ok.all()
  return in_range


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), num_neurons=st.sampled_from([7, 40]),
       num_active=st.sampled_from([5, 8]), pool_size=st.sampled_from([1, 3, 30]),
       backend=st.sampled_from(lsh.BACKENDS), shared=st.booleans())
@example(seed=1, num_neurons=40, num_active=5, pool_size=30, backend="host", shared=True)
@example(seed=1, num_neurons=40, num_active=5, pool_size=30, backend="jax", shared=True)
def test_every_label_sits_at_its_loss_slot(seed, num_neurons, num_active, pool_size, backend,
                                           shared):
  rng = np.random.default_rng(seed)
  forced = _forced_labels(rng, num_neurons, pool_size)
  codes = jnp.asarray(rng.integers(0, 2**RANGE_BITS, size=(BATCH, NUM_TABLES)).astype(np.int32))
  out = _query(_tables(num_neurons, seed % 3), codes, jnp.asarray(forced), jax.random.key(seed),
               shared=shared, num_active=num_active, num_neurons=num_neurons, backend=backend)
  ids, valid, slots = (np.asarray(a) for a in out[:3])
  assert slots.shape == forced.shape
  in_range = _check_slots(forced, slots, ids, valid, num_neurons)
  distinct = np.unique(forced[in_range])
  if not shared:
    assert (slots[in_range] >= 0).all(), (forced, slots)     # per-sample: nothing dropped
    return
  placed = in_range & (slots >= 0)
  dropped = int(np.sum(in_range & (slots < 0)))
  assert int(out.forced_dropped) == dropped, (forced, slots, int(out.forced_dropped))
  # One id: the same slot in every entry, or dropped in every entry.
  for v in distinct:
    assert np.unique(slots[forced == v]).size == 1, (v, forced, slots)
  size = min(num_active, num_neurons)
  if distinct.size <= size:
    assert dropped == 0, (forced, slots)
  else:       # forced ids come first: every slot holds one, and the rest are counted
    assert np.unique(forced[placed]).size == size
    assert int(out.forced_dropped) == int(in_range.sum()) - int(placed.sum()) > 0


# -- every label sits at its slot: through the model, down to the loss columns ---------------
@functools.lru_cache(maxsize=None)
def _model(mode, backend, num_active):
  model = nn.SlideMLP(30, 40, hidden=8, l=3, num_active=num_active, mode=mode, backend=backend,
                      bucket_capacity=4, rngs=nnx.Rngs(1))
  model.output.bias[...] = jax.random.normal(jax.random.key(2), (40,))  # a wrong row shows
  return model


@pytest.mark.parametrize("backend", lsh.BACKENDS)
@pytest.mark.parametrize("mode,num_active", [("shared", 6), ("shared", 32),
                                             ("per_sample", 6)])
def test_model_label_slots_point_at_label_logits(mode, backend, num_active):
  model = _model(mode, backend, num_active)
  rng = np.random.default_rng(num_active)
  feature_ids = jnp.asarray(rng.integers(0, 30, size=(BATCH, 6)).astype(np.int32))
  feature_values = jnp.asarray(rng.random((BATCH, 6)).astype(np.float32))
  h = model.hidden(feature_ids, feature_values)
  dense = np.asarray(h @ model.output.kernel[...].T + model.output.bias[...])
  saw_dropped = False
  for trial in range(3):
    labels = _forced_labels(rng, 40, [2, 30, 30][trial])
    labels[labels == 40] = -1                      # the model takes -1 padding only
    out = model(feature_ids, feature_values, labels=jnp.asarray(labels),
                key=jax.random.key(trial))
    ids, valid, slots = np.asarray(out.ids), np.asarray(out.valid), np.asarray(out.label_slots)
    in_range = _check_slots(labels, slots, ids, valid, 40)
    if ids.ndim == 1:
      np.testing.assert_array_equal(ids[np.maximum(slots, 0)][slots >= 0], labels[slots >= 0])
      assert int(out.forced_dropped) == int(np.sum(in_range & (slots < 0)))
      saw_dropped |= int(out.forced_dropped) > 0
      if np.unique(labels[in_range]).size <= num_active:
        assert (slots[in_range] >= 0).all()
    else:
      taken = np.take_along_axis(ids, np.maximum(slots, 0), axis=1)
      np.testing.assert_array_equal(taken[slots >= 0], labels[slots >= 0])
      assert (slots[in_range] >= 0).all()
    # The loss reads column slots[b, j] of row b: it must hold that label's logit.
    b, j = np.nonzero(slots >= 0)
    np.testing.assert_allclose(np.asarray(out.logits)[b, slots[b, j]], dense[b, labels[b, j]],
                               rtol=1e-5, atol=1e-5)
  assert saw_dropped == (num_active < 10 and mode == "shared")   # both cases were exercised


# -- per-sample mode learns at 100K labels ----------------------------------------------------
def test_per_sample_mode_learns_at_100k_labels():
  """Per-sample LSH training at 100K labels gets far above the popularity baseline (always
  predicting the most frequent training label). Before the fix its tables collapsed, each
  sample's candidates filled the whole set with the same few neurons and P@1 stayed at chance.
  """
  trn, tst = xcdata.synthesize_split(num_points=24_000, num_features=4_000,
                                     num_labels=100_000, avg_nnz=24, avg_labels=2, seed=4)
  counts = xcdata.label_counts(trn)
  top = int(np.argmax(counts))
  has_top = np.array([top in tst.label_ids[tst.label_indptr[i]:tst.label_indptr[i + 1]]
                      for i in range(tst.num_points)])
  popularity_p1 = has_top.mean()
  config = train.TrainConfig(**{**train.CLASSIC, "hidden": 32, "lr": 3e-3}, num_active=256,
                             mode="per_sample", l=16, epochs=3, eval_points=1000,
                             uniform_share=0.5, in_batch_negatives=True)
  result = train.fit(config, trn, tst, progress=False, log=lambda m: None)
  assert result["rebuilds"] >= 2          # the tables were in use, and rebuilt
  assert result["p@1"] > max(5 * popularity_p1, 0.2), (result["p@1"], popularity_p1)
