"""``Reranker``: a small network that re-orders a trained model's candidate labels from what
is known about each one: its probability, the shortcut's score, the neighbours' votes and
its training count."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slidejax.nn._variables import RerankWeight


# What a candidate label is described by, in this order (see candidate_features).
FEATURES = ("log_prob", "prob", "shortcut", "log_prob_network", "votes", "log_votes",
            "log_count", "linked")
VOTE_FLOOR = 1e-3   # log_votes = log(votes + VOTE_FLOOR)


def union_candidates(ids: jax.Array, scores: jax.Array, vote_ids: jax.Array) -> jax.Array:
  """int32 ``[B, M + W]``: a model's top ``M`` label ``ids`` (``scores`` ``-inf``: none) then
  the voted labels ``vote_ids`` ``[B, W]`` that are not among them; -1 for none."""
  in_top = jnp.any(vote_ids[:, :, None] == ids[:, None, :], axis=2)
  return jnp.concatenate([jnp.where(jnp.isfinite(scores), ids, -1),
                          jnp.where(in_top | (vote_ids < 0), -1, vote_ids)],
                         axis=1).astype(jnp.int32)


def candidate_features(candidates: jax.Array, logits: jax.Array, shortcut: jax.Array,
                       log_total: jax.Array, vote_ids: jax.Array, votes: jax.Array,
                       log_count: jax.Array) -> jax.Array:
  """float32 ``[B, C, len(FEATURES)]`` describing each candidate label (zeros for none).

  Args:
    candidates: int32 ``[B, C]`` label ids, unique per row, -1 for none.
    logits: float32 ``[B, C]`` their exact logits, the shortcut's scores included.
    shortcut: float32 ``[B, C]`` the shortcut's part of them (zeros without one).
    log_total: float32 ``[B]`` the log-sum-exp of every logit of the row.
    vote_ids, votes: ``[B, W]`` voted labels (-1 for none) and their votes.
    log_count: float32 ``[num_labels]`` ``log(1 + training count)`` per label.
  """
  valid = candidates >= 0
  log_prob = logits - log_total[:, None]
  voted = jnp.einsum("bw,bwc->bc", votes, ((vote_ids[:, :, None] == candidates[:, None, :])
                                           & (vote_ids[:, :, None] >= 0)).astype(votes.dtype))
  features = jnp.stack([log_prob, jnp.exp(log_prob), shortcut, log_prob - shortcut, voted,
                        jnp.log(voted + VOTE_FLOOR), log_count[jnp.maximum(candidates, 0)],
                        (shortcut > 0).astype(jnp.float32)], axis=-1)
  return jnp.where(valid[..., None], features, 0.0).astype(jnp.float32)


def rerank_scores(weights: dict, features: jax.Array) -> jax.Array:
  """``[..., len(FEATURES)]`` -> ``[...]``: a linear term plus one hidden ReLU layer over the
  standardised features (``weights``: :meth:`Reranker.weights`' dict)."""
  x = (features - weights["mean"]) / weights["scale"]
  return x @ weights["linear"] + jax.nn.relu(x @ weights["kernel"] + weights["bias"]) @ \
      weights["out"]


class Reranker(nnx.Module):
  """Re-ranks a model's candidates: its own top ``candidates`` labels and the labels its
  :class:`slidejax.nn.NeighbourVotes` vote for (when it has them), each described by
  :data:`FEATURES` and scored by :func:`rerank_scores`. A model holding one
  (``model.set_reranker``) ranks by those scores. Its weights are fit on validation rows by
  :func:`slidejax.train.fit_reranker`; as built, it ranks by the model's own probability
  (identity on ``log_prob``, the hidden layer's output zero).

  What it adds over a fixed mixture: how much a label's probability, its shortcut score and
  its votes are worth depends on how frequent the label is and on each other (a rare label
  linked to an input word against a frequent one the network is sure of).

  Attributes (``RerankWeight``): ``log_count`` float32 ``[num_labels]``; ``mean``, ``scale``,
  ``linear`` ``[len(FEATURES)]``; ``kernel`` ``[len(FEATURES), hidden]``; ``bias``, ``out``
  ``[hidden]``.
  """

  CANDIDATES = 64   # the model's own top labels described (the votes' labels come beside)
  HIDDEN = 16

  def __init__(self, label_counts, *, hidden: int = HIDDEN, candidates: int = CANDIDATES,
               rngs: nnx.Rngs):
    if hidden <= 0 or candidates <= 0:
      raise ValueError(f"Reranker: hidden and candidates must be positive, got {hidden}, "
                       f"{candidates}")
    counts = np.asarray(label_counts, np.float64)
    n = len(FEATURES)
    self.num_labels, self.hidden, self.candidates = len(counts), int(hidden), int(candidates)
    self.log_count = RerankWeight(jnp.asarray(np.log1p(counts), jnp.float32))
    self.mean = RerankWeight(jnp.zeros((n,), jnp.float32))
    self.scale = RerankWeight(jnp.ones((n,), jnp.float32))
    self.linear = RerankWeight(jnp.zeros((n,), jnp.float32).at[0].set(1.0))
    self.kernel = RerankWeight(0.1 * jax.random.normal(rngs.params(), (n, hidden), jnp.float32))
    self.bias = RerankWeight(jnp.zeros((hidden,), jnp.float32))
    self.out = RerankWeight(jnp.zeros((hidden,), jnp.float32))
    self.spec = {"hidden": self.hidden, "candidates": self.candidates}

  WEIGHTS = ("mean", "scale", "linear", "kernel", "bias", "out")

  def weights(self) -> dict:
    """The scoring weights as a dict of arrays (what :func:`rerank_scores` takes)."""
    return {name: getattr(self, name)[...] for name in self.WEIGHTS}

  def set_weights(self, weights: dict) -> None:
    """Sets the scoring weights from a dict like :meth:`weights`' (shapes checked)."""
    for name in self.WEIGHTS:
      variable = getattr(self, name)
      value = jnp.asarray(weights[name], jnp.float32)
      if value.shape != variable.shape:
        raise ValueError(f"Reranker.set_weights: {name} has shape {value.shape}, expected "
                         f"{variable.shape}")
      variable[...] = value

  def __call__(self, features: jax.Array) -> jax.Array:
    """float32 ``[B, C, len(FEATURES)]`` -> scores ``[B, C]``."""
    return rerank_scores(self.weights(), features)
