"""``slidejax bench SCENARIO --mesh data=D,model=S``: the step on a mesh beside one device.

The same model (a shared-mode :class:`slidejax.nn.SlideMLP`, ``num_active`` in total) is timed
on one device (one block) and laid out on the mesh (``S`` blocks), alternately in one process.
What each mesh step communicates is read from its compiled program: the per-device result
bytes of every collective XLA inserted (all-reduce, all-gather, ...), against what one
all-reduce of the dense gradients of every parameter would carry.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax
import optax
from flax import nnx

from slidejax import distributed
from slidejax import nn
from slidejax import train
from slidejax.bench.steps import Scenario
from slidejax.bench.steps import random_batches

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_OP = re.compile(r"= (\([^=]*\)|\S+) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _array_bytes(dtype: str, dims: str) -> int:
  size = 1
  for d in filter(None, dims.split(",")):
    size *= int(d)
  return size * (_BYTES[dtype] if dtype in _BYTES else int(dtype[1:]) // 8)


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each collective kind produces per device in one run of a compiled (SPMD) program,
  from its HLO text: ``{kind: bytes}`` (a ``-start``/``-done`` pair counted once)."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if match:
      totals[match.group(2)] += sum(_array_bytes(t, d) for t, d in _ARRAY.findall(match.group(1)))
  return totals


def _model(s: Scenario, num_active: int, shards: int, backend: str | None) -> nn.SlideMLP:
  return nn.SlideMLP(s.features, s.labels, hidden=s.hidden, num_active=num_active,
                     shards=shards, backend=backend, rngs=nnx.Rngs(0))


def _step_ms(trainer, batch) -> float:
  t0 = time.perf_counter()
  trainer.step(batch).loss.block_until_ready()
  return 1e3 * (time.perf_counter() - t0)


def run(s: Scenario, mesh_spec: str, *, num_active: int = 2048, repeats: int = 10,
        backend: str | None = None, log=print) -> dict[str, Any]:
  """Times the one-device step and the mesh step of scenario ``s`` alternately; returns step
  times, their ratio, and the bytes each mesh step communicates per device."""
  sizes = distributed.parse_mesh(mesh_spec)
  mesh = distributed.make_mesh(**sizes)
  batches = random_batches(s, 8)
  one = train.Trainer(_model(s, num_active, 1, backend), optax.adam(1e-4))
  laid = train.Trainer(_model(s, num_active, sizes["model"], backend), optax.adam(1e-4),
                       mesh=mesh)
  shape = (s.batch_size, s.max_features, s.max_labels)
  hlo = laid.compile(*shape).as_text()
  one.compile(*shape)
  moved = collective_bytes(hlo)
  params = sum(x.size * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(one.model, nnx.Param)))
  times = {"one_device": [], "mesh": []}
  for i in range(2 + repeats):   # alternately; the first two warm up
    batch = batches[i % len(batches)]
    one_ms, mesh_ms = _step_ms(one, batch), _step_ms(laid, batch)
    if i >= 2:
      times["one_device"].append(one_ms)
      times["mesh"].append(mesh_ms)
  one_ms = statistics.median(times["one_device"])
  mesh_ms = statistics.median(times["mesh"])
  total = sum(moved.values())
  log(f"[{s.name}] {s.labels} labels, hidden {s.hidden}, batch {s.batch_size}, "
      f"{num_active} active in total; mesh {sizes} over {mesh.devices.size} "
      f"{mesh.devices.flat[0].platform} devices")
  log(f"  one device: {one_ms:8.1f} ms/step")
  log(f"  mesh:       {mesh_ms:8.1f} ms/step  ({mesh_ms / one_ms:.2f}x one device)")
  log(f"  communicated per step and device: {total / 2**20:.2f} MiB ("
      + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in moved.items() if v)
      + f"); an all-reduce of dense gradients: {params / 2**20:.1f} MiB")
  return {"scenario": s.name, "mesh": sizes, "devices": int(mesh.devices.size),
          "platform": mesh.devices.flat[0].platform, "num_active": num_active,
          "one_device_step_ms": one_ms, "mesh_step_ms": mesh_ms,
          "mesh_over_one_device": mesh_ms / one_ms, "collective_bytes": moved,
          "communicated_bytes": total, "dense_gradient_bytes": int(params)}
