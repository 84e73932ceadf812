"""``fit_reranker``: a :class:`slidejax.nn.Reranker` for a trained model, fit on validation
rows and kept only when it scores better on rows it was not fit on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slidejax import data as xcdata
from slidejax import metrics
from slidejax.nn import Reranker
from slidejax.nn import rerank_scores
from slidejax.train import _plan

FIT_STEPS = 300        # full-batch Adam steps over the validation rows' candidates
FIT_RATE = 0.05
FIT_L2 = 1e-3


def _described(model, held: xcdata.XCData, log_count, batch_size: int, width: int):
  """The model's candidates of every row of ``held``: (ids ``[n, C]``, features ``[n, C,
  len(FEATURES)]``, its own top 5 ``[n, 5]``)."""
  from slidejax.train._loop import padded_batches   # (the loop imports this module)
  describe = nnx.jit(lambda m, ids, values: (*m.candidates(ids, values, log_count),
                                             m.top_k(ids, values, 5)[1]))
  parts = []
  for _, ids, values, count in padded_batches(held, np.arange(held.num_points), batch_size,
                                              width):
    parts.append([np.asarray(a)[:count] for a in describe(model, ids, values)])
  return [np.concatenate(column) for column in zip(*parts)]


def _targets(held: xcdata.XCData, ids: np.ndarray) -> np.ndarray:
  """float32 ``[n, C]``: each row's target mass, spread evenly over its candidates that are
  its labels (rows with none: zeros)."""
  hits = np.zeros(ids.shape, np.float32)
  for row in range(held.num_points):
    labels = held.label_ids[held.label_indptr[row]:held.label_indptr[row + 1]]
    hits[row] = np.isin(ids[row], labels) & (ids[row] >= 0)
  return hits / np.maximum(hits.sum(axis=1, keepdims=True), 1.0)


def _fit_weights(init: dict, features, valid, targets, steps: int) -> dict:
  """Weights minimising the candidates' softmax cross-entropy against ``targets`` (rows with
  a target only) plus ``FIT_L2`` times their squared norm, from ``init`` (the trainable ones);
  the standardisation (``mean``, ``scale``) is taken from ``features``' valid candidates."""
  flat = features[valid]
  fixed = {"mean": jnp.asarray(flat.mean(axis=0)), "scale": jnp.asarray(flat.std(axis=0) + 1e-6)}
  x, mask, t = jnp.asarray(features), jnp.asarray(valid), jnp.asarray(targets)
  counted = jnp.sum(t, axis=1) > 0

  def loss(w):
    scores = jnp.where(mask, rerank_scores({**w, **fixed}, x), -1e9)
    per_row = -jnp.sum(t * jax.nn.log_softmax(scores, axis=1), axis=1)
    penalty = sum(jnp.sum(v ** 2) for v in jax.tree.leaves(w))
    return jnp.sum(jnp.where(counted, per_row, 0.0)) / jnp.maximum(jnp.sum(counted), 1) \
        + FIT_L2 * penalty

  tx = optax.adam(FIT_RATE)

  @jax.jit
  def run(w):
    def step(carry, _):
      w, state = carry
      grads = jax.grad(loss)(w)
      updates, state = tx.update(grads, state)
      return (optax.apply_updates(w, updates), state), None
    return jax.lax.scan(step, (w, tx.init(w)), None, length=steps)[0][0]

  return {**run(dict(init)), **fixed}


def _top5(weights: dict, ids: np.ndarray, features: np.ndarray) -> np.ndarray:
  scores = np.where(ids >= 0, np.asarray(rerank_scores(weights, jnp.asarray(features))),
                    -np.inf)
  return np.take_along_axis(ids, np.argsort(-scores, axis=1, kind="stable")[:, :5], axis=1)


def fit_reranker(model: nnx.Module, held: xcdata.XCData, label_counts, *, key: jax.Array,
                 batch_size: int = 256, max_features: int | None = None,
                 steps: int = FIT_STEPS) -> dict:
  """Fits a :class:`slidejax.nn.Reranker` for ``model`` (with its neighbour votes, if any) on
  validation rows ``held`` and attaches it when it pays.

  Two halves of ``held`` (drawn with ``key``) each get a reranker fit on the other; their
  predictions together are scored (mean of P@1, P@3 and P@5) against the model's own. Only
  when that cross-fitted score is higher is a reranker fit on every row of ``held`` and set
  on the model (``model.set_reranker``).

  Args:
    label_counts: ``[num_labels]`` training counts (of the rows the model was trained on).
    key: PRNG key for the halves and the hidden layer's initial weights.
  Returns:
    ``{"before", "cross", "used", "weights"}``: the scores without and cross-fitted, whether
    it was attached, and its weights (lists; None when not attached).
  """
  split_key, init_key = jax.random.split(key)
  reranker = Reranker(label_counts, rngs=nnx.Rngs(params=init_key))
  width = max_features or int(xcdata.suggest_widths(held)[0])
  ids, features, own = _described(model, held, reranker.log_count[...], batch_size, width)
  targets, valid = _targets(held, ids), ids >= 0
  truth = (held.label_indptr, held.label_ids)
  score = lambda top: _plan.validation_score(metrics.evaluate(top, truth, ks=(1, 3, 5)))  # noqa: E731
  before = score(own)
  init = {n: v for n, v in reranker.weights().items() if n not in ("mean", "scale")}
  half = np.asarray(jax.random.permutation(split_key, held.num_points)) < held.num_points // 2
  crossed = np.zeros_like(own)
  for fit_on in (half, ~half):
    weights = _fit_weights(init, features[fit_on], valid[fit_on], targets[fit_on], steps)
    crossed[~fit_on] = _top5(weights, ids[~fit_on], features[~fit_on])
  cross = score(crossed)
  result = {"before": round(before, 6), "cross": round(cross, 6), "used": cross > before,
            "weights": None}
  if result["used"]:
    reranker.set_weights(_fit_weights(init, features, valid, targets, steps))
    model.set_reranker(reranker)
    result["weights"] = {n: np.asarray(v).tolist() for n, v in reranker.weights().items()}
  return result


def attach_reranker(model: nnx.Module, label_counts, choice: dict | None) -> None:
  """Gives ``model`` the reranker of ``choice`` (:func:`fit_reranker`'s result, e.g. from a
  checkpoint's position); nothing when it was not used."""
  if not choice or not choice.get("used"):
    return
  reranker = Reranker(label_counts, rngs=nnx.Rngs(0))
  reranker.set_weights(choice["weights"])
  model.set_reranker(reranker)
