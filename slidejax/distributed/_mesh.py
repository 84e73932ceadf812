"""Device meshes for the sharded SLIDE output layer: ``("data", "model")``."""
from __future__ import annotations

import re

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh

AXES = ("data", "model")
_ITEM = re.compile(r"^\s*([a-z]+)\s*=\s*([0-9]+)\s*$")


class MeshSpecError(ValueError):
  """A malformed ``--mesh`` string or one that does not fit the available devices."""


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses ``"data=2,model=4"`` into ``{"data": 2, "model": 4}``.

  Axes not named default to 1; an empty string means one device (``data=1,model=1``).
  Raises :class:`MeshSpecError` on unknown or repeated axes, non-positive or malformed sizes.
  """
  sizes = {name: 1 for name in AXES}
  seen = set()
  if not spec or not spec.strip():
    return sizes
  for item in spec.split(","):
    match = _ITEM.match(item)
    if not match:
      raise MeshSpecError(f"--mesh {spec!r}: cannot read {item.strip()!r}; expected AXIS=SIZE "
                          f"items separated by commas, e.g. 'data=2,model=4'")
    name, size = match.group(1), int(match.group(2))
    if name not in AXES:
      raise MeshSpecError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {AXES}")
    if name in seen:
      raise MeshSpecError(f"--mesh {spec!r}: axis {name!r} given twice")
    if size < 1:
      raise MeshSpecError(f"--mesh {spec!r}: axis {name!r} must have size >= 1, got {size}")
    seen.add(name)
    sizes[name] = size
  return sizes


def make_mesh(data: int = 1, model: int = 1, *, devices=None) -> Mesh:
  """A ``data x model`` mesh over ``devices`` (default: the global devices, every process;
  on CPU with one process the first one is left out when a spare exists: host callbacks stage
  their arguments there, and a mesh on it runs the LSH tables in pure JAX instead of the host
  kernels).

  ``model`` is the minor (fastest-varying) axis, so a model group sits on neighbouring devices
  (one host, fast links) and the per-step softmax collectives stay local where possible.
  Axes are ``Auto`` typed: the sharded layer works in ``shard_map`` with explicit specs.
  """
  if data < 1 or model < 1:
    raise MeshSpecError(f"mesh sizes must be >= 1, got data={data}, model={model}")
  if devices is None:
    devices = jax.devices()
    if (devices[0].platform == "cpu" and len(devices) > data * model
        and jax.process_count() == 1):
      # the first CPU device stages host callbacks' arguments: a mesh program running there
      # would wait on itself, so a mesh leaves it out when a spare device exists
      devices = devices[1:]
  devices = list(devices)
  if data * model > len(devices):
    raise MeshSpecError(f"mesh data={data} x model={model} needs {data * model} devices, "
                        f"{len(devices)} available ({devices[0].platform}); on CPU set "
                        f"jax.config.update('jax_num_cpu_devices', n) before using JAX")
  return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:data * model])


def mesh_from_spec(spec: str, *, devices=None) -> Mesh:
  """``make_mesh(**parse_mesh(spec))``."""
  return make_mesh(**parse_mesh(spec), devices=devices)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           cpu_devices: int | None = None, timeout: int = 300) -> None:
  """Joins a multi-process (multi-host) job; call before any other JAX use.

  Arguments default to the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process
  0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (on SLURM / Open MPI / Kubernetes JAX detects
  them itself when they are unset). ``cpu_devices``: run on CPU with that many devices per
  process and gloo collectives (for testing without accelerators).
  """
  import os
  env = os.environ
  if cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    coordinator_address = env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in env:
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout)
