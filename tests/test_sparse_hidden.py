"""A SlideDense as a HIDDEN layer (issue #11, point 3), trained on the public path: its active
neurons' ReLU activations feed a SparseInput over the hidden neurons (examples/sparse_hidden.py).

(a) ``slidejax.value_and_grad`` of the whole network equals ``nnx.value_and_grad`` on the rows
each of the three row layers gathered, and on the dense parameters; (b) the example trains
the sparse network and its dense twin, both far above the label-popularity baseline, the
sparse one close to the dense one.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import slidejax
from slidejax import data as xcdata
from slidejax import metrics
from slidejax import nn

N, WIDTH, FEATURES, LABELS, B, F = 512, 16, 300, 40, 8, 6


def _batch(seed=0):
  """ids int32 [B, F], values float32 [B, F] (row 0 half padding), labels int32 [B, 2]."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, FEATURES, (B, F)).astype(np.int32)
  values = rng.random((B, F)).astype(np.float32)
  values[0, F // 2:] = 0.0
  labels = rng.integers(0, LABELS, (B, 2)).astype(np.int32)
  labels[1, 1] = -1
  return ids, values, labels


def _scatter(row_grad, num_rows):
  """The dense ``[num_rows, ...]`` array of a RowGrad; checks its ids and padding rows."""
  ids, rows = np.asarray(row_grad.ids), np.asarray(row_grad.rows)
  keep = ids < num_rows
  assert len(np.unique(ids[keep])) == keep.sum(), "row ids must be unique"
  np.testing.assert_array_equal(rows[~keep], 0)
  full = np.zeros((num_rows,) + rows.shape[1:], rows.dtype)
  full[ids[keep]] = rows[keep]
  return full, set(ids[keep].tolist())


@pytest.mark.parametrize("num_active", [N, N // 4])
def test_row_gradients_of_the_sparse_hidden_network_equal_dense_ones(num_active, example):
  """With every hidden neuron active (and with a quarter of them, the same key for both),
  the row-sparse gradients of embed, the hidden SlideDense and the SparseInput after it
  equal nnx's dense gradients on their rows, and the dense parameters' gradients agree."""
  sh = example("sparse_hidden")
  model = sh.SparseHiddenNet(FEATURES, LABELS, hidden_neurons=N, num_active=num_active,
                             width=WIDTH, l=4, rngs=nnx.Rngs(0))
  ids, values, labels = _batch()
  key = jax.random.key(7)

  def loss_fn(m):
    return nn.dense_softmax_loss(m(ids, values, key=key), labels)

  loss, grads = slidejax.value_and_grad(loss_fn)(model)
  dense_loss, dense = nnx.value_and_grad(loss_fn)(model)
  np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
  covered = {}
  for layer, num_rows in (("embed", FEATURES), ("wide", N), ("gather", N)):
    row = grads[layer]["kernel"].get_value()
    assert isinstance(row, slidejax.RowGrad), (layer, type(row))
    got, covered[layer] = _scatter(row, num_rows)
    want = np.asarray(dense[layer]["kernel"][...])
    assert np.abs(want).max() > 0, layer   # a gradient reaches every row layer
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=layer)
  # the hidden bias is a RowParam too; the SparseInputs' biases and the output are dense
  bias = grads["wide"]["bias"].get_value()
  assert isinstance(bias, slidejax.RowGrad)
  got, _ = _scatter(bias, N)
  np.testing.assert_allclose(got, dense["wide"]["bias"][...], rtol=1e-4, atol=1e-7)
  for layer, name in (("embed", "bias"), ("gather", "bias"), ("out", "kernel"),
                      ("out", "bias")):
    got = grads[layer][name].get_value()
    assert not isinstance(got, slidejax.RowGrad), (layer, name)
    np.testing.assert_allclose(got, dense[layer][name][...], rtol=1e-4, atol=1e-7,
                               err_msg=f"{layer}.{name}")
  # the rows: the hidden layer's active set, and of it what the next layer read
  active = np.asarray(model.wide(jax.nn.relu(model.embed(ids, values)), key=key).ids)
  active = set(active[active < N].tolist())
  assert len(covered["wide"]) == len(active) == num_active
  assert covered["wide"] == active
  assert covered["gather"] <= active and len(covered["gather"]) > num_active // 4
  assert covered["embed"] == set(ids[values != 0].tolist())


def test_sparse_hidden_example_learns_like_its_dense_twin(example):
  """The example at small sizes: both variants far above the label-popularity baseline,
  the sparse hidden layer's P@1 close to the dense one's."""
  sizes = dict(hidden_neurons=2_048, num_labels=300, steps=150, points=4_000)
  result = example("sparse_hidden").main(**sizes, num_active=256, log=lambda m: None)
  # baseline: every test point gets the training split's most frequent labels
  trn, tst = xcdata.synthesize_split(num_points=sizes["points"], num_features=5_000,
                                     num_labels=sizes["num_labels"], seed=0)
  top = np.tile(np.argsort(-xcdata.label_counts(trn))[:5], (tst.num_points, 1))
  prior = metrics.evaluate(top, (tst.label_indptr, tst.label_ids), ks=(1, 5))
  for name in ("sparse", "dense"):
    assert result[name]["p@1"] > prior["p@1"] + 0.3, (name, result, prior)
    assert result[name]["p@5"] > prior["p@5"] + 0.15, (name, result, prior)
    assert result[name]["step_ms"] > 0
  assert result["sparse"]["p@1"] > result["dense"]["p@1"] - 0.15, result
  assert result["speedup"] == pytest.approx(
      result["dense"]["step_ms"] / result["sparse"]["step_ms"])
