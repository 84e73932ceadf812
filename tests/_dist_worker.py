"""Helper of tests/test_distributed.py: one process of a 2-process ``fit`` on a mesh.

  python tests/_dist_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR EPOCHS RESUME [SAVE]

Each process gets 2 local CPU devices and gloo collectives, joins the job through
``jax.distributed.initialize``, and runs :func:`slidejax.train.fit` with ``mesh="data=2,model=2"``
over the 4 global devices on :func:`problem` (the same data in every process), checkpointing
every 20 steps to ``CHECKPOINT_DIR`` (resuming from it when ``RESUME`` is 1), and saves the
trained model to ``SAVE`` when given. It prints ``RESULT {..}``: steps, P@1 and a checksum of
the trained parameters (JSON).
"""
from __future__ import annotations

import json
import sys
import zlib

import numpy as np

MESH = "data=2,model=2"


def problem():
  """(train, test): a small synthetic split, the same in every process."""
  from slidejax import data as xcdata
  return xcdata.synthesize_split(1200, 300, 196, seed=0, avg_nnz=6, avg_labels=1.5,
                                 test_fraction=0.25)


def config(epochs: int):
  """A constant-rate run (extending it by an epoch continues it exactly) with pure-JAX tables
  (each process's first CPU device is in the mesh: host callbacks cannot run there) and no
  shortcut (none on a mesh's model axis, so one-device runs compare alike)."""
  from slidejax.train import TrainConfig
  return TrainConfig(hidden=16, l=4, bucket_capacity=8, num_active=64, batch_size=32,
                     epochs=epochs, lr=5e-3, schedule="constant", dropout=0.0, shortcut=0,
                     rebuild_first=5, seed=3, builder="jax", mesh=MESH, checkpoint_every=20)


def checksum(model) -> int:
  """CRC-32 of every trained parameter's whole value (gathered from every process)."""
  import jax
  from flax import nnx

  from slidejax.distributed import host_value
  crc = 0
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    crc = zlib.crc32(np.ascontiguousarray(host_value(leaf)).view(np.uint8).reshape(-1), crc)
  return crc


def main(argv: list[str]) -> int:
  process_id, num_processes, port = (int(a) for a in argv[1:4])
  directory, epochs, resume = argv[4], int(argv[5]), argv[6] == "1"
  save = argv[7] if len(argv) > 7 else None
  import jax

  from slidejax import checkpoint
  from slidejax import distributed as dist
  from slidejax import train
  # = jax.config.update: jax_platforms "cpu", jax_num_cpu_devices 2,
  # jax_cpu_collectives_implementation "gloo"; then jax.distributed.initialize(...).
  dist.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id, cpu_devices=2,
                              timeout=60)
  trn, tst = problem()
  result = train.fit(config(epochs), trn, tst, checkpoint_dir=directory, resume=resume,
                     progress=False, log=lambda message: None)
  if save:
    checkpoint.save(result["model"], save)
  print(f"DEVICES global={jax.device_count()} local={jax.local_device_count()}", flush=True)
  print("RESULT " + json.dumps({"steps": result["steps"], "p@1": result["p@1"],
                                "checksum": checksum(result["model"])}), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
