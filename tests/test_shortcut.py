"""``LabelShortcut``: links and shares counted as the data say, logits equal to a NumPy
reference in every mode (dense, shared, per-sample, exact and LSH top-k), the scale trained by
the public step as by nnx, and links, shares and scale kept by save/load and ``fit``."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slidejax
from slidejax import data
from slidejax import nn
from slidejax import train
from slidejax.train import _plan

FEATURES, LABELS, H, P, B, WIDTH = 200, 150, 12, 6, 16, 10


@pytest.fixture(scope="module")
def dataset():
  return data.synthesize(num_points=1500, num_features=FEATURES, num_labels=LABELS, seed=3)


@pytest.fixture(scope="module")
def batch(dataset):
  return next(iter(data.iterate_batches(dataset, B, max_features=WIDTH, max_labels=4, seed=0)))


def _reference_links(d, per_feature):
  """(links, shares) counted row by row."""
  counts = np.zeros((d.num_features, d.num_labels), np.int64)
  for r in range(d.num_points):
    feats = d.feature_ids[d.feature_indptr[r]:d.feature_indptr[r + 1]]
    labs = d.label_ids[d.label_indptr[r]:d.label_indptr[r + 1]]
    counts[np.ix_(feats, labs)] += 1
  rows_with = np.bincount(d.feature_ids, minlength=d.num_features)
  out = np.full((d.num_features, per_feature), -1, np.int32)
  shares = np.zeros((d.num_features, per_feature), np.float32)
  for f in range(d.num_features):
    order = sorted(np.nonzero(counts[f])[0], key=lambda lab: (-counts[f, lab], lab))
    out[f, :len(order[:per_feature])] = order[:per_feature]
    shares[f, :len(order[:per_feature])] = counts[f, order[:per_feature]] / (rows_with[f] + 1)
  return out, shares


def test_label_links_are_each_features_most_frequent_labels(dataset):
  for rows, per_feature in ((dataset.num_points, P), (20, 12)):   # full, and short of labels
    part = data.subset(dataset, np.arange(rows))
    links, shares = data.label_links(part, per_feature)
    expected_links, expected_shares = _reference_links(part, per_feature)
    np.testing.assert_array_equal(links, expected_links)
    np.testing.assert_allclose(shares, expected_shares, rtol=1e-6)
  assert (links == -1).any() and (links >= 0).any()   # both kinds of slot are exercised
  with pytest.raises(ValueError, match="per_feature"):
    data.label_links(dataset, 0)


def _models(dataset, seed=0):
  """A DenseMLP, a dense-mode, a shared-mode and a per-sample SlideMLP with the same weights
  and shortcut (its scale moved off the initial value)."""
  links = data.label_links(dataset, P)
  dense = nn.DenseMLP(FEATURES, LABELS, hidden=H, shortcut=P, links=links, rngs=nnx.Rngs(seed))
  dense.shortcut.log_scale.set_value(jnp.asarray(0.09, jnp.float32))
  models = {"dense_mlp": dense}
  for mode, active in (("dense", LABELS), ("shared", 48), ("per_sample", 24)):
    m = nn.SlideMLP(FEATURES, LABELS, hidden=H, num_active=active, mode=mode, l=4,
                    shortcut=P, links=links, rngs=nnx.Rngs(seed))
    m.embed.kernel.set_value(dense.embed.kernel[...])
    m.output.kernel.set_value(dense.kernel[...])
    m.output.bias.set_value(jax.random.normal(jax.random.key(seed + 2), (LABELS,)))
    m.shortcut.log_scale.set_value(dense.shortcut.log_scale[...])
    if m.output.uses_tables:
      nn.rebuild_tables(m, jax.random.key(seed + 3))
    models[mode] = m
  dense.bias.set_value(models["dense"].output.bias[...])
  return models


def _reference_logits(model, batch):
  """NumPy: h @ W.T + b, plus scale * value * share for each (feature, linked label)."""
  h = np.asarray(model.hidden(batch.feature_ids, batch.feature_values))
  kernel, bias = ((model.kernel, model.bias) if isinstance(model, nn.DenseMLP)
                  else (model.output.kernel, model.output.bias))
  logits = h @ np.asarray(kernel[...]).T + np.asarray(bias[...])
  links = np.asarray(model.shortcut.links[...])
  scale = model.shortcut.INITIAL_SCALE * np.exp(model.shortcut.SCALE_GAIN
                                                * float(model.shortcut.log_scale[...]))
  weights = scale * np.asarray(model.shortcut.shares[...])
  for i in range(batch.feature_ids.shape[0]):
    for f, v in zip(batch.feature_ids[i], batch.feature_values[i]):
      if v != 0:
        for p in range(P):
          if links[f, p] >= 0:
            logits[i, links[f, p]] += v * weights[f, p]
  return logits


def test_logits_equal_the_reference_in_every_mode(dataset, batch, strict_promotion):
  models = _models(dataset)
  ref = _reference_logits(models["dense_mlp"], batch)
  without = _reference_logits(models["dense_mlp"], batch._replace(
      feature_values=np.zeros_like(batch.feature_values)))
  assert np.abs(ref - without).max() > 0.1   # the shortcut moves these logits
  key = jax.random.key(7)
  np.testing.assert_allclose(models["dense_mlp"](batch.feature_ids, batch.feature_values),
                             ref, rtol=1e-5, atol=1e-5)
  for mode in ("dense", "shared", "per_sample"):
    out = models[mode](batch.feature_ids, batch.feature_values, labels=batch.label_ids, key=key)
    ids, valid = np.asarray(out.ids), np.asarray(out.valid)
    if ids.ndim == 1:
      ids, valid = np.broadcast_to(ids, (B, ids.size)), np.broadcast_to(valid, (B, ids.size))
    expected = np.take_along_axis(ref, np.where(valid, ids, 0), axis=1)
    got = np.asarray(out.logits)
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, expected, 0),
                               rtol=1e-5, atol=1e-5, err_msg=mode)
    assert (got[~valid] <= nn.PAD_LOGIT / 2).all(), mode   # padding untouched


def test_top_k_exact_and_through_the_tables(dataset, batch):
  models = _models(dataset)
  ref = _reference_logits(models["dense_mlp"], batch)
  best = np.argsort(-ref, axis=1, kind="stable")[:, :5]
  for name in ("dense_mlp", "dense", "shared"):
    scores, ids = models[name].top_k(batch.feature_ids, batch.feature_values, 5)
    np.testing.assert_array_equal(ids, best, err_msg=name)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, best, 1), rtol=1e-5, atol=1e-5)
  # through the tables: the linked labels are candidates too, scored with the shortcut
  model = models["shared"]
  links = np.asarray(model.shortcut.links[...])
  first_feature = batch.feature_ids[0][batch.feature_values[0] != 0][0]
  target = int(links[first_feature][links[first_feature] >= 0][-1])
  slot = int(np.nonzero(links[first_feature] == target)[0][0])
  model.shortcut.shares.set_value(model.shortcut.shares[...].at[first_feature, slot].set(1e4))
  ref = _reference_logits(model, batch)
  scores, ids = model.top_k(batch.feature_ids, batch.feature_values, 5, exact=False)
  assert int(ids[0, 0]) == target
  found = np.asarray(ids) < LABELS
  np.testing.assert_allclose(np.asarray(scores)[found],
                             np.take_along_axis(ref, np.asarray(ids).clip(0, LABELS - 1),
                                                1)[found], rtol=1e-5, atol=1e-2)


def test_the_public_step_learns_the_scale_as_nnx_would(dataset, batch):
  model = _models(dataset)["shared"]

  def loss_fn(m):
    return nn.sampled_softmax_loss(m(batch.feature_ids, batch.feature_values,
                                     labels=batch.label_ids, key=jax.random.key(1)))

  loss, grads = slidejax.value_and_grad(loss_fn)(model)
  dense_loss, dense_grads = nnx.value_and_grad(loss_fn)(model)
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
  expected = float(dense_grads["shortcut"]["log_scale"][...])
  assert expected != 0
  np.testing.assert_allclose(grads["shortcut"]["log_scale"][...], expected, rtol=1e-5)
  before = float(model.shortcut.log_scale[...])
  slidejax.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param).update(model, grads)
  np.testing.assert_allclose(model.shortcut.log_scale[...], before - 0.5 * expected,
                             rtol=1e-6)
  assert "links" not in grads["shortcut"] and "shares" not in grads["shortcut"]   # fixed


def test_save_and_load_keep_links_and_scale(dataset, batch, tmp_path):
  for name, model in _models(dataset).items():
    if name == "per_sample":
      continue
    slidejax.save(model, tmp_path / name)
    loaded = slidejax.load(tmp_path / name)
    np.testing.assert_array_equal(loaded.shortcut.links[...], model.shortcut.links[...])
    np.testing.assert_array_equal(loaded.shortcut.shares[...], model.shortcut.shares[...])
    assert float(loaded.shortcut.log_scale[...]) == float(model.shortcut.log_scale[...])
    np.testing.assert_array_equal(loaded.top_k(batch.feature_ids, batch.feature_values, 5)[1],
                                  model.top_k(batch.feature_ids, batch.feature_values, 5)[1])


def test_bad_links_and_options_are_refused(dataset):
  links = data.label_links(dataset, P)
  with pytest.raises(ValueError, match="shape"):
    nn.DenseMLP(FEATURES, LABELS, shortcut=P + 1, links=links, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="link ids"):
    nn.DenseMLP(FEATURES, LABELS, shortcut=P, links=(links[0] + LABELS, links[1]),
                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="finite"):
    nn.DenseMLP(FEATURES, LABELS, shortcut=P, links=(links[0], links[1] * np.nan),
                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one block"):
    nn.SlideMLP(FEATURES, LABELS, num_active=32, shards=2, shortcut=P, rngs=nnx.Rngs(0))
  with pytest.raises(train.TrainingError, match="shortcut"):
    train.fit(train.TrainConfig(shortcut=-1), dataset)
  with pytest.raises(train.TrainingError, match="shortcut"):
    train.fit(train.TrainConfig(shortcut=4, mesh="data=1,model=2", num_active=32), dataset)


def test_fit_links_the_training_part_only_and_trains_the_path(dataset):
  config = train.TrainConfig(shortcut=P, hidden=16, num_active=32, epochs=2, validation=0.2,
                             calibrate="none")
  result = train.fit(config, dataset, progress=False, log=lambda _: None)
  model = result["model"]
  held_rows = _plan.validation_rows(dataset.num_points, 0.2)
  part, held = _plan.split_validation(dataset, held_rows, config.seed)
  links, shares = data.label_links(part, P)
  np.testing.assert_array_equal(model.shortcut.links[...], links)
  np.testing.assert_array_equal(model.shortcut.shares[...], shares)
  assert not np.array_equal(shares, data.label_links(dataset, P)[1])
  assert float(model.shortcut.log_scale[...]) != 0
