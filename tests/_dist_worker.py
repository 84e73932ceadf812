"""Helper of tests/test_distributed.py: the shared test problem and a few training steps.

Imported by the test (sizes, configurations, ``train``), and run as a script, one process of
a multi-process job::

  python tests/_dist_worker.py PROCESS_ID NUM_PROCESSES PORT STEPS

Each process gets 2 local CPU devices and gloo collectives, joins the job through
``jax.distributed.initialize``, builds the global ``data=2, model=2`` mesh over all 4 devices,
trains ``STEPS`` steps (with a table rebuild) and prints ``LOSSES [..]`` and the exact
``TOPK [[..]]`` of 10 points (JSON lines).

The tests share these sizes and configurations so that their compiled programs are reused.
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np

NUM_FEATURES = 500
NUM_LABELS = 197  # 99 per shard on 2 shards (1 dead padding neuron), 50 on 4 (3 dead)
HIDDEN = 32
BATCH = 64
WIDTH = 8        # features per point
MAX_LABELS = 2


def lsh_config(num_active_per_shard: int = 64):
  from slidejax import distributed as dist
  return dist.ShardedSlideConfig(num_active_per_shard=num_active_per_shard, l=8,
                                 bucket_capacity=8, lr=3e-3)


def exact_config():
  from slidejax import distributed as dist
  return dist.ShardedSlideConfig(all_active=True, l=8, bucket_capacity=8, lr=3e-3, chunk_size=32)


def batches(steps: int, seed: int = 0) -> list[SimpleNamespace]:
  """The same global batches in every process (numpy, seeded)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    out.append(SimpleNamespace(
        feature_ids=rng.integers(0, NUM_FEATURES, (BATCH, WIDTH)).astype(np.int32),
        feature_values=rng.random((BATCH, WIDTH)).astype(np.float32),
        label_ids=rng.integers(0, NUM_LABELS, (BATCH, MAX_LABELS)).astype(np.int32),
        rows=np.arange(BATCH, dtype=np.int32)))
  return out


def train(mesh, steps: int):
  """LSH training on ``mesh`` from a fixed seed: (loss of every step, final state)."""
  import jax

  from slidejax import distributed as dist
  state = dist.init_sharded(jax.random.key(0), mesh, NUM_FEATURES, NUM_LABELS, HIDDEN,
                            lsh_config())
  losses = []
  for i, batch in enumerate(batches(steps)):
    state, loss = dist.sharded_train_step(state, batch, jax.random.key(100 + i))
    if i == 1:
      state = dist.sharded_rebuild(state, jax.random.key(7))
    losses.append(float(loss))
  return losses, state


def top_k(state, k: int = 5) -> np.ndarray:
  """Exact top-``k`` labels of the first 10 points of batch 0."""
  from slidejax import distributed as dist
  batch = batches(1)[0]
  return dist.sharded_top_k(state, batch.feature_ids[:10], batch.feature_values[:10], k)


def main(argv: list[str]) -> int:
  process_id, num_processes, port, steps = (int(a) for a in argv[1:5])
  import jax

  from slidejax import distributed as dist
  # = jax.config.update: jax_platforms "cpu", jax_num_cpu_devices 2,
  # jax_cpu_collectives_implementation "gloo"; then jax.distributed.initialize(...).
  dist.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id, cpu_devices=2,
                              timeout=60)
  mesh = dist.make_mesh(data=2, model=2)
  losses, state = train(mesh, steps)
  print(f"DEVICES global={jax.device_count()} local={jax.local_device_count()}", flush=True)
  print("LOSSES " + json.dumps(losses), flush=True)
  print("TOPK " + json.dumps(top_k(state).tolist()), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
