"""Scale-out: a model-parallel SLIDE output layer over a ``("data", "model")`` device mesh.

The labels are split into ``model`` contiguous shards (kernel rows, bias, LSH tables, hash
functions and row-sparse Adam state of each shard live on its devices); the batch is split
over ``data``. Example::

  from slidejax import distributed as dist
  mesh = dist.make_mesh(data=2, model=4)            # or dist.mesh_from_spec("data=2,model=4")
  state = dist.init_sharded(jax.random.key(0), mesh, num_features, num_labels, hidden=128,
                            config=dist.ShardedSlideConfig(num_active_per_shard=1024))
  state, loss = dist.sharded_train_step(state, batch, key)    # jitted, state donated
  state = dist.sharded_rebuild(state, key)                    # tables, on each shard
  top = dist.sharded_top_k(state, feature_ids, feature_values, 5)  # exact, numpy [B, 5]

Several processes (hosts): call :func:`initialize_distributed` first in every process, then
run the same program on the same global batches. See ``_sharded.py`` for the design.
"""

from slidejax.distributed._mesh import AXES
from slidejax.distributed._mesh import MeshSpecError
from slidejax.distributed._mesh import initialize_distributed
from slidejax.distributed._mesh import make_mesh
from slidejax.distributed._mesh import mesh_from_spec
from slidejax.distributed._mesh import parse_mesh
from slidejax.distributed._sharded import ShardLayout
from slidejax.distributed._sharded import ShardedBatch
from slidejax.distributed._sharded import ShardedGrads
from slidejax.distributed._sharded import ShardedSlideConfig
from slidejax.distributed._sharded import ShardedSlideState
from slidejax.distributed._sharded import estimate_bytes_per_device
from slidejax.distributed._sharded import init_sharded
from slidejax.distributed._sharded import local_labels
from slidejax.distributed._sharded import make_layout
from slidejax.distributed._sharded import per_device_bytes
from slidejax.distributed._sharded import select_shard_active
from slidejax.distributed._sharded import shard_batch
from slidejax.distributed._sharded import sharded_loss_and_grads
from slidejax.distributed._sharded import sharded_rebuild
from slidejax.distributed._sharded import sharded_softmax_loss
from slidejax.distributed._sharded import sharded_top_k
from slidejax.distributed._sharded import sharded_train_step
from slidejax.distributed._train import evaluate_sharded
from slidejax.distributed._train import sharded_config_from
from slidejax.distributed._train import train_sharded
