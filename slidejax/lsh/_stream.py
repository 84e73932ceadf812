"""Streamed host table build: neuron codes computed and inserted chunk by chunk.

A full build through :func:`slidejax.lsh.build_tables` holds the codes of every neuron, their
table-major transpose and the callback's copies of the new tables at once (about 0.9 GB above
the model at Amazon-670K shape). The streamed build computes ``chunk_size`` neurons' codes at
a time in a jitted program, hands them to a Numba kernel that inserts them into host tables in
place (FIFO rings, put in order at the end). WTA/DWTA codes of CPU weights come from a Numba
twin reading the weight matrix in place (XLA's gathers made them ~3x slower). On CPU the host kernel writes straight into
freshly allocated XLA buffers (so the tables exist once); elsewhere the finished host tables
move to the device one array at a time. It runs eagerly (not inside jit) and gives exactly the tables of
:func:`~slidejax.lsh.build_tables` with the host backend and the same key.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slidejax.lsh import _host
from slidejax.lsh._families import HashFamily
from slidejax.lsh._tables import LSHTables
from slidejax.lsh._tables import _check_insertion
from slidejax.lsh._tables import _default_key
from slidejax.lsh._tables import codes_dtype

# Families whose codes of CPU weight rows the host computes itself (Numba twins of the JAX
# codes: XLA's per-element gathers made DWTA codes of 670K rows take ~5 s).
HOST_CODE_FAMILIES = ("wta", "dwta")


@functools.lru_cache(maxsize=None)
def _chunk_codes_program(family: HashFamily, chunk_size: int):
  """``(params, weights [n, dim], start) -> int32 [chunk_size, l]`` codes of rows from ``start``
  (XLA clamps ``start`` to ``n - chunk_size``; the caller skips rows it already offered)."""

  def codes(params, weights, start):
    rows = jax.lax.dynamic_slice_in_dim(weights, start, chunk_size, axis=0)
    return family.codes(params, rows)

  return jax.jit(codes)


def build_tables_streamed(family: HashFamily, params: Any, weights: jax.Array, *,
                          bucket_capacity: int, insertion: str = "fifo",
                          key: jax.Array | None = None, keep_codes: bool = True,
                          chunk_size: int = 16384) -> LSHTables:
  """Tables of the rows of ``weights`` float ``[n, dim]``, built on the host chunk by chunk.

  Peak extra memory: the new tables once (off CPU: on the host, then on the device, where
  the host arrays are freed one by one as they arrive) and one chunk's projections; never all
  codes in int32. The tables land on the device of ``weights``. Call it
  eagerly; inside jit use ``build_tables(neuron_codes(...))``. ``keep_codes``: as for
  :func:`~slidejax.lsh.build_tables`.
  """
  reservoir = _check_insertion(insertion)
  if bucket_capacity < 1:
    raise ValueError(f"bucket_capacity must be positive, got {bucket_capacity}")
  if isinstance(weights, jax.core.Tracer):
    raise TypeError("build_tables_streamed runs eagerly; inside jit use "
                    "build_tables(neuron_codes(...))")
  n = weights.shape[0]
  chunk = max(1, min(chunk_size, n))
  shapes = _host.stream_shapes(n, family.l, 1 << family.range_bits, bucket_capacity,
                               codes_dtype(family.range_bits), keep_codes)
  device = _cpu_device(weights)
  if device is not None:    # fill XLA's own buffers: no second copy of the tables
    arrays = [jnp.full(shape.shape, fill, shape.dtype, device=device)
              for shape, fill in zip(shapes, _host.STREAM_FILLS)]
    buffers = tuple(_host.writable_view(a) for a in arrays)
  else:
    arrays, buffers = None, tuple(np.full(shape.shape, fill, shape.dtype)
                                  for shape, fill in zip(shapes, _host.STREAM_FILLS))
  seeds = _host.stream_seeds(_default_key(key), family.l)
  if (device is not None and family.name in HOST_CODE_FAMILIES
      and weights.dtype == jnp.float32):
    _fill_with_host_codes(family, params, weights, chunk, buffers, reservoir, seeds)
  else:
    _fill_with_jax_codes(family, params, weights, chunk, buffers, reservoir, seeds)
  _host.stream_finish(buffers, reservoir)
  if arrays is None:
    arrays = []
    target = next(iter(weights.devices()))
    for i in range(3):          # host arrays freed one by one once on the device
      arrays.append(jax.device_put(buffers[i], target))
      arrays[-1].block_until_ready()
      buffers = buffers[:i] + (None,) + buffers[i + 1:]
  del buffers
  return LSHTables(*arrays)


def _fill_with_host_codes(family, params, weights, chunk, buffers, reservoir, seeds) -> None:
  """WTA/DWTA on CPU: Numba hashes the rows of the (zero-copy) weight view, chunk by chunk."""
  n = weights.shape[0]
  rows = np.asarray(weights)
  codes = np.empty((chunk, family.l), np.int32)
  for start in range(0, n, chunk):
    count = min(chunk, n - start)
    _host.wta_codes(family, params, rows, start, codes[:count])
    _host.stream_fill(buffers, codes[:count], start, 0, reservoir, seeds)


def _fill_with_jax_codes(family, params, weights, chunk, buffers, reservoir, seeds) -> None:
  """Codes from a jitted program per chunk (dispatched one chunk ahead), inserted on the host."""
  n = weights.shape[0]
  program = _chunk_codes_program(family, chunk)
  starts = list(range(0, n, chunk))
  pending = program(params, weights, starts[0]) if starts else None
  for index, start in enumerate(starts):
    following = (program(params, weights, starts[index + 1])
                 if index + 1 < len(starts) else None)   # dispatched ahead (async)
    first_id = min(start, n - chunk)                     # where XLA's slice really began
    _host.stream_fill(buffers, np.asarray(pending), first_id, start - first_id, reservoir,
                      seeds)
    pending = following


def _cpu_device(weights: jax.Array):
  """The CPU device holding ``weights`` (whose buffers the host may fill), else None."""
  devices = weights.devices()
  if len(devices) != 1:
    return None
  (device,) = devices
  return device if device.platform == "cpu" else None
