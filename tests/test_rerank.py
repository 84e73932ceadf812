"""The reranker: its candidates and features against the full softmax, identity ranking,
fitting (kept only when it pays on rows it was not fit on), model files and ``fit``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slidejax import data as xcdata
from slidejax import nn
from slidejax import train


def _data(seed=3, num_labels=100):
  trn, tst = xcdata.synthesize_split(num_points=800, num_features=120, num_labels=num_labels,
                                     avg_nnz=8, avg_labels=2, seed=seed)
  return trn, tst


def _batch(rows, count=32):
  batch = xcdata.pad_rows(rows, np.arange(count), max_features=16, max_labels=1)
  return jnp.asarray(batch.feature_ids), jnp.asarray(batch.feature_values)


def _dense_with_shortcut_and_votes(trn):
  model = nn.DenseMLP(120, trn.num_labels, hidden=8, shortcut=4,
                      links=xcdata.label_links(trn, 4), rngs=nnx.Rngs(0))
  votes = nn.NeighbourVotes(120, trn.num_labels, trn, k=5)
  votes.weight[...] = jnp.float32(0.2)
  model.set_neighbours(votes)
  return model


def test_candidate_features_follow_the_full_softmax(strict_promotion):
  """Each candidate's log-probability, shortcut part and vote against the dense model's full
  logits, its shortcut alone and its votes; the model's top 64 and every voted label are
  candidates, once each."""
  trn, _ = _data()
  model = _dense_with_shortcut_and_votes(trn)
  ids, values = _batch(trn)
  log_count = jnp.asarray(np.log1p(xcdata.label_counts(trn)), jnp.float32)
  cand, feats = map(np.asarray, model.candidates(ids, values, log_count))
  logits = np.asarray(model(ids, values))        # dropout 0: the prediction's logits
  log_probs = logits - np.asarray(jax.scipy.special.logsumexp(logits, axis=1))[:, None]
  short = np.asarray(model.shortcut.add_to(jnp.zeros_like(logits), None, ids, values))
  vote_ids, votes = map(np.asarray, model.neighbours(ids, values))
  column = {name: i for i, name in enumerate(nn.FEATURES)}
  for b in range(len(cand)):
    got = cand[b][cand[b] >= 0]
    assert len(set(got.tolist())) == len(got)
    want = set(np.argsort(-logits[b], kind="stable")[:64].tolist())
    want |= set(vote_ids[b][vote_ids[b] >= 0].tolist())
    assert set(got.tolist()) == want
    keep = cand[b] >= 0
    np.testing.assert_allclose(feats[b, keep, column["log_prob"]], log_probs[b, got],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[b, keep, column["shortcut"]], short[b, got], atol=1e-6)
    vote_of = dict(zip(vote_ids[b].tolist(), votes[b].tolist()))
    np.testing.assert_allclose(feats[b, keep, column["votes"]],
                               [vote_of.get(int(label), 0.0) for label in got], atol=1e-7)
    np.testing.assert_allclose(feats[b, keep, column["log_count"]],
                               np.asarray(log_count)[got])
    assert not feats[b, ~keep].any()


@pytest.mark.parametrize("kind", ["dense", "slide"])
def test_a_fresh_reranker_ranks_as_the_model(kind):
  """As built, the reranker scores each candidate by its log-probability: the model's own
  top k (no votes), for the dense model and the SLIDE one (exact top-k)."""
  trn, _ = _data()
  links = xcdata.label_links(trn, 4)
  if kind == "dense":
    model = nn.DenseMLP(120, 100, hidden=8, shortcut=4, links=links, rngs=nnx.Rngs(1))
  else:
    model = nn.SlideMLP(120, 100, hidden=8, num_active=32, l=4, shortcut=4, links=links,
                        rngs=nnx.Rngs(1))
  ids, values = _batch(trn)
  want_scores, want = model.top_k(ids, values, 5)
  model.set_reranker(nn.Reranker(xcdata.label_counts(trn), rngs=nnx.Rngs(2)))
  scores, got = model.top_k(ids, values, 5)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  log_total = model.ranked(ids, values, 5)[2]
  np.testing.assert_allclose(np.asarray(scores),
                             np.asarray(want_scores) - np.asarray(log_total)[:, None],
                             rtol=1e-5, atol=1e-5)


def test_fit_reranker_learns_what_the_model_misses():
  """An untrained model, rows whose labels are the few most frequent ones: the reranker
  learns to rank by frequency, scores better on the half it was not fit on, is kept, and the
  model then predicts those labels."""
  trn, _ = _data(num_labels=100)
  counts = np.ones(100, np.int64)
  frequent = np.array([7, 23, 41, 66, 90])
  counts[frequent] = [900, 700, 500, 300, 100]
  rng = np.random.default_rng(0)
  labels = [rng.choice(frequent, 1, p=counts[frequent] / counts[frequent].sum())
            for _ in range(400)]
  held = xcdata.subset(trn, np.arange(400))
  held = held._replace(label_indptr=np.arange(401, dtype=np.int64),
                       label_ids=np.concatenate(labels).astype(np.int32))
  model = nn.DenseMLP(120, 100, hidden=8, rngs=nnx.Rngs(0))
  before = train.evaluate_top_k(model, held, batch_size=64, max_features=16)
  result = train.fit_reranker(model, held, counts, key=jax.random.key(0), batch_size=64,
                              max_features=16)
  assert result["used"] and result["cross"] > result["before"] + 0.05
  assert model.reranker is not None and model.spec["reranker"] == model.reranker.spec
  after = train.evaluate_top_k(model, held, batch_size=64, max_features=16)
  assert after["p@1"] > before["p@1"] + 0.3


def test_fit_reranker_is_not_kept_when_it_does_not_pay():
  """Rows whose one label is the model's own first choice: nothing beats it, so the
  reranker is not attached."""
  trn, _ = _data()
  model = nn.DenseMLP(120, 100, hidden=8, rngs=nnx.Rngs(0))
  held = xcdata.subset(trn, np.arange(300))
  ids, values = map(np.asarray, _batch(held, 300))
  first = np.asarray(model.top_k(jnp.asarray(ids), jnp.asarray(values), 1)[1])[:, 0]
  held = held._replace(label_indptr=np.arange(301, dtype=np.int64),
                       label_ids=first.astype(np.int32))
  result = train.fit_reranker(model, held, xcdata.label_counts(trn), key=jax.random.key(0),
                              batch_size=64, max_features=16)
  assert not result["used"] and result["cross"] <= result["before"]
  assert model.reranker is None and result["weights"] is None and "reranker" not in model.spec


def test_model_file_keeps_the_reranker(tmp_path):
  import slidejax
  trn, _ = _data()
  model = _dense_with_shortcut_and_votes(trn)
  reranker = nn.Reranker(xcdata.label_counts(trn), rngs=nnx.Rngs(3))
  reranker.out[...] = jnp.linspace(-1.0, 1.0, reranker.hidden, dtype=jnp.float32)
  model.set_reranker(reranker)
  slidejax.save(model, tmp_path / "m")
  loaded = slidejax.load(tmp_path / "m")
  assert loaded.spec == model.spec and loaded.spec["reranker"] == {"hidden": 16,
                                                                   "candidates": 64}
  ids, values = _batch(trn)
  for got, want in zip(loaded.top_k(ids, values, 5), model.top_k(ids, values, 5)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # the weights matter: the fresh reranker's ranking differs from the saved one's
  model.set_reranker(nn.Reranker(xcdata.label_counts(trn), rngs=nnx.Rngs(3)))
  assert (np.asarray(model.top_k(ids, values, 5)[1])
          != np.asarray(loaded.top_k(ids, values, 5)[1])).any()


@pytest.mark.parametrize("field, value, message", [
    ("reranker", [16], "spec field 'reranker' must be a JSON object"),
    ("reranker.hidden", 0, "spec field 'reranker.hidden' must be an integer of at least 1"),
    ("reranker.candidates", "64", "'reranker.candidates' must be an integer of at least 1")])
def test_a_damaged_reranker_spec_is_one_line(tmp_path, field, value, message):
  import json

  import slidejax
  from slidejax import checkpoint
  trn, _ = _data()
  model = nn.DenseMLP(120, 100, hidden=8, rngs=nnx.Rngs(0))
  model.set_reranker(nn.Reranker(xcdata.label_counts(trn), rngs=nnx.Rngs(3)))
  slidejax.save(model, tmp_path / "m")
  info = json.loads((tmp_path / "m" / "model.json").read_text())
  part, _, name = field.partition(".")
  if name:
    info["spec"][part][name] = value
  else:
    info["spec"][part] = value
  (tmp_path / "m" / "model.json").write_text(json.dumps(info))
  with pytest.raises(checkpoint.ModelFileError, match=message) as error:
    checkpoint.load(tmp_path / "m")
  assert "\n" not in str(error.value)


def test_rerank_option_is_resolved_and_checked(capsys):
  from slidejax.cli import main as cli_main
  trn, _ = xcdata.synthesize_split(num_points=300, num_features=50, num_labels=20, seed=0)
  resolve = lambda **kw: train.resolve_config(train.TrainConfig(**kw), trn)[0]  # noqa: E731
  assert resolve(dense=True, members=1).rerank == "auto"
  assert resolve(dense=True, epochs=2).rerank == "none"         # no validation split
  assert resolve(dense=True).rerank == "none"                   # members
  with pytest.raises(train.TrainingError, match="rerank must be"):
    train.check_options(train.TrainConfig(rerank="yes"))
  with pytest.raises(SystemExit) as stop:
    cli_main(["train", "--rerank", "yes"])
  assert stop.value.code == 2 and "--rerank" in capsys.readouterr().err


def test_fit_keeps_a_reranker_that_pays_and_reports_the_model_it_returns():
  trn, tst = _data(seed=5, num_labels=30)
  logs = []
  result = train.fit(train.TrainConfig(dense=True, hidden=16, epochs=2, validation=0.25,
                                       batch_size=32, members=1, neighbours=0), trn, tst,
                     progress=False, log=logs.append)
  choice = result["reranker"]
  assert set(choice) == {"before", "cross", "used"}
  assert [line for line in logs if line.startswith("reranker: ")]
  model = result["model"]
  assert (model.reranker is not None) == choice["used"]
  got = train.evaluate_top_k(model, tst, batch_size=32,
                             max_features=result["config"]["max_features"])
  assert got["p@1"] == result["p@1"] and got["p@5"] == result["p@5"]
  none = train.fit(train.TrainConfig(dense=True, hidden=16, epochs=2, validation=0.25,
                                     batch_size=32, members=1, neighbours=0, rerank="none"),
                   trn, tst, progress=False, log=lambda message: None)
  assert none["reranker"] is None and none["model"].reranker is None
