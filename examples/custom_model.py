"""Your own Flax NNX model with a SlideDense output, trained by your own ``nnx.jit`` step.

The step is the public path: ``slidejax.value_and_grad`` gives row-sparse gradients for the
rows the sparse layers gathered (ordinary ones elsewhere) and ``slidejax.Optimizer`` applies
any optax transformation to just those rows. The same model and step under ``nnx.Optimizer``
and ``nnx.value_and_grad`` (dense gradients over every row) is trained beside it, on the same
batches, with the steps timed alternately (``slidejax.bench.side_by_side``); both are then
evaluated.

Run: ``python examples/custom_model.py`` (3K labels, about a minute on 2 cores) or
``python examples/custom_model.py --labels 200000`` (the README's figure).
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


class DeepSlideNet(nnx.Module):
  """Sparse input -> two ReLU layers (one with LayerNorm) -> SLIDE output."""

  def __init__(self, num_features: int, num_labels: int, *, rngs: nnx.Rngs):
    self.embed = nn.SparseInput(num_features, 256, rngs=rngs)
    self.mid = nnx.Linear(256, 128, rngs=rngs)
    self.norm = nnx.LayerNorm(128, rngs=rngs)
    self.out = nn.SlideDense(128, num_labels, hash="simhash", l=16, num_active=1024,
                             rngs=rngs)

  def hidden(self, feature_ids, feature_values):
    h = jax.nn.relu(self.embed(feature_ids, feature_values))
    return jax.nn.relu(self.norm(self.mid(h)))

  def __call__(self, feature_ids, feature_values, *, labels=None):
    return self.out(self.hidden(feature_ids, feature_values), labels=labels)


def make_step(value_and_grad):
  """The user's step; ``value_and_grad`` is ``slidejax.value_and_grad`` or ``nnx``'s."""

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids, values, labels):
    def loss_fn(model):
      return nn.sampled_softmax_loss(model(ids, values, labels=labels))
    loss, grads = value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return train_step


def evaluate(model, data, batch_size: int, max_features: int) -> dict:
  """P@1 / P@5 (and more) of ``model``'s exact top-5 on ``data``."""
  top_k = nnx.jit(lambda m, ids, values: m.out.top_k(m.hidden(ids, values), 5)[1])
  return train.evaluate_model(lambda ids, values: top_k(model, ids, values), data,
                              batch_size=batch_size, max_features=max_features)


def main(num_labels: int = 3_000, steps: int = 300, points: int = 12_000,
         batch_size: int = 128, log=print) -> dict:
  trn, tst = xcdata.synthesize_split(num_points=points, num_features=5_000,
                                     num_labels=num_labels, seed=0)
  max_features, max_labels = xcdata.suggest_widths(trn)
  paths = {}
  for name, optimizer_cls, value_and_grad in (
      ("slidejax", slidejax.Optimizer, slidejax.value_and_grad),
      ("nnx", nnx.Optimizer, nnx.value_and_grad)):
    model = DeepSlideNet(trn.num_features, trn.num_labels, rngs=nnx.Rngs(0))
    paths[name] = dict(model=model, step=make_step(value_and_grad),
                       optimizer=optimizer_cls(model, optax.adam(1e-3), wrt=nnx.Param))
  step_ms = train_alternately(paths, trn, steps=steps, batch_size=batch_size,
                              max_features=max_features, max_labels=max_labels, log=log)
  result = {"labels": num_labels, "steps": steps, "batch_size": batch_size}
  for name, path in paths.items():
    ms = step_ms[name]
    scores = evaluate(path["model"], tst, batch_size, max_features)
    result[name] = {"step_ms": ms, "p@1": scores["p@1"], "p@5": scores["p@5"]}
    log(f"{name:>9}: {ms:7.1f} ms/step  P@1 {scores['p@1']:.3f}  P@5 {scores['p@5']:.3f}")
  result["speedup"] = result["nnx"]["step_ms"] / result["slidejax"]["step_ms"]
  log(f"slidejax.Optimizer step: {result['speedup']:.1f}x faster than nnx.Optimizer "
      f"({num_labels} labels, slidejax {slidejax.__version__})")
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--labels", type=int, default=3_000)
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  main(args.labels, args.steps)
