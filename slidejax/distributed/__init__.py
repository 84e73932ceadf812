"""Scale-out: the one model laid out over a ``("data", "model")`` device mesh.

There is no second stack: a :class:`slidejax.nn.SlideDense` built with ``shards=S`` (``S`` the
mesh's ``model`` size, or a multiple) keeps its neurons, optimizer state, hash functions and
tables in ``S`` blocks, and :class:`slidejax.train.Trainer` / :func:`slidejax.train.fit` place
each block on its model shard and split batches over ``data``. Example::

  from slidejax import distributed as dist
  mesh = dist.make_mesh(data=2, model=4)            # or dist.mesh_from_spec("data=2,model=4")
  model = slidejax.nn.SlideMLP(num_features, num_labels, shards=4, rngs=nnx.Rngs(0))
  trainer = slidejax.train.Trainer(model, optax.adam(1e-3), mesh=mesh)
  # or: slidejax.train.fit(TrainConfig(mesh="data=2,model=4"), train, test)

Several processes (hosts): call :func:`initialize_distributed` first in every process, then
run the same program on the same global batches.
"""

from slidejax.distributed._layout import BLOCKED_FIELDS
from slidejax.distributed._layout import batch_sharding
from slidejax.distributed._layout import blocked_paths
from slidejax.distributed._layout import check_layout
from slidejax.distributed._layout import global_arrays
from slidejax.distributed._layout import host_value
from slidejax.distributed._layout import place
from slidejax.distributed._layout import relayout
from slidejax.distributed._layout import state_shardings
from slidejax.distributed._mesh import AXES
from slidejax.distributed._mesh import MeshSpecError
from slidejax.distributed._mesh import initialize_distributed
from slidejax.distributed._mesh import make_mesh
from slidejax.distributed._mesh import mesh_from_spec
from slidejax.distributed._mesh import parse_mesh

# What the separate sharded stack exported before, and what replaces it.
_REPLACED = {
    "ShardedSlideConfig": "the options of slidejax.nn.SlideDense (shards=S) or TrainConfig",
    "ShardedSlideState": "slidejax.train.Trainer(model, tx, mesh=mesh).state",
    "ShardLayout": "slidejax.distributed.state_shardings",
    "ShardedBatch": "slidejax.train.TrainBatch",
    "ShardedGrads": "slidejax.value_and_grad",
    "init_sharded": "slidejax.nn.SlideMLP(..., shards=S) placed by "
                    "slidejax.train.Trainer(model, tx, mesh=mesh)",
    "make_layout": "slidejax.distributed.check_layout",
    "shard_batch": "slidejax.train.Trainer.step (it splits batches over 'data')",
    "sharded_train_step": "slidejax.train.Trainer(model, tx, mesh=mesh).step",
    "sharded_loss_and_grads": "slidejax.value_and_grad under jax.set_mesh(mesh)",
    "sharded_softmax_loss": "slidejax.nn.sampled_softmax_loss (XLA adds the collectives)",
    "sharded_rebuild": "slidejax.train.Trainer.rebuild",
    "sharded_top_k": "slidejax.train.Trainer.predict or model.top_k",
    "select_shard_active": "slidejax.nn.SlideDense.select (shards=S)",
    "local_labels": "slidejax.nn.SlideDense.select (shards=S)",
    "per_device_bytes": "the arrays' addressable_shards",
    "estimate_bytes_per_device": "the arrays' addressable_shards",
    "train_sharded": "slidejax.train.fit(TrainConfig(mesh='data=D,model=S'), ...)",
    "evaluate_sharded": "slidejax.train.evaluate_model with Trainer.predict",
    "sharded_config_from": "TrainConfig(mesh='data=D,model=S')",
}


def __getattr__(name: str):
  if name in _REPLACED:
    raise AttributeError(f"slidejax.distributed.{name} was removed with the separate sharded "
                         f"stack (the model itself now lays out on a mesh): use "
                         f"{_REPLACED[name]}")
  raise AttributeError(f"module 'slidejax.distributed' has no attribute {name!r}")
