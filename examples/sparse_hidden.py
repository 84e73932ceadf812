"""A network whose HIDDEN layer is a SlideDense: a wide layer that computes only the neurons
its LSH tables select, and a next layer that reads only those neurons' rows.

Network (``B`` batch, ``F`` features, ``N`` hidden neurons, ``M`` of them active per batch)::

  SparseInput(F, 128) -> ReLU                          h     [B, 128]
  SlideDense(128, N, mode="shared", policy="topk")     logits [B, M], ids [M] (by LSH of h)
  ReLU                                                 acts  [B, M] (padding slots: 0)
  SparseInput(N, 128)(ids [M], acts [B, M])            z     [B, 128] (reads the M rows)
  ReLU -> nnx.Linear(128, labels)                      logits [B, labels], full softmax

Its dense twin (``hidden_mode="dense"``) is the same network, from the same initial weights,
with every hidden neuron computed (``ids`` is then all ``N``: the next layer is one
``[B, N] @ [N, 128]`` product). Both train on the same batches with the public path
(``slidejax.value_and_grad``, ``slidejax.Optimizer``), steps timed alternately, and are
evaluated on the test split (the sparse one through its sparse hidden layer with a fixed
selection key; the labels exactly).

The hidden layer selects with ``policy="topk"`` and no uniform share: a batch's buckets cover
nearly every hidden neuron, so the default ``vanilla`` policy (a random subset of the union)
is no better than random ids there; and its kernel is drawn with the fan-in of its input
(``lecun_normal`` over the width), not the output layer's default ``1/sqrt(N)``.

Run: ``python examples/sparse_hidden.py`` (16,384 hidden neurons, 1,024 active, 1,000
labels, 400 steps; about a minute on 2 cores). README: Results, "A sparse hidden layer".
"""
from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

import slidejax
from slidejax import data as xcdata
from slidejax import nn
from slidejax import train
from slidejax.bench.side_by_side import train_alternately

EVAL_KEY = 1234   # the sparse hidden layer's selection key when evaluating


class SparseHiddenNet(nnx.Module):
  """Sparse input -> LSH-sparse hidden layer -> its active rows' next layer -> labels.

  Attributes:
    embed: ``SparseInput``, kernel ``[num_features, width]``.
    wide: ``SlideDense``, kernel ``[hidden_neurons, width]`` (one row per hidden neuron);
      ``hidden_mode`` ``shared`` (``num_active`` neurons per batch), ``per_sample``
      (``num_active`` per sample) or ``dense`` (all of them).
    gather: ``SparseInput``, kernel ``[hidden_neurons, width]``: row ``j`` is what hidden
      neuron ``j`` adds to the next layer, so a sparse hidden layer reads its active rows only.
    out: ``nnx.Linear`` ``width -> num_labels``.
  """

  def __init__(self, num_features: int, num_labels: int, *, hidden_neurons: int = 16_384,
               num_active: int = 1_024, hidden_mode: str = "shared", width: int = 128,
               l: int = 50, policy: str = "topk", uniform_share: float = 0.0,
               rngs: nnx.Rngs):
    # The wide layer is built last: in dense mode it draws no hash functions or tables, so
    # every layer starts from the same weights in both modes.
    self.embed = nn.SparseInput(num_features, width, rngs=rngs)
    self.gather = nn.SparseInput(
        hidden_neurons, width, rngs=rngs,
        kernel_init=nnx.initializers.normal(stddev=1.0 / min(num_active, hidden_neurons) ** 0.5))
    self.out = nnx.Linear(width, num_labels, rngs=rngs)
    # policy "topk": the neurons most of the batch's (sample, table) lookups hit. The default
    # "vanilla" (a random subset of the candidate union) is no better than random ids here:
    # a batch's buckets cover nearly every hidden neuron.
    self.wide = nn.SlideDense(
        width, hidden_neurons, num_active=min(num_active, hidden_neurons), mode=hidden_mode,
        hash="simhash", l=l, policy=policy, uniform_share=uniform_share,
        # lecun_normal over the true fan-in (the input width), as a hidden layer wants
        kernel_init=nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2), rngs=rngs)

  def hidden(self, feature_ids: jax.Array, feature_values: jax.Array, *,
             key: jax.Array | None = None) -> jax.Array:
    """int32 ``[B, F]`` ids, float32 ``[B, F]`` values -> float32 ``[B, width]``.

    ``key``: the sparse hidden layer's selection key (None: the layer's own stream).
    """
    h = jax.nn.relu(self.embed(feature_ids, feature_values))
    wide = self.wide(h, key=key)        # no labels: the hidden set comes from LSH alone
    acts = jax.nn.relu(wide.logits)     # [B, M] | [B, m] | [B, N]; padding slots -> 0
    # the active neurons' rows only: ids [M] (shared; dense: all N) or [B, m] (per-sample)
    return jax.nn.relu(self.gather(wide.ids, acts))

  def __call__(self, feature_ids: jax.Array, feature_values: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Label logits float32 ``[B, num_labels]``."""
    return self.out(self.hidden(feature_ids, feature_values, key=key))


def make_step(value_and_grad):
  """The user's step; ``value_and_grad`` is ``slidejax.value_and_grad`` or ``nnx``'s."""

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids, values, labels):
    def loss_fn(model):
      return nn.dense_softmax_loss(model(ids, values), labels)
    loss, grads = value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return train_step


def evaluate(model, data, batch_size: int, max_features: int) -> dict:
  """P@1 / P@5 (and more) of the exact top-5 labels, through the hidden layer as trained
  (the sparse one with a fixed selection key)."""
  top_k = nnx.jit(lambda m, ids, values: jax.lax.top_k(
      m(ids, values, key=jax.random.key(EVAL_KEY)), 5)[1])
  return train.evaluate_model(lambda ids, values: top_k(model, ids, values), data,
                              batch_size=batch_size, max_features=max_features)


def main(hidden_neurons: int = 16_384, num_labels: int = 1_000, steps: int = 400,
         points: int = 16_000, *, num_active: int = 1_024, sparse_mode: str = "shared",
         batch_size: int = 128, num_features: int = 5_000, log=print) -> dict:
  """Trains the sparse-hidden network and its dense twin on the same batches.

  Returns ``{"sparse": {"step_ms", "p@1", "p@5"}, "dense": {...}, "speedup": dense step /
  sparse step, ...}``.
  """
  trn, tst = xcdata.synthesize_split(num_points=points, num_features=num_features,
                                     num_labels=num_labels, seed=0)
  max_features, max_labels = xcdata.suggest_widths(trn)
  variants = {}
  for name, mode in (("sparse", sparse_mode), ("dense", "dense")):
    model = SparseHiddenNet(trn.num_features, trn.num_labels, hidden_neurons=hidden_neurons,
                            num_active=num_active, hidden_mode=mode, rngs=nnx.Rngs(0))
    variants[name] = dict(model=model, step=make_step(slidejax.value_and_grad),
                          optimizer=slidejax.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param))
  step_ms = train_alternately(variants, trn, steps=steps, batch_size=batch_size,
                              max_features=max_features, max_labels=max_labels, log=log)
  result = {"hidden_neurons": hidden_neurons, "num_active": num_active,
            "sparse_mode": sparse_mode, "labels": num_labels, "steps": steps,
            "batch_size": batch_size}
  for name, v in variants.items():
    ms = step_ms[name]
    scores = evaluate(v["model"], tst, batch_size, max_features)
    result[name] = {"step_ms": ms, "p@1": scores["p@1"], "p@5": scores["p@5"]}
    log(f"{name:>6}: {ms:7.1f} ms/step  P@1 {scores['p@1']:.3f}  P@5 {scores['p@5']:.3f}")
  result["speedup"] = result["dense"]["step_ms"] / result["sparse"]["step_ms"]
  log(f"sparse hidden layer ({num_active} of {hidden_neurons} neurons, {sparse_mode}): "
      f"dense step / sparse step = {result['speedup']:.2f} ({num_labels} labels, "
      f"slidejax {slidejax.__version__})")
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=16_384)
  parser.add_argument("--active", type=int, default=1_024)
  parser.add_argument("--mode", default="shared", choices=("shared", "per_sample"))
  parser.add_argument("--labels", type=int, default=1_000)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--points", type=int, default=16_000)
  args = parser.parse_args()
  main(args.hidden, args.labels, args.steps, args.points, num_active=args.active,
       sparse_mode=args.mode)
