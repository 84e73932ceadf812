"""Negative samplers (uniform, unigram, LSH mixtures), their loss correction, the selection
probe and the sampler command-line options."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slidejax import lsh
from slidejax import nn
from slidejax.cli import main as cli_main


def _layer(num, m, *, mode="shared", hidden=8, **options):
  return nn.SlideDense(hidden, num, num_active=m, mode=mode, l=4, rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_uniform_sampler_has_no_tables_and_draws_every_id_alike(mode):
  num, m, batch = 50, 10, 4
  layer = _layer(num, m, mode=mode, sampler="uniform")
  assert layer.tables is None and not layer.uses_tables
  layer.rebuild(jax.random.key(0))        # a no-op, not an error
  labels = jnp.array([[0, -1], [1, 1], [2, -1], [0, 3]], jnp.int32)
  h = jnp.ones((batch, 8), jnp.float32)
  counts = np.zeros(num)
  select = jax.jit(lambda key: layer(h, labels=labels, key=key))
  for i in range(300):
    out = select(jax.random.key(i))
    assert out.logit_correction is None
    ids = np.asarray(out.ids).reshape(-1, m) if mode == "per_sample" else np.asarray(out.ids)[None]
    slots = np.asarray(out.label_slots)
    for b in range(batch):
      row = ids[min(b, len(ids) - 1)]
      for j, y in enumerate(np.asarray(labels)[b]):
        if y >= 0:
          assert row[slots[b, j]] == y
    for row in ids:
      np.add.at(counts, row, 1)
  negatives = counts[4:]                   # ids 0..3 are labels (always in)
  expected = negatives.mean()
  # every non-label id drawn about equally often: a chi-square-like bound
  assert np.all(np.abs(negatives - expected) < 6 * np.sqrt(expected))


def test_unigram_sampler_follows_label_frequency_and_corrects_logits():
  num, m = 200, 16
  counts = np.zeros(num, np.float32)
  counts[:10] = 1000.0                     # ten frequent labels
  layer = _layer(num, m, sampler="unigram", label_counts=counts)
  assert layer.tables is None
  h = jax.random.normal(jax.random.key(1), (4, 8), jnp.float32)
  labels = jnp.array([[150], [151], [-1], [152]], jnp.int32)
  seen = np.zeros(num)
  for i in range(200):
    out = layer(h, labels=labels, key=jax.random.key(i))
    seen[np.asarray(out.ids)] += 1
  weights = (counts + 1.0) ** 0.75
  q = weights / weights.sum()
  # a frequent id is in a set as often as m draws predict; a rare one almost never
  predicted = 200 * (1.0 - (1.0 - q[0]) ** m)
  assert abs(seen[:10].mean() - predicted) < 0.06 * predicted
  assert seen[20:150].mean() < 0.1 * predicted
  corr = np.asarray(out.logit_correction)
  ids = np.asarray(out.ids)
  is_label = np.isin(ids, [150, 151, 152])
  np.testing.assert_array_equal(corr[is_label], 0.0)
  expected = np.log(1.0 - (1.0 - q[ids[~is_label]]) ** m)
  np.testing.assert_allclose(corr[~is_label], expected, rtol=2e-4, atol=1e-5)
  # the loss subtracts the correction: equal to the plain loss over corrected logits
  want = nn.softmax_cross_entropy(out.logits - out.logit_correction, out.label_slots)
  np.testing.assert_allclose(nn.sampled_softmax_loss(out), want, rtol=1e-6)
  assert not np.isclose(float(nn.sampled_softmax_loss(out)),
                        float(nn.softmax_cross_entropy(out.logits, out.label_slots)))


def test_sampler_arguments_are_checked():
  with pytest.raises(ValueError, match="sampler"):
    _layer(20, 4, sampler="random")
  with pytest.raises(ValueError, match="label_counts"):
    _layer(20, 4, sampler="unigram")
  with pytest.raises(ValueError, match="shape"):
    _layer(20, 4, sampler="unigram", label_counts=np.ones(19))
  with pytest.raises(ValueError, match="uniform_share"):
    _layer(20, 4, uniform_share=1.5)


@functools.partial(jax.jit, static_argnames=("shared", "policy", "share", "backend", "m"))
def _select(cands, forced, key, *, shared, policy, share, backend, m):
  pick = lsh.select_shared if shared else lsh.select
  return pick(cands, num_active=m, num_neurons=10_000, key=key, policy=policy,
              forced_ids=forced, backend=backend, uniform_share=share)


@pytest.mark.parametrize("backend", lsh.BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
def test_uniform_share_keeps_that_share_for_random_ids(backend, shared):
  """Candidates 0..999 (ten times more than the room): with share s, (1 - s) of the room goes
  to candidates and the rest to uniform ids, which hit a candidate 10% of the time."""
  rng = np.random.default_rng(0)
  cands = jnp.asarray(rng.permutation(1000).reshape(2, 5, 100).astype(np.int32))
  forced = jnp.full((2, 1), -1, jnp.int32)
  for share, low, high in ((0.0, 200, 200), (0.5, 100, 135), (1.0, 0, 45)):
    out = _select(cands, forced, jax.random.key(3), shared=shared, policy="vanilla",
                  share=share, backend=backend, m=200)
    ids = np.asarray(out.ids).reshape(-1, 200)
    for row in ids:
      assert np.unique(row).size == 200
      assert low <= np.sum(row < 1000) <= high, (share, np.sum(row < 1000))


@pytest.mark.parametrize("backend", lsh.BACKENDS)
def test_sample_topk_keeps_each_samples_best_candidate(backend):
  """Eight samples, each with a favourite id found in all of its tables among 600 ids found
  once: a shared set with room for 16 holds every favourite under sample_topk (the union of
  vanilla would hold few of them)."""
  batch, l, c = 8, 6, 100
  rng = np.random.default_rng(1)
  cands = rng.permutation(np.arange(100, 100 + batch * l * c)).reshape(batch, l, c)
  cands[:, :, 0] = np.arange(batch)[:, None]           # favourite of sample b: id b
  cands = jnp.asarray(cands.astype(np.int32))
  forced = jnp.full((batch, 1), -1, jnp.int32)
  for key in range(5):
    out = _select(cands, forced, jax.random.key(key), shared=True, policy="sample_topk",
                  share=0.0, backend=backend, m=16)
    assert set(range(batch)) <= set(np.asarray(out.ids).tolist())
  vanilla = _select(cands, forced, jax.random.key(0), shared=True, policy="vanilla",
                    share=0.0, backend=backend, m=16)
  assert len(set(range(batch)) & set(np.asarray(vanilla.ids).tolist())) < batch


def test_probe_numbers_follow_their_definitions():
  num, batch = 300, 8
  h = jax.random.uniform(jax.random.key(0), (batch, 8), jnp.float32)
  labels = jnp.full((batch, 1), -1, jnp.int32)
  full = _layer(num, num)                   # every neuron active: recall 1
  probe = nn.selection_probe(full, h, labels, jax.random.key(1))
  assert probe["recall@10"] == 1.0 and probe["recall@100"] == 1.0
  uniform = _layer(num, 30, sampler="uniform")   # 10% of the neurons: recall about 0.1
  recalls = [nn.selection_probe(uniform, h, labels, jax.random.key(i))["recall@100"]
             for i in range(10)]
  assert 0.05 < np.mean(recalls) < 0.15
  assert nn.selection_probe(uniform, h, labels, jax.random.key(0))["table_share"] == 0.0
  # identical rows: every neuron lands in one bucket of each table
  collapsed = nn.SlideDense(8, num, num_active=30, l=4, rngs=nnx.Rngs(0),
                            kernel_init=lambda key, shape, dtype: jnp.ones(shape, dtype))
  probe = nn.selection_probe(collapsed, h, labels, jax.random.key(0))
  assert probe["largest_bucket_share"] == 1.0
  assert probe["bucket_occupancy"] == pytest.approx(1.0 / collapsed.tables.num_buckets)
  # selected negatives of a layer whose top logits are known: the top-100 ids have row +1,
  # the rest -1; LSH (centered, topk) finds the high ones, uniform draws do not
  rows = -np.ones((num, 8), np.float32)
  rows[:100] = 1.0
  biased = nn.SlideDense(8, num, num_active=100, l=8, transform="center", policy="topk",
                         uniform_share=0.0,
                         rngs=nnx.Rngs(0),
                         kernel_init=lambda key, shape, dtype: jnp.asarray(rows))
  probe = nn.selection_probe(biased, h, labels, jax.random.key(0))
  assert probe["negative_logit"] > probe["uniform_logit"]
  assert probe["recall@100"] > 0.9 and probe["table_share"] > 0.9


def test_center_hashes_rows_minus_their_mean():
  rows = np.ones((64, 8), np.float32) + 0.01 * np.random.default_rng(0).normal(size=(64, 8))
  init = lambda key, shape, dtype: jnp.asarray(rows, dtype)  # noqa: E731
  plain = nn.SlideDense(8, 64, num_active=8, l=8, range_bits=4, rngs=nnx.Rngs(0),
                        kernel_init=init)
  centered = nn.SlideDense(8, 64, num_active=8, l=8, range_bits=4, transform="center",
                           rngs=nnx.Rngs(0), kernel_init=init)
  share = lambda layer: float(np.max(np.asarray(layer.tables.counts))) / 64  # noqa: E731
  assert share(plain) == 1.0            # rows all point one way: one bucket per table
  assert share(centered) < 0.35         # 16 buckets: about 1/16 each


@pytest.mark.parametrize("flags", [["--sampler", "uniform", "--l", "8"],
                                   ["--sampler", "unigram", "--policy", "topk"],
                                   ["--sampler", "uniform", "--transform", "mips"]])
def test_cli_refuses_hash_options_without_lsh(flags, capsys):
  code = cli_main(["train", "--no-progress", *flags])
  assert code == 2
  err = capsys.readouterr().err
  assert "need --sampler lsh" in err and "Traceback" not in err


@pytest.mark.parametrize("sampler", ["lsh", "uniform"])
@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_logq_correction_weights_the_random_fill_by_its_inclusion(sampler, mode):
  """The fill is a uniform draw of (valid - num_fixed) ids from the N - num_fixed neurons not
  fixed: its columns carry log(that ratio), the fixed columns 0."""
  num, m, batch = 400, 40, 3
  options = dict(uniform_share=0.5) if sampler == "lsh" else {}
  layer = _layer(num, m, mode=mode, sampler=sampler, correction="logq", **options)
  h = jax.random.normal(jax.random.key(0), (batch, 8), jnp.float32)
  labels = jnp.array([[1, 2], [3, -1], [5, 5]], jnp.int32)
  out = layer(h, labels=labels, key=jax.random.key(1))
  active = layer.select(h, labels=labels, key=jax.random.key(1))
  corr = np.asarray(out.logit_correction).reshape(-1, m)
  fixed = np.asarray(active.num_fixed).reshape(-1)
  for row, f in zip(corr, fixed):
    assert 0 < f < m
    np.testing.assert_array_equal(row[:f], 0.0)
    np.testing.assert_allclose(row[f:], np.log((m - f) / (num - f)), rtol=1e-6)
  slots = np.asarray(out.label_slots)
  assert (slots[slots >= 0] < fixed.min()).all()     # labels sit in the fixed part
  plain = _layer(num, m, mode=mode, sampler=sampler, **options)
  assert plain(h, labels=labels, key=jax.random.key(1)).logit_correction is None


@pytest.mark.parametrize("backend", lsh.BACKENDS)
def test_in_batch_negatives_put_the_batch_labels_in_every_row(backend):
  num, m = 5000, 64
  layer = _layer(num, m, mode="per_sample", sampler="uniform", backend=backend)
  labels = jnp.array([[10, 11], [12, -1], [13, 10], [4000, -1]], jnp.int32)
  h = jnp.ones((4, 8), jnp.float32)
  out = layer(h, labels=labels, key=jax.random.key(0))
  for b, row in enumerate(np.asarray(out.ids)):
    assert {10, 11, 12, 13, 4000} <= set(row.tolist())
    for j, y in enumerate(np.asarray(labels)[b]):   # own labels still at their loss slots
      if y >= 0:
        assert row[np.asarray(out.label_slots)[b, j]] == y
  without = _layer(num, m, mode="per_sample", sampler="uniform", backend=backend,
                   in_batch_negatives=False)
  rows = np.asarray(without(h, labels=labels, key=jax.random.key(0)).ids)
  assert not all({10, 11, 12, 13, 4000} <= set(r.tolist()) for r in rows)


def test_mips_transform_turns_logits_into_angles():
  """Hashed rows have unit norm and their inner product with the hashed query is the logit
  over a constant: the angle SimHash sees ranks neurons by logit."""
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0.1, 3, size=(50, 1))
  layer = nn.SlideDense(8, 50, num_active=8, l=4, transform="mips", rngs=nnx.Rngs(0),
                        kernel_init=lambda key, shape, dtype: jnp.asarray(rows, dtype))
  layer.bias.set_value(jnp.asarray(rng.normal(size=50), jnp.float32))
  hashed = np.asarray(layer._hashed_rows())
  assert hashed.shape == (50, 10) and layer.family.dim == 10
  np.testing.assert_allclose(np.linalg.norm(hashed, axis=1), 1.0, rtol=1e-5)
  q = rng.normal(size=(3, 8)).astype(np.float32)
  logits = q @ rows.T + np.asarray(layer.bias[...])
  q_hashed = np.concatenate([q, np.ones((3, 1)), np.zeros((3, 1))], axis=1)
  ratio = (q_hashed @ hashed.T) / logits
  np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-4)   # one positive constant
  assert ratio[0, 0] > 0
  codes = layer.hash_codes(jnp.asarray(q))
  assert codes.shape == (3, 4)


def test_sigmoid_loss_is_binary_cross_entropy_over_the_active_set(strict_promotion):
  logits = jnp.array([[2.0, -1.0, 0.5, nn.PAD_LOGIT], [0.0, 1.0, -2.0, nn.PAD_LOGIT]],
                     jnp.float32)
  out = nn.SlideOutput(logits, jnp.array([3, 7, 9, 20], jnp.int32),
                       jnp.array([True, True, True, False]),
                       jnp.array([[0, -1], [2, 2]], jnp.int32), jnp.zeros((), jnp.int32))
  def bce(x, y):
    return np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x))
  row0 = bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)
  row1 = bce(0.0, 0) + bce(1.0, 0) + bce(-2.0, 1)
  np.testing.assert_allclose(nn.sampled_sigmoid_loss(out), (row0 + row1) / 2, rtol=1e-6)
  weight = jnp.array([1.0, 0.0], jnp.float32)          # a padding row does not count
  np.testing.assert_allclose(nn.sampled_sigmoid_loss(out, weight), row0, rtol=1e-6)
