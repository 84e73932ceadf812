"""``SlideMLP``: SLIDE's network, sparse input -> hidden (ReLU) -> wide SLIDE output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slidejax.nn._functional import mix_votes
from slidejax.nn._functional import softmax_cross_entropy
from slidejax.nn._functional import target_distribution
from slidejax.nn._functional import top_k_chunked
from slidejax.nn._init import lecun_rows
from slidejax.nn._init import row_chunked
from slidejax.nn._neighbours import NeighbourVotes
from slidejax.nn._rerank import Reranker
from slidejax.nn._rerank import candidate_features
from slidejax.nn._rerank import union_candidates
from slidejax.nn._shortcut import LabelShortcut
from slidejax.nn._slide_dense import SlideDense
from slidejax.nn._slide_dense import SlideOutput
from slidejax.nn._sparse_input import SparseInput


OUTPUT_INITS = ("small", "fan_in")


def output_initializer(name: str, num_labels: int, hidden: int) -> nnx.Initializer:
  """The output kernel's ``[num_labels, hidden]`` initializer: ``small`` draws rows with std
  ``1/sqrt(num_labels)`` (near-zero logits at the start; the default, chosen by measurement:
  see the README), ``fan_in`` std ``1/sqrt(hidden)`` (lecun-normal over a logit's fan-in)."""
  if name not in OUTPUT_INITS:
    raise ValueError(f"output_init {name!r} is not one of {OUTPUT_INITS}")
  return lecun_rows(hidden if name == "fan_in" else num_labels)


class _Trunk(nnx.Module):
  """What :class:`SlideMLP` and :class:`DenseMLP` share: the bag-of-features embedding
  (``[num_features, hidden]``, ReLU), dropout on it in training calls, an optional
  residual block ``h + relu(W h + b)``, and an optional :class:`LabelShortcut` from the input
  features to the labels they link to (``shortcut`` labels per feature, ``links`` from
  :func:`slidejax.data.label_links`; a loaded model gets its links from the file)."""

  def _init_trunk(self, num_features: int, num_labels: int, hidden: int, dropout: float,
                  residual: bool, shortcut: int, links, rngs: nnx.Rngs,
                  members: int = 1) -> dict:
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if hidden <= 0 or num_features <= 0 or num_labels <= 0:
      raise ValueError(f"sizes must be positive, got num_features={num_features}, "
                       f"num_labels={num_labels}, hidden={hidden}")
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
      raise ValueError(f"members must be a positive integer, got {members!r}")
    if members > 1 and residual:
      raise ValueError("a residual block would mix the members' embeddings: use members=1")
    self.num_features = num_features
    self.num_labels = num_labels
    self.members = members
    # members > 1: one embedding per member side by side, each drawn as a lone one would be
    embed_init = (row_chunked(nnx.initializers.normal(stddev=0.1 / hidden ** 0.5))
                  if members > 1 else None)
    self.embed = SparseInput(num_features, hidden * members, kernel_init=embed_init, rngs=rngs)
    self.block = nnx.Linear(hidden, hidden, rngs=rngs) if residual else nnx.data(None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else nnx.data(None)
    if shortcut < 0 or (links is not None and not shortcut):
      raise ValueError(f"shortcut must be a non-negative number of labels per feature (links "
                       f"need one), got {shortcut}")
    self.shortcut = (LabelShortcut(num_features, shortcut, num_labels, links=links)
                     if shortcut else nnx.data(None))
    self.neighbours = nnx.data(None)
    self.reranker = nnx.data(None)
    spec = {"num_features": num_features, "num_labels": num_labels, "hidden": hidden,
            "dropout": float(dropout), "residual": bool(residual), "shortcut": int(shortcut)}
    return {**spec, "members": members} if members > 1 else spec

  def set_neighbours(self, votes: NeighbourVotes | None) -> None:
    """Mixes ``votes`` (or, None, no votes) into :meth:`top_k`'s predictions from now on
    (``spec["neighbours"]`` records it for :func:`slidejax.save`)."""
    if votes is not None and (votes.num_features != self.num_features
                              or votes.num_labels != self.num_labels):
      raise ValueError(f"set_neighbours: votes over {votes.num_features} features and "
                       f"{votes.num_labels} labels do not fit a model of {self.num_features} "
                       f"and {self.num_labels}")
    self.neighbours = votes if votes is not None else nnx.data(None)
    self.spec = {n: v for n, v in self.spec.items() if n != "neighbours"}
    if votes is not None:
      self.spec["neighbours"] = dict(votes.spec)

  def set_reranker(self, reranker: Reranker | None) -> None:
    """Ranks :meth:`top_k`'s labels by ``reranker`` (or, None, as before) from now on
    (``spec["reranker"]`` records it for :func:`slidejax.save`)."""
    if reranker is not None and reranker.num_labels != self.num_labels:
      raise ValueError(f"set_reranker: a reranker over {reranker.num_labels} labels does not "
                       f"fit a model of {self.num_labels}")
    self.reranker = reranker if reranker is not None else nnx.data(None)
    self.spec = {n: v for n, v in self.spec.items() if n != "reranker"}
    if reranker is not None:
      self.spec["reranker"] = dict(reranker.spec)

  def candidates(self, feature_ids: jax.Array, feature_values: jax.Array, log_count=None, *,
                 m: int = Reranker.CANDIDATES, exact: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """What a :class:`Reranker` ranks: the model's own top ``m`` labels (:meth:`ranked`)
    and those its :attr:`neighbours` vote for: (label ids int32 ``[B, C]``, -1 for none;
    their features float32 ``[B, C, len(FEATURES)]``, see
    :func:`slidejax.nn.candidate_features`). ``log_count``: ``[num_labels]`` ``log(1 +
    training count)`` (default: the attached reranker's)."""
    if log_count is None:
      log_count = self.reranker.log_count[...]
    scores, top, log_total = self.ranked(feature_ids, feature_values, m, exact=exact)
    if self.neighbours is not None:
      vote_ids, votes = self.neighbours(feature_ids, feature_values)
    else:
      vote_ids = jnp.full((top.shape[0], 1), -1, jnp.int32)
      votes = jnp.zeros((top.shape[0], 1), jnp.float32)
    ids = union_candidates(top, scores, vote_ids)
    safe = jnp.where(ids >= 0, ids, self.num_labels)    # padding: left alone by the shortcut
    logits = self._label_logits(self.hidden(feature_ids, feature_values),
                                jnp.minimum(safe, self.num_labels - 1))
    shortcut = (jnp.zeros_like(logits) if self.shortcut is None else
                self.shortcut.add_to(jnp.zeros_like(logits), safe, feature_ids, feature_values))
    return ids, candidate_features(ids, logits + shortcut, shortcut, log_total, vote_ids,
                                   votes, jnp.asarray(log_count, jnp.float32))

  def _reranked_top_k(self, feature_ids, feature_values, k: int, exact: bool):
    """:meth:`top_k` with :attr:`reranker`: its scores over :meth:`candidates`."""
    ids, features = self.candidates(feature_ids, feature_values, m=self.reranker.candidates,
                                    exact=exact)
    scores = jnp.where(ids >= 0, self.reranker(features), -jnp.inf)
    best, pos = jax.lax.top_k(scores, k)
    ids = jnp.take_along_axis(ids, pos, axis=1)
    return best, jnp.where(jnp.isfinite(best), ids, self.num_labels)

  def _mixed_top_k(self, feature_ids, feature_values, k: int, exact: bool):
    """:meth:`top_k` with :attr:`neighbours`: the model's own top ``k + width``
    (:meth:`ranked`) mixed with the votes (:func:`mix_votes`)."""
    scores, ids, log_total = self.ranked(feature_ids, feature_values,
                                         k + self.neighbours.width, exact=exact)
    vote_ids, votes = self.neighbours(feature_ids, feature_values)
    return mix_votes(scores, ids, log_total, vote_ids, votes, self.neighbours.weight[...], k)

  def _shortcut_scores(self, feature_ids, feature_values):
    """The shortcut's (label ids, scores) ``[B, E]`` for ``top_k``, or None without one."""
    if self.shortcut is None:
      return None
    return self.shortcut(feature_ids, feature_values)

  def hidden(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    """``[B, F]`` ids and values -> float32 ``[B, hidden * members]`` (no dropout: for
    predictions)."""
    return self._hidden(feature_ids, feature_values, training=False)

  def _hidden(self, feature_ids, feature_values, *, training: bool) -> jax.Array:
    h = jax.nn.relu(self.embed(feature_ids, feature_values))
    if training and self.dropout is not None:
      h = self.dropout(h)
    if self.block is not None:
      h = h + jax.nn.relu(self.block(h))
    return h


class SlideMLP(_Trunk):
  """Bag of features -> ``hidden`` ReLU units -> ``num_labels`` outputs through LSH.

  ``dropout``: rate on the embedding in calls (training; not in :meth:`top_k`, nor after
  ``model.eval()``; draws from the ``dropout`` stream of ``rngs``, else its default one);
  ``residual``: a residual block ``h + relu(W h + b)`` after the embedding; ``shortcut`` /
  ``links``: a :class:`LabelShortcut` added to the output logits (one block only);
  ``output_init``: see :func:`output_initializer`. Every other keyword accepted by
  :class:`SlideDense` (``hash``, ``k``, ``l``, ``num_active``, ``mode``, ``shards``, ...)
  configures the output layer. With
  ``shards`` that do not divide ``num_labels`` the output layer is rounded up to whole blocks:
  the extra neurons are never a label and never predicted.
  """

  def __init__(self, num_features: int, num_labels: int, *, hidden: int = 128,
               dropout: float = 0.0, residual: bool = False, output_init: str = "small",
               shortcut: int = 0, links=None, rngs: nnx.Rngs, **output_options):
    trunk = self._init_trunk(num_features, num_labels, hidden, dropout, residual, shortcut,
                             links, rngs)
    shards = output_options.get("shards", 1)
    if shortcut and shards != 1:
      raise ValueError("SlideMLP: a shortcut needs an output layer of one block (shards=1)")
    outputs = -(-num_labels // shards) * shards if isinstance(shards, int) and shards > 0 \
        else num_labels
    self.output = SlideDense(hidden, outputs, rngs=rngs,
                             kernel_init=output_initializer(output_init, num_labels, hidden),
                             **output_options)
    # what rebuilds this model (slidejax.save writes it): sizes and every resolved option
    self.spec = {"class": "SlideMLP", **trunk, "output_init": output_init,
                 "output": dict(self.output.resolved_options)}

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array, *,
               labels: jax.Array | None = None, key: jax.Array | None = None) -> SlideOutput:
    h = self._hidden(feature_ids, feature_values, training=True)
    out = self.output(h, labels=labels, key=key)
    if self.shortcut is None:
      return out
    # every neuron active (column j is label j): no lookup of the columns
    ids = (None if self.output.mode == "dense" else
           jnp.where(out.valid, out.ids, self.output.out_features))
    return out._replace(logits=self.shortcut.add_to(out.logits, ids, feature_ids,
                                                    feature_values))

  def top_k(self, feature_ids: jax.Array, feature_values: jax.Array, k: int, *,
            exact: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` labels: (scores ``[B, k]``, ids ``[B, k]``); ``exact=False``: through the
    LSH tables (see :meth:`SlideDense.top_k`; id ``num_labels`` past a sample's candidates).
    The scores are logits; with :attr:`neighbours`, mixed probabilities (see
    :meth:`set_neighbours`; through the tables, the softmax is over the candidates)."""
    if self.reranker is not None:
      return self._reranked_top_k(feature_ids, feature_values, k, exact)
    if self.neighbours is not None:
      return self._mixed_top_k(feature_ids, feature_values, k, exact)
    h = self.hidden(feature_ids, feature_values)
    extra = self.output.out_features - self.num_labels   # neurons of a rounded-up last block
    if not extra:
      return self.output.top_k(h, k, exact=exact,
                               extra=self._shortcut_scores(feature_ids, feature_values))
    scores, ids = self.output.top_k(h, k + extra, exact=exact)
    scores = jnp.where(ids < self.num_labels, scores, -jnp.inf)
    best, pos = jax.lax.top_k(scores, k)
    ids = jnp.take_along_axis(ids, pos, axis=1)
    return best, jnp.where(jnp.isfinite(best), ids, self.num_labels)

  def _label_logits(self, h: jax.Array, labels: jax.Array) -> jax.Array:
    """The output layer's logits ``[B, C]`` of ``labels`` ``[B, C]`` (no shortcut)."""
    rows = jnp.take(self.output.kernel[...], labels, axis=0)
    return jnp.einsum("bh,bch->bc", h, rows) + jnp.take(self.output.bias[...], labels)

  def ranked(self, feature_ids: jax.Array, feature_values: jax.Array, m: int, *,
             exact: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's own top ``m`` logits and ids ``[B, m]`` (no votes) and each sample's
    log-sum-exp ``[B]`` of every logit (through the tables, of its candidates'): what
    :meth:`top_k` mixes with :attr:`neighbours`' votes. An output layer of one block."""
    if self.output.out_features != self.num_labels or self.output.shards != 1:
      raise ValueError("SlideMLP.ranked: needs an output layer of one block")
    return self.output.top_k(self.hidden(feature_ids, feature_values), m, exact=exact,
                             extra=self._shortcut_scores(feature_ids, feature_values),
                             normalizer=True)


def sampled_softmax_loss(out: SlideOutput, sample_weight: jax.Array | None = None) -> jax.Array:
  """Multi-label softmax cross-entropy over the active set (target mass spread evenly over
  each sample's true labels; rows without labels and padding rows do not count), after the
  sampler's ``logit_correction`` when it has one."""
  logits = out.logits
  if out.logit_correction is not None:   # the sampler's log-q correction (see SlideOutput)
    logits = logits - out.logit_correction
  return softmax_cross_entropy(logits, out.label_slots, sample_weight)


def sampled_sigmoid_loss(out: SlideOutput, sample_weight: jax.Array | None = None) -> jax.Array:
  """One-vs-all loss over the active set: binary cross-entropy of every active neuron, target
  1 for the sample's labels and 0 for the rest, summed over the set, averaged over samples
  (rows without labels count: all their active neurons are negatives; padding rows do not).
  The sampler's ``logit_correction`` is not used: each neuron is its own binary problem."""
  logits = out.logits
  targets = (target_distribution(out.label_slots, logits.shape[1]) > 0).astype(logits.dtype)
  valid = jnp.broadcast_to(out.valid, logits.shape)
  per_neuron = jax.nn.softplus(logits) - targets * logits
  per_sample = jnp.sum(jnp.where(valid, per_neuron, 0.0), axis=1)
  weight = (jnp.ones(logits.shape[:1], logits.dtype) if sample_weight is None
            else sample_weight.astype(logits.dtype))
  return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def dense_softmax_loss(logits: jax.Array, label_ids: jax.Array,
                       sample_weight: jax.Array | None = None) -> jax.Array:
  """The dense reference: the same loss over all ``N`` logits ``[B, N]``."""
  num_labels = logits.shape[1]
  slots = jnp.where((label_ids >= 0) & (label_ids < num_labels), label_ids, -1)
  return softmax_cross_entropy(logits, slots, sample_weight)


class DenseMLP(_Trunk):
  """The dense baseline: the same network as :class:`SlideMLP` (same options) with a full
  softmax output.

  The output kernel is stored ``[num_labels, hidden]`` (one row per label, like SlideDense),
  so a trained dense model and a SLIDE model are interchangeable for inference.

  ``members`` > 1: an ensemble of that many networks of width ``hidden`` (own embedding, own
  output rows; the output bias shared), as :meth:`from_members` puts trained ones together
  (``fit`` trains each on its own validation split). It is one network of width
  ``hidden * members`` (kernel ``[num_labels, hidden * members]``) with its hidden units
  scaled by ``1 / members``: its logits are the mean of the members', which ranks as the mean
  of their log-probabilities does.
  """

  def __init__(self, num_features: int, num_labels: int, *, hidden: int = 128,
               dropout: float = 0.0, residual: bool = False, output_init: str = "small",
               shortcut: int = 0, links=None, members: int = 1, rngs: nnx.Rngs):
    trunk = self._init_trunk(num_features, num_labels, hidden, dropout, residual, shortcut,
                             links, rngs, members)
    init = output_initializer(output_init, num_labels, hidden)
    self.kernel = nnx.Param(init(rngs.params(), (num_labels, hidden * members)))
    self.bias = nnx.Param(jnp.zeros((num_labels,), jnp.float32))
    self.spec = {"class": "DenseMLP", **trunk, "output_init": output_init}

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array, *,
               labels: jax.Array | None = None) -> jax.Array:
    """Full logits float32 ``[B, num_labels]`` (``labels`` accepted for a common call with
    :class:`SlideMLP`, and unused: every label is computed)."""
    del labels
    h = self._members_mean(self._hidden(feature_ids, feature_values, training=True))
    logits = h @ self.kernel[...].T + self.bias[...]
    if self.shortcut is None:
      return logits
    return self.shortcut.add_to(logits, None, feature_ids, feature_values)

  def _members_mean(self, h: jax.Array) -> jax.Array:
    """Hidden units ``[B, hidden * members]`` scaled so that the output layer gives the mean
    of the members' logits."""
    return h if self.members == 1 else h / self.members

  @classmethod
  def from_members(cls, models: list["DenseMLP"]) -> "DenseMLP":
    """The ensemble of trained one-member ``models`` of one shape (no shortcut or residual
    block): their embeddings and output rows side by side, the mean of their output biases
    (so its logits are the mean of theirs). One model is returned as it is."""
    if len(models) == 1:
      return models[0]
    first = models[0]
    for model in models:
      if (model.members != 1 or model.shortcut is not None or model.block is not None
          or model.kernel.shape != first.kernel.shape
          or model.embed.kernel.shape != first.embed.kernel.shape):
        raise ValueError("from_members takes one-member DenseMLPs of one shape, without a "
                         "shortcut or residual block")
    spec = first.spec
    ensemble = cls(first.num_features, first.num_labels, hidden=spec["hidden"],
                   dropout=spec["dropout"], output_init=spec["output_init"],
                   members=len(models), rngs=nnx.Rngs(0))
    side_by_side = lambda get: jnp.concatenate([get(m) for m in models], axis=1)  # noqa: E731
    ensemble.embed.kernel[...] = side_by_side(lambda m: m.embed.kernel[...])
    ensemble.embed.bias[...] = jnp.concatenate([m.embed.bias[...] for m in models])
    ensemble.kernel[...] = side_by_side(lambda m: m.kernel[...])
    ensemble.bias[...] = jnp.mean(jnp.stack([m.bias[...] for m in models]), axis=0)
    return ensemble

  def top_k(self, feature_ids: jax.Array, feature_values: jax.Array, k: int, *,
            exact: bool = True) -> tuple[jax.Array, jax.Array]:
    """Exact top-``k`` labels: (logits ``[B, k]``, ids ``[B, k]``); with :attr:`neighbours`,
    mixed probabilities (see :meth:`set_neighbours`)."""
    if self.reranker is not None:
      return self._reranked_top_k(feature_ids, feature_values, k, exact)
    if self.neighbours is not None:
      return self._mixed_top_k(feature_ids, feature_values, k, exact)
    return top_k_chunked(self._members_mean(self.hidden(feature_ids, feature_values)),
                         self.kernel[...], self.bias[...], k,
                         extra=self._shortcut_scores(feature_ids, feature_values))

  def _label_logits(self, h: jax.Array, labels: jax.Array) -> jax.Array:
    """The output layer's logits ``[B, C]`` of ``labels`` ``[B, C]`` (no shortcut)."""
    rows = jnp.take(self.kernel[...], labels, axis=0)
    return (jnp.einsum("bh,bch->bc", self._members_mean(h), rows)
            + jnp.take(self.bias[...], labels))

  def ranked(self, feature_ids: jax.Array, feature_values: jax.Array, m: int, *,
             exact: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's own top ``m`` logits and ids ``[B, m]`` (no votes) and each sample's
    log-sum-exp ``[B]`` of every logit: what :meth:`top_k` mixes with :attr:`neighbours`'
    votes."""
    del exact  # always exact
    return top_k_chunked(self._members_mean(self.hidden(feature_ids, feature_values)),
                         self.kernel[...], self.bias[...], m,
                         extra=self._shortcut_scores(feature_ids, feature_values),
                         normalizer=True)
