"""The public training path: ``slidejax.value_and_grad`` + ``slidejax.Optimizer`` in a user's
own ``nnx.jit`` step: row-sparse gradients equal the dense ones on the gathered rows, updates
equal optax's, nothing ``[N, H]`` is formed, and selection randomness comes from the layer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slidejax
from slidejax import nn
from slidejax import train

N, H, F, FEATURES, B = 997, 24, 6, 300, 8


def _inputs(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, FEATURES, (batch, F)), jnp.int32)
  values = jnp.asarray(rng.random((batch, F)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, N, (batch, 2)), jnp.int32).at[0, 1].set(-1)
  return ids, values, labels


def _model(mode="shared", num_active=32, seed=0, **options):
  return nn.SlideMLP(FEATURES, N, hidden=H, l=4, num_active=num_active, mode=mode,
                     rngs=nnx.Rngs(seed), **options)


def _user_step():
  """The step of issue #11, as a user writes it."""
  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids, values, labels):
    def loss_fn(model):
      return slidejax.nn.sampled_softmax_loss(model(ids, values, labels=labels))
    loss, grads = slidejax.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
  return train_step


def test_user_step_compiles_without_a_dense_wide_gradient_copy_or_update():
  model = _model()
  optimizer = slidejax.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  hlo = _user_step().lower(model, optimizer, *_inputs()).compile().as_text()
  # every instruction yielding a whole [N, H] array (output kernel, Adam's two moments) must
  # be a parameter or an in-place scatter of rows: no zeros broadcast (a dense gradient), no
  # dense update, no copy
  wide = [line.strip() for line in hlo.splitlines()
          if f"= f32[{N},{H}]" in line and "ENTRY" not in line and "ROOT" not in line]
  kinds = [("parameter" if " parameter(" in line else
            "scatter" if (" scatter(" in line or "scatter" in line.split("=")[0])
            else line[:160]) for line in wide]
  assert kinds.count("scatter") == 3, kinds
  assert set(kinds) <= {"parameter", "scatter"}, kinds
  assert "input_output_alias" in hlo   # donated: the scatters run in place


def test_the_same_step_under_nnx_optimizer_is_dense():
  """The check above can fail: the plain NNX step forms dense [N, H] arrays."""
  model = _model()
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer, ids, values, labels):
    loss, grads = nnx.value_and_grad(
        lambda m: nn.sampled_softmax_loss(m(ids, values, labels=labels)))(model)
    optimizer.update(model, grads)
    return loss

  hlo = step.lower(model, optimizer, *_inputs()).compile().as_text()
  wide = [line for line in hlo.splitlines() if f"= f32[{N},{H}]" in line
          and " parameter(" not in line and "scatter" not in line.split("=")[0]
          and " scatter(" not in line]
  assert wide


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_row_gradients_equal_the_dense_gradient_on_gathered_rows(mode):
  model = _model(mode)
  ids, values, labels = _inputs()
  key = jax.random.key(5)

  def loss_fn(m):
    return nn.sampled_softmax_loss(m(ids, values, labels=labels, key=key))

  loss, grads = slidejax.value_and_grad(loss_fn)(model)
  dense_loss, dense = nnx.value_and_grad(loss_fn)(model)
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
  for layer in ("embed", "output"):
    row = grads[layer]["kernel"].get_value()
    assert isinstance(row, slidejax.RowGrad)
    full = np.asarray(dense[layer]["kernel"][...])
    got = np.zeros_like(full)
    keep = np.asarray(row.ids) < full.shape[0]
    assert len(np.unique(np.asarray(row.ids)[keep])) == keep.sum()   # unique ids
    got[np.asarray(row.ids)[keep]] = np.asarray(row.rows)[keep]
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(row.rows)[~keep], 0)
  np.testing.assert_allclose(grads["embed"]["bias"][...], dense["embed"]["bias"][...],
                             rtol=1e-5, atol=1e-7)
  bias = grads["output"]["bias"].get_value()
  got = np.zeros(N, np.float32)
  keep = np.asarray(bias.ids) < N
  got[np.asarray(bias.ids)[keep]] = np.asarray(bias.rows)[keep]
  np.testing.assert_allclose(got, dense["output"]["bias"][...], rtol=1e-5, atol=1e-7)


def test_optimizer_equals_nnx_optimizer_when_every_row_is_touched():
  """Any optax chain: with every output neuron active and every feature used, the row-sparse
  update is the dense one."""
  tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2, weight_decay=0.1))
  ids = jnp.tile(jnp.arange(FEATURES, dtype=jnp.int32).reshape(-1, 30), (1, 1))[:B]
  values = jnp.ones(ids.shape, jnp.float32).at[:, 1].set(0.5)
  ids = jnp.concatenate([ids, jnp.arange(240, 300, dtype=jnp.int32).reshape(2, 30)])
  values = jnp.concatenate([values, jnp.ones((2, 30), jnp.float32)])
  labels = jnp.asarray(np.random.default_rng(1).integers(0, N, (B + 2, 2)), jnp.int32)
  sparse_model, dense_model = _model(num_active=N), _model(num_active=N)
  sparse_opt = slidejax.Optimizer(sparse_model, tx, wrt=nnx.Param)
  dense_opt = nnx.Optimizer(dense_model, tx, wrt=nnx.Param)
  key = jax.random.key(0)

  def loss_fn(m):
    return nn.sampled_softmax_loss(m(ids, values, labels=labels, key=key))

  for _ in range(3):
    _, grads = slidejax.value_and_grad(loss_fn)(sparse_model)
    sparse_opt.update(sparse_model, grads)
    _, dense_grads = nnx.value_and_grad(loss_fn)(dense_model)
    dense_opt.update(dense_model, dense_grads)
  for got, want in zip(jax.tree.leaves(nnx.state(sparse_model, nnx.Param)),
                       jax.tree.leaves(nnx.state(dense_model, nnx.Param))):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  for got, want in zip(jax.tree.leaves(nnx.as_pure(sparse_opt.opt_state)),
                       jax.tree.leaves(nnx.as_pure(dense_opt.opt_state))):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
  assert int(sparse_opt.step[...]) == 3


def test_untouched_rows_and_their_state_stay_bit_identical():
  model = _model()
  optimizer = slidejax.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=nnx.Param)
  ids, values, labels = _inputs()
  before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
  loss, grads = slidejax.value_and_grad(
      lambda m: nn.sampled_softmax_loss(m(ids, values, labels=labels)))(model)
  optimizer.update(model, grads)
  row_ids = np.asarray(grads["output"]["kernel"].get_value().ids)
  touched = np.zeros(N, bool)
  touched[row_ids[row_ids < N]] = True
  after = np.asarray(model.output.kernel[...])
  np.testing.assert_array_equal(after[~touched], before["output"]["kernel"][~touched])
  assert np.all(np.any(after[touched] != before["output"]["kernel"][touched], axis=1))
  mu = np.asarray(nnx.as_pure(optimizer.opt_state)[0].mu["output"]["kernel"])
  np.testing.assert_array_equal(mu[~touched], 0.0)
  assert np.all(np.any(mu[touched] != 0, axis=1))


def test_selection_keys_come_from_the_layer_stream():
  model = _model()
  ids, values, labels = _inputs()
  first = model(ids, values, labels=labels).ids
  second = model(ids, values, labels=labels).ids
  assert not np.array_equal(first, second)          # a fresh key per call
  again = _model()                                  # same seed: the same sequence
  np.testing.assert_array_equal(again(ids, values, labels=labels).ids, first)
  layer = nn.SlideDense(H, N, l=4, num_active=32, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="no random stream"):
    layer(jnp.ones((2, H)), labels=labels[:2])
  layer(jnp.ones((2, H)), labels=labels[:2], key=jax.random.key(0))   # an explicit key works


def test_user_step_trains_and_rebuilds_on_a_schedule():
  model = _model()
  optimizer = slidejax.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  step = _user_step()
  schedule = train.fixed_interval(3)
  ids, values, labels = _inputs()
  buckets = np.asarray(model.output.tables.get_value().buckets).copy()
  losses = []
  for i in range(1, 7):
    losses.append(float(step(model, optimizer, ids, values, labels)))
    if schedule.is_rebuild_step(i)[0]:
      assert nn.rebuild_tables(model) == 1
  assert losses[-1] < losses[0]
  assert not np.array_equal(np.asarray(model.output.tables.get_value().buckets), buckets)
  assert int(optimizer.step[...]) == 6


def test_a_layer_called_twice_is_refused():
  layer = nn.SlideDense(H, N, l=4, num_active=32, rngs=nnx.Rngs(0))
  h = jnp.ones((2, H))

  def loss_fn(layer):
    return layer(h).logits.sum() + layer(h).logits.sum()

  with pytest.raises(ValueError, match="called twice"):
    slidejax.value_and_grad(loss_fn)(layer)


def test_a_sparse_layer_the_loss_does_not_call_gets_empty_row_gradients():
  model = _model()
  optimizer = slidejax.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  ids, values, _ = _inputs()
  kernel = np.asarray(model.output.kernel[...]).copy()
  _, grads = slidejax.value_and_grad(lambda m: jnp.sum(m.hidden(ids, values) ** 2))(model)
  assert grads["output"]["kernel"].get_value().ids.shape == (0,)
  optimizer.update(model, grads)
  np.testing.assert_array_equal(model.output.kernel[...], kernel)


def test_sparse_input_with_shared_ids_equals_the_batched_form():
  layer = nn.SparseInput(50, 8, rngs=nnx.Rngs(0))
  ids = jnp.asarray([3, 7, 50, 11], jnp.int32)          # 50: padding (out of range)
  values = jax.random.uniform(jax.random.key(1), (5, 4))
  shared = layer(ids, values)
  np.testing.assert_allclose(shared, layer(jnp.broadcast_to(ids, values.shape), values),
                             rtol=1e-6)
  _, grads = slidejax.value_and_grad(lambda l: jnp.sum(l(ids, values) ** 2))(layer)
  _, dense = nnx.value_and_grad(lambda l: jnp.sum(l(ids, values) ** 2))(layer)
  row = grads["kernel"].get_value()
  np.testing.assert_array_equal(row.ids, [3, 7, 50, 11])
  np.testing.assert_allclose(np.asarray(row.rows)[[0, 1, 3]],
                             np.asarray(dense["kernel"][...])[[3, 7, 11]], rtol=1e-5)
