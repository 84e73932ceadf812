"""``SlideMLP``: SLIDE's network, sparse input -> hidden (ReLU) -> wide SLIDE output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slidejax.nn._functional import softmax_cross_entropy
from slidejax.nn._functional import target_distribution
from slidejax.nn._functional import top_k_chunked
from slidejax.nn._init import lecun_rows
from slidejax.nn._slide_dense import SlideDense
from slidejax.nn._slide_dense import SlideOutput
from slidejax.nn._sparse_input import SparseInput


class SlideMLP(nnx.Module):
  """Bag of features -> ``hidden`` ReLU units -> ``num_labels`` outputs through LSH.

  Every keyword accepted by :class:`SlideDense` (``hash``, ``k``, ``l``, ``num_active``,
  ``mode``, ...) configures the output layer.
  """

  def __init__(self, num_features: int, num_labels: int, *, hidden: int = 128,
               rngs: nnx.Rngs, **output_options):
    self.num_features = num_features
    self.num_labels = num_labels
    self.embed = SparseInput(num_features, hidden, rngs=rngs)
    self.output = SlideDense(hidden, num_labels, rngs=rngs, **output_options)
    # what rebuilds this model (slidejax.save writes it): sizes and every resolved option
    self.spec = {"class": "SlideMLP", "num_features": num_features, "num_labels": num_labels,
                 "hidden": hidden, "output": dict(self.output.resolved_options)}

  def hidden(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    """``[B, F]`` ids and values -> float32 ``[B, hidden]``."""
    return jax.nn.relu(self.embed(feature_ids, feature_values))

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array, *,
               labels: jax.Array | None = None, key: jax.Array | None = None) -> SlideOutput:
    return self.output(self.hidden(feature_ids, feature_values), labels=labels, key=key)

  def top_k(self, feature_ids: jax.Array, feature_values: jax.Array, k: int, *,
            exact: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` labels: (scores ``[B, k]``, ids ``[B, k]``); ``exact=False``: through the
    LSH tables (see :meth:`SlideDense.top_k`)."""
    return self.output.top_k(self.hidden(feature_ids, feature_values), k, exact=exact)


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


class DenseMLP(nnx.Module):
  """The dense baseline: the same network as :class:`SlideMLP` with a full softmax output.

  The output kernel is stored ``[num_labels, hidden]`` (one row per label, like SlideDense),
  so a trained dense model and a SLIDE model are interchangeable for inference.
  """

  def __init__(self, num_features: int, num_labels: int, *, hidden: int = 128,
               rngs: nnx.Rngs):
    self.num_features = num_features
    self.num_labels = num_labels
    self.embed = SparseInput(num_features, hidden, rngs=rngs)
    self.kernel = nnx.Param(lecun_rows(num_labels)(rngs.params(), (num_labels, hidden)))
    self.bias = nnx.Param(jnp.zeros((num_labels,), jnp.float32))
    self.spec = {"class": "DenseMLP", "num_features": num_features, "num_labels": num_labels,
                 "hidden": hidden}

  def hidden(self, feature_ids: jax.Array, feature_values: jax.Array) -> jax.Array:
    return jax.nn.relu(self.embed(feature_ids, feature_values))

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array, *,
               labels: jax.Array | None = None) -> jax.Array:
    """Full logits float32 ``[B, num_labels]`` (``labels`` accepted for a common call with
    :class:`SlideMLP`, and unused: every label is computed)."""
    del labels
    h = self.hidden(feature_ids, feature_values)
    return h @ self.kernel[...].T + self.bias[...]

  def top_k(self, feature_ids: jax.Array, feature_values: jax.Array, k: int, *,
            exact: bool = True) -> tuple[jax.Array, jax.Array]:
    del exact  # always exact
    return top_k_chunked(self.hidden(feature_ids, feature_values), self.kernel[...],
                         self.bias[...], k)
