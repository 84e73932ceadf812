"""Row-sparse optimizer: equal to the dense optax update on touched rows, others untouched."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slidejax import optim

INNER = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adagrad": lambda: optax.adagrad(0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2),
}


def _params(key, num_rows=40, width=6):
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.normal(k1, (num_rows, width)),
          "bias": jax.random.normal(k2, (num_rows,))}


def _dense_grads(params, row_ids, row_grads):
  return jax.tree.map(lambda p, g: jnp.zeros_like(p).at[row_ids].add(g, mode="drop"),
                      params, row_grads)


@pytest.mark.parametrize("name", sorted(INNER))
def test_matches_dense_on_touched_rows_and_leaves_others(name):
  key = jax.random.key(0)
  params = _params(key)
  num_rows = params["bias"].shape[0]
  tx_sparse = optim.row_sparse(INNER[name]())
  tx_dense = INNER[name]()
  sparse_state = tx_sparse.init(params)
  dense_state = tx_dense.init(params)
  sparse_params, dense_params = params, params
  touched_any = np.zeros(num_rows, bool)
  for step in range(4):
    # The same rows each step (dense optax then agrees everywhere on touched rows); with
    # duplicates and one padding id (num_rows) that must be ignored.
    row_ids = jnp.array([3, 7, 7, 11, 20, num_rows, 3], jnp.int32)
    kg = jax.random.fold_in(key, step)
    row_grads = {"kernel": jax.random.normal(kg, (7, 6)),
                 "bias": jax.random.normal(jax.random.fold_in(kg, 1), (7,))}
    upd, ids, sparse_state = tx_sparse.update(row_grads, sparse_state, sparse_params,
                                              row_ids=row_ids)
    sparse_params = optim.apply_row_updates(sparse_params, ids, upd)
    dense_g = _dense_grads(dense_params, row_ids, row_grads)
    dupd, dense_state = tx_dense.update(dense_g, dense_state, dense_params)
    dense_params = optax.apply_updates(dense_params, dupd)
    touched_any[[3, 7, 11, 20]] = True
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(sparse_params[leaf][touched_any], dense_params[leaf][touched_any],
                               rtol=1e-5, atol=1e-6)
    # Untouched rows: bit-identical to the start.
    np.testing.assert_array_equal(np.asarray(sparse_params[leaf])[~touched_any],
                                  np.asarray(params[leaf])[~touched_any])
  assert not np.allclose(sparse_params["kernel"][3], params["kernel"][3])


def test_global_count_for_bias_correction():
  params = _params(jax.random.key(1))
  tx = optim.row_sparse(optax.adam(1e-2))
  state = tx.init(params)
  for step in range(3):
    g = {"kernel": jnp.ones((2, 6)), "bias": jnp.ones((2,))}
    _, _, state = tx.update(g, state, params, row_ids=jnp.array([step, step + 5]))
  assert int(state.inner_state[0].count) == 3


def test_sum_duplicate_rows():
  ids = jnp.array([5, 1, 5, 9, -1, 1], jnp.int32)
  grads = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 2), jnp.float32)
  uids, summed = optim.sum_duplicate_rows(ids, grads, num_rows=9)
  got = {int(i): float(s[0]) for i, s in zip(uids, summed) if i < 9}
  assert got == {1: 1.0 + 5.0, 5: 0.0 + 2.0}   # 9 and -1 are out of range: padding
  assert int(jnp.sum(uids < 9)) == 2


def _wide_instructions(hlo: str, shape: str) -> list[str]:
  """What every instruction of ``hlo`` yielding a whole ``shape`` array is: "parameter",
  "scatter" (rows written in place) or the instruction itself (a dense copy or update)."""
  kinds = []
  for line in hlo.splitlines():
    if f"= {shape}" not in line or "ENTRY" in line:
      continue
    name = line.split("=")[0]
    kinds.append("parameter" if " parameter(" in line else
                 "scatter" if " scatter(" in line or "scatter" in name else line.strip()[:160])
  return kinds


def _aliased_inputs(hlo: str) -> set[int]:
  """Entry parameters that an output may share its buffer with (donated, used in place)."""
  header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
  return {int(i) for i in re.findall(r"\((\d+), \{\}, may-alias\)", header)}


def test_jit_with_donation_updates_rows_in_place():
  params = _params(jax.random.key(2), num_rows=1000, width=8)
  tx = optim.row_sparse(optax.adam(1e-3))
  state = tx.init(params)
  ids = jnp.array([1, 2, 3, 2, 1000], jnp.int32)     # a duplicate and one padding id
  g = {"kernel": jax.random.normal(jax.random.key(3), (5, 8)),
       "bias": jax.random.normal(jax.random.key(4), (5,))}

  def step(params, state, ids, g):
    upd, uids, state = tx.update(g, state, params, row_ids=ids)
    return optim.apply_row_updates(params, uids, upd), state

  want_params, want_state = jax.jit(step)(params, state, ids, g)       # not donated
  before = jax.tree.map(np.array, params)
  donated = jax.jit(step, donate_argnums=(0, 1))
  hlo = donated.lower(params, state, ids, g).compile().as_text()
  donated_leaves = jax.tree.leaves((params, state))
  assert _aliased_inputs(hlo) == set(range(len(donated_leaves)))     # ids and g: not donated
  # the kernel and Adam's two moments: only written row by row, never formed densely
  assert sorted(set(_wide_instructions(hlo, "f32[1000,8]"))) == ["parameter", "scatter"]
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)]
  mu_pointer = state.inner_state[0].mu["kernel"].unsafe_buffer_pointer()
  new_params, new_state = donated(params, state, ids, g)
  assert all(x.is_deleted() for x in donated_leaves)
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new_params)] == pointers
  assert new_state.inner_state[0].mu["kernel"].unsafe_buffer_pointer() == mu_pointer
  for got, want in zip(jax.tree.leaves((new_params, new_state)),
                       jax.tree.leaves((want_params, want_state))):
    np.testing.assert_array_equal(got, want)
  # and correct: dense optax on the dense gradient (duplicates summed, padding dropped)
  dense_tx = optax.adam(1e-3)
  dense_params = {k: jnp.asarray(v) for k, v in before.items()}
  dense_upd, _ = dense_tx.update(_dense_grads(dense_params, ids, g),
                                 dense_tx.init(dense_params), dense_params)
  dense_params = optax.apply_updates(dense_params, dense_upd)
  touched = np.isin(np.arange(1000), [1, 2, 3])
  for leaf in ("kernel", "bias"):
    got = np.asarray(new_params[leaf])
    np.testing.assert_allclose(got[touched], dense_params[leaf][touched], rtol=1e-6)
    np.testing.assert_array_equal(got[~touched], before[leaf][~touched])
    assert np.all(got[touched] != before[leaf][touched])


def test_optimizer_under_donating_nnx_jit_updates_the_model_in_place():
  from flax import nnx

  import slidejax
  from slidejax import nn
  num_labels, features = 997, 300
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, features, (8, 6)), jnp.int32)
  values = jnp.asarray(rng.random((8, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_labels, (8, 2)), jnp.int32)
  key = jax.random.key(3)

  def make_model():
    return nn.SlideMLP(features, num_labels, hidden=24, l=4, num_active=32, rngs=nnx.Rngs(0))

  def loss_fn(model):
    return nn.sampled_softmax_loss(model(ids, values, labels=labels, key=key))

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer):
    loss, grads = slidejax.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model = make_model()
  optimizer = optim.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  wide = _wide_instructions(step.lower(model, optimizer).compile().as_text(), "f32[997,24]")
  assert set(wide) == {"parameter", "scatter"}, wide     # kernel, mu, nu: row scatters only
  old_kernel = model.output.kernel.get_value()
  before = np.array(old_kernel)
  pointer = old_kernel.unsafe_buffer_pointer()
  old_mu = optimizer.opt_state[0].mu["output"]["kernel"].get_value()
  old_embed = model.embed.kernel.get_value()
  step(model, optimizer)
  assert old_kernel.is_deleted() and old_mu.is_deleted() and old_embed.is_deleted()
  new_kernel = model.output.kernel.get_value()
  assert new_kernel.unsafe_buffer_pointer() == pointer      # the step wrote into it
  after = np.asarray(new_kernel)
  # the same first step with nnx.Optimizer and dense gradients (Adam from zero state leaves
  # zero-gradient rows exactly as they were): the expected model
  reference = make_model()
  np.testing.assert_array_equal(np.asarray(reference.output.kernel[...]), before)
  dense_optimizer = nnx.Optimizer(reference, optax.adam(1e-2), wrt=nnx.Param)
  _, dense_grads = nnx.value_and_grad(loss_fn)(reference)
  dense_optimizer.update(reference, dense_grads)
  want = np.asarray(reference.output.kernel[...])
  touched = np.any(want != before, axis=1)
  assert 0 < touched.sum() < num_labels
  np.testing.assert_array_equal(after[~touched], before[~touched])   # bit-identical
  np.testing.assert_allclose(after[touched], want[touched], rtol=1e-5, atol=1e-7)
  assert np.all(np.any(after[touched] != before[touched], axis=1))
  assert int(optimizer.step[...]) == 1


def test_rejects_mismatched_rows():
  with pytest.raises(ValueError, match="leading"):
    optim.row_sparse(optax.adam(1e-3)).init({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})


@pytest.mark.parametrize("num_rows", [50, 100_000])     # mark-array path, sort path
def test_sum_duplicate_rows_matches_numpy_on_both_paths(num_rows):
  rng = np.random.default_rng(num_rows)
  ids = rng.integers(-3, min(num_rows, 40) + 3, size=300).astype(np.int32)
  grads = rng.normal(size=(300, 4)).astype(np.float32)
  uids, summed = jax.jit(lambda i, g: optim.sum_duplicate_rows(i, g, num_rows))(
      jnp.asarray(ids), jnp.asarray(grads))
  uids, summed = np.asarray(uids), np.asarray(summed)
  valid = (ids >= 0) & (ids < num_rows)
  expected = {int(i): grads[valid & (ids == i)].sum(axis=0) for i in np.unique(ids[valid])}
  assert list(uids[:len(expected)]) == sorted(expected)          # sorted unique ids first
  assert np.all(uids[len(expected):] == num_rows)                 # then padding
  for row, i in enumerate(uids[:len(expected)]):
    np.testing.assert_allclose(summed[row], expected[int(i)], rtol=1e-5, atol=1e-6)
  assert np.all(summed[len(expected):] == 0)
