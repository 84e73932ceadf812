"""Row-sparse optimizer: equal to the dense optax update on touched rows, others untouched."""
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


def test_jit_with_donation_keeps_shapes():
  params = _params(jax.random.key(2), num_rows=1000, width=8)
  tx = optim.row_sparse(optax.adam(1e-3))
  state = tx.init(params)

  @jax.jit
  def step(params, state, ids, g):
    upd, uids, state = tx.update(g, state, params, row_ids=ids)
    return optim.apply_row_updates(params, uids, upd), state

  step = jax.jit(step.__wrapped__ if hasattr(step, "__wrapped__") else step, donate_argnums=(0, 1))
  ids = jnp.array([1, 2, 3], jnp.int32)
  g = {"kernel": jnp.ones((3, 8)), "bias": jnp.ones((3,))}
  new_params, state = step(params, state, ids, g)
  assert new_params["kernel"].shape == (1000, 8)


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
