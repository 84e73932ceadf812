"""Neighbour votes: the Numba kernel and its JAX twin against a brute-force definition, the
mixture against the full softmax, calibration, and model files."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slidejax import data as xcdata
from slidejax import nn


def _random_rows(rng, num_rows, num_features, num_labels, width=6, labels=3):
  """XCData of random sparse rows (some without features or labels; every tenth a copy of
  the features before it, so that similarities tie)."""
  feats, vals, labs = [], [], []
  for r in range(num_rows):
    n = 0 if r % 17 == 5 else int(rng.integers(1, width + 1))
    copy = r % 10 == 9
    feats.append(feats[-1] if copy else rng.choice(num_features, n, replace=False)
                 .astype(np.int32))
    vals.append(vals[-1] if copy else rng.uniform(0.1, 1.0, n).astype(np.float32))
    labs.append(rng.choice(num_labels, int(rng.integers(0 if r % 13 == 3 else 1, labels + 1)),
                           replace=False).astype(np.int32))
  indptr = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])])  # noqa
  return xcdata.XCData(indptr(feats).astype(np.int64), np.concatenate(feats),
                       np.concatenate(vals), indptr(labs).astype(np.int64),
                       np.concatenate(labs), num_rows, num_features, num_labels)


def _brute_force(rows, query_ids, query_values, num_labels, k, power, width, max_list):
  """The definition: cosine over dense vectors among the rows sharing a query feature held by
  at most max(max_list, the query's shortest list) rows, the k best (ties: lower row), votes:
  (ids, votes) ``[B, width]`` as the layer gives them, and every label's vote ``[B, L]``."""
  dense = np.zeros((rows.num_points, rows.num_features))
  for r in range(rows.num_points):
    a, b = rows.feature_indptr[r], rows.feature_indptr[r + 1]
    dense[r, rows.feature_ids[a:b]] = rows.feature_values[a:b]
  norms = np.linalg.norm(dense, axis=1, keepdims=True)
  dense = dense / np.where(norms > 0, norms, 1)
  out_ids = np.full((len(query_ids), width), -1)
  out_votes = np.zeros((len(query_ids), width))
  every_vote = np.zeros((len(query_ids), num_labels))
  for b, (ids, values) in enumerate(zip(query_ids, query_values)):
    q = np.zeros(rows.num_features)
    keep = ids >= 0
    np.add.at(q, ids[keep], values[keep])
    if not np.linalg.norm(q):
      continue
    sim = dense @ (q / np.linalg.norm(q))
    held_by = (dense != 0).sum(0)
    mine = np.flatnonzero(q)
    limit = max(max_list, held_by[mine].min())
    near = (dense[:, mine[held_by[mine] <= limit]] != 0).any(1)
    order = sorted((r for r in range(rows.num_points) if sim[r] > 0 and near[r]),
                   key=lambda r: (-sim[r], r))
    votes = np.zeros(num_labels)
    for r in order[:k]:
      votes[rows.label_ids[rows.label_indptr[r]:rows.label_indptr[r + 1]]] += sim[r] ** power
    best = sorted((l for l in range(num_labels) if votes[l] > 0), key=lambda l: (-votes[l], l))
    best = best[:width]
    out_ids[b, :len(best)] = best
    out_votes[b, :len(best)] = votes[best] / votes.sum()
    every_vote[b] = votes / max(votes.sum(), 1e-300)
  return out_ids, out_votes, every_vote


@pytest.mark.parametrize("backend", ["host", "jax"])
def test_votes_follow_their_definition(backend):
  rng = np.random.default_rng(0)
  rows = _random_rows(rng, 120, 30, 25)
  queries = _random_rows(rng, 40, 30, 25)
  batch = xcdata.pad_rows(queries, np.arange(40), max_features=8, max_labels=1)
  ids, values = np.asarray(batch.feature_ids), np.asarray(batch.feature_values)
  for k, power, width, max_list in ((1, 1.0, 3, 4096), (7, 3.0, 5, 4096), (200, 2.0, 30, 4096),
                                    (7, 3.0, 5, 18), (200, 1.0, 30, 1)):
    votes = nn.NeighbourVotes(30, 25, rows, k=k, power=power, width=width, max_list=max_list,
                              backend=backend)
    got_ids, got_votes = jax.jit(lambda i, v: votes(i, v))(jnp.asarray(ids),
                                                           jnp.asarray(values))
    want_ids, want_votes, every_vote = _brute_force(rows, ids, values, 25, k, power, width,
                                                        max_list)
    got_ids, got_votes = np.asarray(got_ids), np.asarray(got_votes)
    np.testing.assert_allclose(got_votes, want_votes, rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(got_ids < 0, want_ids < 0)
    # each returned label carries its own vote (labels whose votes tie may come in either
    # order: float32 sums against float64 ones)
    np.testing.assert_allclose(np.take_along_axis(every_vote, np.maximum(got_ids, 0), 1)
                               * (got_ids >= 0), got_votes, rtol=2e-5, atol=1e-7)
    assert np.mean(got_ids == want_ids) > 0.95


def _model_with_votes(rng, weight, num_labels=12):
  rows = _random_rows(rng, 60, 20, num_labels)
  model = nn.DenseMLP(20, num_labels, hidden=8, rngs=nnx.Rngs(0))
  model.bias[...] = jnp.asarray(rng.normal(size=num_labels), jnp.float32)
  votes = nn.NeighbourVotes(20, num_labels, rows, k=5, width=num_labels)
  votes.weight[...] = jnp.float32(weight)
  model.set_neighbours(votes)
  return model, rows


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_mixed_top_k_is_the_mixture_over_every_label(weight):
  rng = np.random.default_rng(1)
  model, rows = _model_with_votes(rng, weight)
  batch = xcdata.pad_rows(rows, np.arange(16), max_features=8, max_labels=1)
  ids, values = jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values)
  scores, top = model.top_k(ids, values, 4)
  probs = np.asarray(jax.nn.softmax(model(ids, values), axis=1))
  vote_ids, votes = map(np.asarray, model.neighbours(ids, values))
  dense_votes = np.zeros_like(probs)
  for b in range(len(probs)):
    keep = vote_ids[b] >= 0
    dense_votes[b, vote_ids[b][keep]] = votes[b][keep]
  mixed = (1 - weight) * probs + weight * dense_votes
  np.testing.assert_allclose(np.asarray(scores), -np.sort(-mixed, axis=1)[:, :4], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(np.take_along_axis(mixed, np.asarray(top), 1),
                             np.asarray(scores), rtol=1e-5, atol=1e-7)
  model.set_neighbours(None)
  np.testing.assert_array_equal(np.asarray(model.top_k(ids, values, 4)[1]),
                                np.argsort(-probs, axis=1, kind="stable")[:, :4])


def test_model_file_keeps_the_votes(tmp_path):
  import slidejax
  rng = np.random.default_rng(2)
  model, rows = _model_with_votes(rng, 0.25)
  slidejax.save(model, tmp_path / "m")
  loaded = slidejax.load(tmp_path / "m")
  assert loaded.spec == model.spec and float(loaded.neighbours.weight[...]) == 0.25
  batch = xcdata.pad_rows(rows, np.arange(16), max_features=8, max_labels=1)
  ids, values = jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values)
  for got, want in zip(loaded.top_k(ids, values, 5), model.top_k(ids, values, 5)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_calibration_scores_what_the_model_then_predicts():
  """Held-out rows that copy training rows: the votes win, and the chosen setting's score is
  the attached model's own (the grid's fast scoring and ``top_k`` agree)."""
  from slidejax import train
  trn, _ = xcdata.synthesize_split(num_points=600, num_features=120, num_labels=30, avg_nnz=8,
                                   avg_labels=2, seed=3)
  rows, held = xcdata.subset(trn, np.arange(400)), xcdata.subset(trn, np.arange(40, 140))
  model = nn.DenseMLP(120, 30, hidden=8, rngs=nnx.Rngs(0))
  choice = train.calibrate_neighbours(model, held, rows, ks=(1, 5), batch_size=64)
  assert choice["weight"] > 0 and choice["k"] in (1, 5) and choice["after"] > choice["before"]
  assert model.neighbours is None   # left as it was
  train.attach_neighbours(model, rows, choice)
  got = train.evaluate_top_k(model, held, batch_size=64, max_features=32)
  assert abs((got["p@1"] + got["p@3"] + got["p@5"]) / 3 - choice["after"]) < 1e-6
  train.attach_neighbours(model, rows, dict(choice, weight=0.0))   # weight 0: nothing changes
  assert model.neighbours.weight[...] == choice["weight"]


def test_votes_through_the_lsh_tables():
  """``exact=False`` mixes the votes with a softmax over each sample's candidates."""
  rng = np.random.default_rng(4)
  rows = _random_rows(rng, 60, 20, 40)
  model = nn.SlideMLP(20, 40, hidden=8, num_active=16, l=4, rngs=nnx.Rngs(0))
  nn.rebuild_tables(model)
  votes = nn.NeighbourVotes(20, 40, rows, k=5)
  votes.weight[...] = jnp.float32(0.5)
  model.set_neighbours(votes)
  batch = xcdata.pad_rows(rows, np.arange(16), max_features=8, max_labels=1)
  ids, values = jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values)
  scores, top = model.top_k(ids, values, 5, exact=False)
  own, own_ids, log_total = model.ranked(ids, values, 5 + votes.width, exact=False)
  vote_ids, vote_shares = votes(ids, values)
  want = nn.mix_votes(own, own_ids, log_total, vote_ids, vote_shares, jnp.float32(0.5), 5)
  np.testing.assert_array_equal(np.asarray(top), np.asarray(want[1]))
  # the candidates' softmax: its normaliser is below the full one's
  assert (np.asarray(log_total) <= np.asarray(model.ranked(ids, values, 5)[2]) + 1e-5).all()


def test_neighbours_option_is_resolved_and_checked(capsys):
  from slidejax import train
  from slidejax.cli import main as cli_main
  trn, _ = xcdata.synthesize_split(num_points=300, num_features=50, num_labels=20, seed=0)
  resolve = lambda **kw: train.resolve_config(train.TrainConfig(**kw), trn)[0]  # noqa: E731
  assert resolve(dense=True).neighbours == "auto"
  assert resolve(dense=True, epochs=2).neighbours == 0            # no validation split
  with pytest.raises(train.TrainingError, match="no validation split"):
    resolve(dense=True, epochs=2, neighbours=10)
  with pytest.raises(train.TrainingError, match="neighbours must be"):
    train.check_options(train.TrainConfig(neighbours=-1))
  assert cli_main(["train", "--neighbours", "-3"]) == 2
  assert "neighbours must be" in capsys.readouterr().err


def test_fit_chooses_votes_and_reports_the_model_it_returns():
  """Every row twice (so held-out rows have a twin among the trained ones): the votes win on
  the split, and the returned model, votes included, scores what ``fit`` reported."""
  from slidejax import train
  base, _ = xcdata.synthesize_split(num_points=500, num_features=120, num_labels=30,
                                    avg_nnz=8, avg_labels=2, seed=5)
  trn = xcdata.subset(base, np.concatenate([np.arange(base.num_points)] * 2))
  tst = xcdata.subset(base, np.arange(100))
  logs = []
  result = train.fit(train.TrainConfig(dense=True, hidden=16, epochs=2, validation=0.2,
                                       batch_size=32, members=1), trn, tst, progress=False,
                     log=logs.append)
  choice = result["neighbours"]
  assert choice["weight"] > 0 and choice["after"] > choice["before"]
  assert [line for line in logs if line.startswith("neighbour votes:")]
  model = result["model"]
  assert model.neighbours.k == choice["k"] and float(model.neighbours.weight[...]) == pytest.approx(
      choice["weight"])
  assert model.neighbours.spec["rows"] == trn.num_points     # every training row is searched
  got = train.evaluate_top_k(model, tst, batch_size=32,
                             max_features=result["config"]["max_features"])
  assert got["p@1"] == result["p@1"] and got["p@5"] == result["p@5"]
