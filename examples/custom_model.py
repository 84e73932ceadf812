"""Compose SlideDense into your own Flax NNX model and train it two ways.

1. The fast path: ``slidejax.train.make_sparse_trainer`` gives row-sparse updates to the
   sparse layers (SparseInput, SlideDense) and optax updates to everything else.
2. The plain NNX path: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with ``nnx.grad``. It works
   unchanged (the LSH tables are an ``nnx.Variable``, not a Param), but gradients of the wide
   layer are dense, so it is only for small layers.

Run: ``python examples/custom_model.py`` (synthetic data, about a minute on 2 cores).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import slidejax
from slidejax import data as xcdata
from slidejax import nn
from slidejax import train


class DeepSlideNet(nnx.Module):
  """Sparse input -> two ReLU layers -> SLIDE output."""

  def __init__(self, num_features: int, num_labels: int, *, rngs: nnx.Rngs):
    self.embed = nn.SparseInput(num_features, 256, rngs=rngs)
    self.mid = nnx.Linear(256, 128, rngs=rngs)
    self.norm = nnx.LayerNorm(128, rngs=rngs)
    self.out = nn.SlideDense(128, num_labels, hash="simhash", l=16, num_active=512,
                             mode="shared", rngs=rngs)

  def hidden(self, feature_ids, feature_values):
    h = jax.nn.relu(self.embed(feature_ids, feature_values))
    return jax.nn.relu(self.norm(self.mid(h)))

  def __call__(self, feature_ids, feature_values, *, labels=None, key=None):
    return self.out(self.hidden(feature_ids, feature_values), labels=labels, key=key)

  def top_k(self, feature_ids, feature_values, k, *, exact=True, key=None):
    return self.out.top_k(self.hidden(feature_ids, feature_values), k, exact=exact, key=key)


def main(steps: int = 300, batch_size: int = 128) -> None:
  trn, tst = xcdata.synthesize_split(num_points=12_000, num_features=5_000, num_labels=3_000,
                                     seed=0)
  max_features, max_labels = xcdata.suggest_widths(trn)

  # 1. Fast row-sparse training.
  model = DeepSlideNet(trn.num_features, trn.num_labels, rngs=nnx.Rngs(0))
  trainer = train.make_sparse_trainer(model, optax.adam(1e-3), optax.adam(1e-3),
                                      batch_size=batch_size, max_features=max_features)
  state = trainer.init()
  key = jax.random.key(0)
  step = 0
  epoch = 0
  while step < steps:
    for batch in xcdata.iterate_batches(trn, batch_size, max_features=max_features,
                                        max_labels=max_labels, seed=0, epoch=epoch):
      state, out = trainer.step(state, train.TrainBatch(
          batch.feature_ids, batch.feature_values, batch.label_ids,
          np.asarray(batch.rows).astype(np.int32)), jax.random.fold_in(key, step))
      step += 1
      if step % 100 == 0:
        state = trainer.rebuild(state, jax.random.fold_in(key, 10**6 + step))
        print(f"step {step}: loss {float(out.loss):.3f}")
      if step >= steps:
        break
    epoch += 1
  predict = train.make_predictor(trainer, model, 5)
  result = train.evaluate_model(predict, state, tst, batch_size=batch_size,
                                max_features=max_features)
  print(f"row-sparse training: P@1 {result['p@1']:.3f}  P@5 {result['p@5']:.3f}")

  # 2. The plain NNX way (dense gradients; fine for this small layer).
  model2 = DeepSlideNet(trn.num_features, trn.num_labels, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model2, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, ids, values, labels, key):
    def loss_fn(model):
      return nn.sampled_softmax_loss(model(ids, values, labels=labels, key=key))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for i, batch in enumerate(xcdata.iterate_batches(trn, batch_size, max_features=max_features,
                                                   max_labels=max_labels, seed=1)):
    loss = nnx_step(model2, optimizer, jnp.asarray(batch.feature_ids),
                    jnp.asarray(batch.feature_values), jnp.asarray(batch.label_ids),
                    jax.random.fold_in(key, i))
    if i == 50:
      break
  print(f"nnx.Optimizer path: loss after 50 steps {float(loss):.3f}")
  print(f"slidejax {slidejax.__version__}")


if __name__ == "__main__":
  main()
