"""NNX Variable types of slidejax layers."""
from __future__ import annotations

from flax import nnx


class RowParam(nnx.Param):
  """A trainable parameter whose rows are updated sparsely (one row per neuron or feature).

  A subclass of ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains it densely,
  while :func:`slidejax.nn.value_and_grad` and :class:`slidejax.optim.Optimizer` give it
  row-sparse gradients and updates.
  """


class HashTables(nnx.Variable):
  """LSH tables of a layer (an :class:`slidejax.lsh.LSHTables`); not trainable."""


class HashParams(nnx.Variable):
  """Hash-function parameters (projections, permutations); not trainable."""


class RowDelta(nnx.Variable):
  """Zero perturbation added to the gathered rows, so a gradient w.r.t. it is the row gradient.

  A layer with RowParam ``kernel`` has its perturbation in ``kernel_delta`` (likewise bias).

  Attached by :func:`slidejax.nn.value_and_grad` for one differentiation; absent otherwise.
  """


class ActiveIds(nnx.Variable):
  """Row ids a layer gathered in its last forward pass (padding = number of rows)."""


class SamplerCDF(nnx.Variable):
  """Cumulative draw probabilities of a frequency-based negative sampler (from the training
  label counts); not trainable."""


class LabelLinks(nnx.Variable):
  """The labels each input feature of a :class:`slidejax.nn.LabelShortcut` links to (int32,
  -1 for none) and their prior weights; fixed when the model is built, not trainable."""


class NeighbourIndex(nnx.Variable):
  """The training rows a :class:`slidejax.nn.NeighbourVotes` searches (a feature -> rows
  index) and their labels; fixed when it is built, not trainable."""


class VoteWeight(nnx.Variable):
  """The share of :class:`slidejax.nn.NeighbourVotes`' votes in a model's predictions, chosen
  on validation rows; not trainable."""


class RerankWeight(nnx.Variable):
  """The weights of a :class:`slidejax.nn.Reranker` (and the label counts it reads), fit on
  validation rows after training; not trained with the model."""
