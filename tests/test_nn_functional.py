"""Sparse layer math against dense references: with every neuron active they must agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slidejax import nn

B, H, N, F = 6, 8, 30, 5


def _setup(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  h = jax.random.normal(ks[0], (B, H))
  w = jax.random.normal(ks[1], (N, H))
  b = jax.random.normal(ks[2], (N,))
  labels = jnp.array([[1, 4, -1], [0, -1, -1], [29, 3, 7], [-1, -1, -1], [5, 5, -1],
                      [10, 11, 12]], jnp.int32)
  return h, w, b, labels


def _dense_loss(h, w, b, labels):
  return nn.dense_softmax_loss(h @ w.T + b, labels)


def test_dense_loss_matches_reference(strict_promotion):
  h, w, b, labels = _setup()
  logits = np.asarray(h @ w.T + b, np.float64)
  total, count = 0.0, 0
  for i in range(B):
    ys = [int(y) for y in labels[i] if y >= 0]
    if not ys:
      continue
    logz = np.log(np.sum(np.exp(logits[i] - logits[i].max()))) + logits[i].max()
    total += sum((logz - logits[i, y]) / len(ys) for y in ys)
    count += 1
  np.testing.assert_allclose(float(_dense_loss(h, w, b, labels)), total / count, rtol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_all_neurons_active_equals_dense(mode, strict_promotion):
  h, w, b, labels = _setup(1)
  perm = jax.random.permutation(jax.random.key(7), N).astype(jnp.int32)

  def sparse_loss(h, w, b):
    if mode == "shared":
      ids = perm
      slots = nn.shared_label_slots(ids, labels)
      logits = nn.shared_logits(h, nn.gather_rows(w, ids), nn.gather_rows(b, ids))
    else:
      ids = jnp.stack([jnp.roll(perm, i) for i in range(B)])
      slots = nn.per_sample_label_slots(ids, labels)
      logits = nn.per_sample_logits(h, nn.gather_rows(w, ids), nn.gather_rows(b, ids))
    return nn.softmax_cross_entropy(logits, slots), logits, ids

  (loss_s, (logits_s, ids)), = [(sparse_loss(h, w, b)[0], sparse_loss(h, w, b)[1:])]
  dense_logits = h @ w.T + b
  if mode == "shared":
    np.testing.assert_allclose(logits_s, dense_logits[:, ids], rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_allclose(logits_s, jnp.take_along_axis(dense_logits, ids, 1),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_s, _dense_loss(h, w, b, labels), rtol=1e-5)
  gs = jax.grad(lambda *a: sparse_loss(*a)[0], argnums=(0, 1, 2))(h, w, b)
  gd = jax.grad(_dense_loss, argnums=(0, 1, 2))(h, w, b, labels)
  for a, d in zip(gs, gd):
    np.testing.assert_allclose(a, d, rtol=1e-4, atol=1e-6)


def test_padding_slots_do_not_count(strict_promotion):
  h, w, b, labels = _setup(2)
  ids = jnp.concatenate([jnp.arange(N, dtype=jnp.int32), jnp.full((4,), N, jnp.int32)])
  valid = ids < N
  logits = nn.shared_logits(h, nn.gather_rows(w, ids), nn.gather_rows(b, ids), valid)
  slots = nn.shared_label_slots(ids, labels)
  np.testing.assert_allclose(nn.softmax_cross_entropy(logits, slots),
                             _dense_loss(h, w, b, labels), rtol=1e-5)
  assert np.all(np.asarray(logits[:, N:]) < -1e8)


def test_embedding_bag_matches_dense_and_grad_is_row_sparse(strict_promotion):
  ks = jax.random.split(jax.random.key(3), 3)
  d = 50
  table = jax.random.normal(ks[0], (d, H))
  ids = jax.random.randint(ks[1], (B, F), 0, d).astype(jnp.int32)
  values = jnp.where(jnp.arange(F) < 3, jax.random.uniform(ks[2], (B, F)), 0.0)
  dense_x = jnp.zeros((B, d)).at[jnp.arange(B)[:, None], ids].add(values)
  np.testing.assert_allclose(nn.embedding_bag(nn.gather_rows(table, ids), values),
                             dense_x @ table, rtol=1e-5, atol=1e-5)
  g_rows = jax.grad(lambda r: jnp.sum(nn.embedding_bag(r, values) ** 2))(
      nn.gather_rows(table, ids))
  g_dense = jax.grad(lambda t: jnp.sum((dense_x @ t) ** 2))(table)
  rebuilt = jnp.zeros_like(table).at[ids.reshape(-1)].add(g_rows.reshape(-1, H))
  np.testing.assert_allclose(rebuilt, g_dense, rtol=1e-4, atol=1e-5)


def test_top_k_chunked_is_exact(strict_promotion):
  h, w, b, _ = _setup(4)
  scores, ids = nn.top_k_chunked(h, w, b, k=5, chunk_size=7)
  ref_scores, ref_ids = jax.lax.top_k(h @ w.T + b, 5)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_target_distribution_spreads_mass(strict_promotion):
  t = nn.target_distribution(jnp.array([[0, 2, -1], [-1, -1, -1]], jnp.int32), 4)
  np.testing.assert_allclose(t, [[0.5, 0, 0.5, 0], [0, 0, 0, 0]])


def test_unique_with_inverse(strict_promotion):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 20, 50), jnp.int32)
  unique, inverse = nn.unique_with_inverse(ids, 25, 20)
  ref = np.unique(np.asarray(ids))
  np.testing.assert_array_equal(unique[:len(ref)], ref)
  assert np.all(np.asarray(unique[len(ref):]) == 20)
  np.testing.assert_array_equal(unique[inverse], ids)
  # More distinct ids than room: the largest are dropped, their inverse is out of range.
  unique, inverse = nn.unique_with_inverse(jnp.array([5, 1, 9, 1, 7], jnp.int32), 2, 99)
  np.testing.assert_array_equal(unique, [1, 5])
  np.testing.assert_array_equal(inverse, [1, 0, 2, 0, 2])


def test_row_chunked_init_fills_every_row_with_the_right_distribution(strict_promotion):
  from flax import nnx
  rows, width, chunk = 2600, 64, 1000       # three blocks, the last overlapping the second
  init = nn.row_chunked(nnx.initializers.normal(stddev=0.5), chunk_rows=chunk)
  w = np.asarray(init(jax.random.key(0), (rows, width)))
  assert w.shape == (rows, width) and w.dtype == np.float32
  assert np.all(np.abs(w).sum(axis=1) > 0)                 # no row left at zero
  assert abs(w.std() - 0.5) < 0.01 and abs(w.mean()) < 0.01
  assert not np.allclose(w[:chunk], w[chunk:2 * chunk])    # blocks draw different keys
  # lecun_rows: the distribution nnx.initializers.lecun_normal() gives the whole shape.
  ref = np.asarray(nnx.initializers.lecun_normal()(jax.random.key(1), (rows, width)))
  ours = np.asarray(nn.lecun_rows(rows, chunk_rows=chunk)(jax.random.key(1), (rows, width)))
  assert abs(ours.std() / ref.std() - 1) < 0.02
  assert abs(np.abs(ours).max() / np.abs(ref).max() - 1) < 0.05   # same truncation
