"""``NeighbourVotes``: the labels of a query's most similar training rows, as votes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slidejax.nn._variables import NeighbourIndex
from slidejax.nn._variables import VoteWeight


# A query's candidate rows hold one of its features whose row list is at most this long (or its
# shortest list, when every one is longer): see hostops.neighbour_votes.
MAX_LIST = 4096


def neighbour_votes_jax(query_ids: jax.Array, query_values: jax.Array, post_indptr: jax.Array,
                        post_rows: jax.Array, row_indptr: jax.Array, row_ids: jax.Array,
                        row_values: jax.Array, label_indptr: jax.Array, label_ids: jax.Array,
                        *, num_labels: int, max_labels: int, k: int, power: float, width: int,
                        max_list: int = MAX_LIST) -> tuple[jax.Array, jax.Array]:
  """The pure-JAX twin of :func:`hostops.neighbour_votes` (same arguments and results; see
  :class:`NeighbourVotes`): every index row at once, ``[B, N]`` in memory."""
  batch, num_features = query_ids.shape[0], post_indptr.shape[0] - 1
  num_rows = row_indptr.shape[0] - 1
  used = (query_ids >= 0) & (query_ids < num_features) & (query_values != 0)
  columns = jnp.where(used, query_ids, num_features)
  rows = jnp.arange(batch)[:, None]
  query = jnp.zeros((batch, num_features + 1), jnp.float32).at[rows, columns].add(
      jnp.where(used, query_values, 0.0))
  lengths = jnp.append(jnp.diff(post_indptr), 0)[columns]                     # [B, F]
  shortest = jnp.min(jnp.where(used, lengths, jnp.iinfo(jnp.int32).max), axis=1)
  short = used & (lengths <= jnp.maximum(max_list, shortest)[:, None])
  searched = jnp.zeros((batch, num_features + 1), jnp.float32).at[rows, columns].max(
      short.astype(jnp.float32))
  feature_of = jnp.repeat(jnp.arange(num_features, dtype=jnp.int32), jnp.diff(post_indptr),
                          total_repeat_length=post_rows.shape[0])
  row_of = jnp.repeat(jnp.arange(num_rows, dtype=jnp.int32), jnp.diff(row_indptr),
                      total_repeat_length=row_ids.shape[0])
  candidate = jnp.zeros((batch, num_rows), jnp.float32).at[:, post_rows].max(
      searched[:, feature_of]) > 0
  similarity = jnp.zeros((batch, num_rows), jnp.float32).at[:, row_of].add(
      query[:, row_ids] * row_values)
  similarity = jnp.where(candidate & (similarity > 0), similarity, -jnp.inf)
  near, near_rows = jax.lax.top_k(similarity, min(k, num_rows))       # ties: lower row first
  weights = jnp.where(jnp.isfinite(near), jnp.maximum(near, 0.0) ** power, 0.0)
  slots = label_indptr[near_rows][..., None] + jnp.arange(max_labels)  # [B, k, max_labels]
  has = slots < label_indptr[near_rows + 1][..., None]
  labels = jnp.where(has, label_ids[jnp.where(has, slots, 0)], num_labels)
  votes = jnp.zeros((batch, num_labels + 1), jnp.float32).at[
      rows[:, :, None], labels].add(jnp.where(has, weights[..., None], 0.0))[:, :num_labels]
  total = jnp.sum(votes, axis=1, keepdims=True)
  best, ids = jax.lax.top_k(votes, min(width, num_labels))              # ties: lower id first
  best = jnp.where(best > 0, best / jnp.where(total > 0, total, 1.0), 0.0)
  ids = jnp.where(best > 0, ids, -1)
  pad = width - best.shape[1]
  return (jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1).astype(jnp.int32),
          jnp.pad(best, ((0, 0), (0, pad))))


class NeighbourVotes(nnx.Module):
  """Each query's ``k`` most similar training rows (cosine of the sparse inputs) vote for
  their labels, each with ``similarity ** power``; the ``width`` best-voted labels come back
  with their share of the votes. A model holding one (``model.neighbours``) ranks by
  ``(1 - weight) * softmax + weight * votes`` (:func:`slidejax.nn.mix_votes`), ``weight``
  chosen on validation rows by :func:`slidejax.train.calibrate_neighbours` (0 until then).

  What it adds: rows that share most of their words (templated descriptions, forks of one
  package) share their labels, a combination of rare words that the hidden layer, a rank-
  ``hidden`` map trained a few steps per rare word, does not resolve.

  Host backend (default on CPU): the Numba kernel :func:`hostops.neighbour_votes` over the
  feature -> rows index, through a callback; ``jax``: :func:`neighbour_votes_jax`.

  A query's neighbours are searched among the rows that share one of its features held by at
  most ``max_list`` rows (or its rarest feature's rows): see :func:`hostops.neighbour_votes`.

  Attributes:
    post_indptr, post_rows: ``NeighbourIndex`` (int32 ``[D + 1]``, ``[nnz]``): each
      feature's training rows.
    row_indptr, row_ids, row_values: ``NeighbourIndex`` (int32 ``[N + 1]``, int32 and float32
      ``[nnz]``): the training rows, L2-normalised.
    label_indptr, label_ids: ``NeighbourIndex`` (int32 ``[N + 1]``, int32): their labels.
    weight: ``VoteWeight`` float32 scalar.
  """

  WIDTH = 64     # labels kept per query (the model's own top k + WIDTH are mixed with them)
  POWER = 3.0    # each neighbour votes similarity ** POWER (measured: see the README)

  def __init__(self, num_features: int, num_labels: int, rows=None, *, k: int = 30,
               power: float = POWER, width: int = WIDTH, max_list: int = MAX_LIST,
               sizes: dict | None = None, backend: str | None = None):
    """``rows``: the training rows (an :class:`slidejax.data.XCData`); or ``sizes`` (as
    :attr:`spec` holds them) for an empty index to load into."""
    if k <= 0 or width <= 0 or max_list <= 0 or not power > 0:
      raise ValueError(f"NeighbourVotes: k, width, max_list and power must be positive, got "
                       f"{k}, {width}, {max_list}, {power}")
    if rows is not None:
      import hostops  # pylint: disable=import-outside-toplevel
      index = hostops.index_rows(rows.feature_indptr, rows.feature_ids, rows.feature_values,
                                 num_features)
      labels = (rows.label_indptr, rows.label_ids)
      max_labels = max(int(np.diff(labels[0]).max(initial=0)), 1)
    elif sizes is not None:
      nnz, count = sizes["nnz"], sizes["rows"]
      index = (np.zeros(num_features + 1), np.zeros(nnz), np.zeros(count + 1), np.zeros(nnz),
               np.zeros(nnz))
      labels, max_labels = (np.zeros(count + 1), np.zeros(sizes["label_entries"])), \
          sizes["max_labels"]
    else:
      raise ValueError("NeighbourVotes: give the training rows or the sizes of an index")
    self.num_features, self.num_labels = num_features, num_labels
    self.k, self.power, self.width = int(k), float(power), int(width)
    self.max_list, self.max_labels, self.backend = int(max_list), int(max_labels), backend
    as_index = lambda a, dtype: NeighbourIndex(jnp.asarray(a, dtype))  # noqa: E731
    self.post_indptr, self.post_rows = as_index(index[0], jnp.int32), as_index(index[1],
                                                                               jnp.int32)
    self.row_indptr, self.row_ids = as_index(index[2], jnp.int32), as_index(index[3], jnp.int32)
    self.row_values = as_index(index[4], jnp.float32)
    self.label_indptr = as_index(labels[0], jnp.int32)
    self.label_ids = as_index(labels[1], jnp.int32)
    self.weight = VoteWeight(jnp.zeros((), jnp.float32))
    self.spec = {"k": self.k, "power": self.power, "width": self.width,
                 "max_list": self.max_list, "rows": int(self.row_indptr.shape[0] - 1),
                 "nnz": int(self.row_ids.shape[0]), "label_entries": int(self.label_ids.shape[0]),
                 "max_labels": self.max_labels}

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """``[B, F]`` ids and values -> (label ids int32 ``[B, width]``, -1 for none; votes
    float32 ``[B, width]``), best first."""
    from slidejax.lsh import _host  # pylint: disable=import-outside-toplevel
    from slidejax.lsh._tables import resolve_backend  # pylint: disable=import-outside-toplevel
    args = (feature_ids.astype(jnp.int32), feature_values.astype(jnp.float32),
            self.post_indptr[...], self.post_rows[...], self.row_indptr[...], self.row_ids[...],
            self.row_values[...], self.label_indptr[...], self.label_ids[...])
    options = {"num_labels": self.num_labels, "k": self.k, "power": self.power,
               "width": self.width, "max_list": self.max_list}
    if resolve_backend(self.backend) == "host":
      return _host.neighbour_votes(*args, **options)
    return neighbour_votes_jax(*args, max_labels=self.max_labels, **options)
