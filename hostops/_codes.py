"""Numba twins of the WTA / densified-WTA codes of dense rows (the neurons' weight rows).

They reproduce ``slidejax.lsh.HashFamily.codes`` bit for bit (first maximum wins, empty DWTA
bins filled along the same probe sequence, the same packing and folding), so a host rebuild
can hash a CPU weight matrix in place without XLA's per-element gathers.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_FOLD_MULTIPLIER = np.uint64(0x9E3779B1)   # = slidejax.lsh._families._FOLD_MULTIPLIER
_MIX_MULTIPLIER = np.uint64(0x85EBCA77)    # = slidejax.lsh._families._MIX_MULTIPLIER
_MASK32 = np.uint64(0xFFFFFFFF)
_ROWS_PER_TASK = 256


@nb.njit(cache=True, inline="always")
def _pack(winners, t, k, bits, range_bits):
  """Code of table ``t`` from its ``k`` hash values ``winners[t*k:(t+1)*k]``.

  uint32 arithmetic as in JAX, written in uint64 with explicit wrap-around (Numba widens
  products of 32-bit integers).
  """
  packed = np.uint64(0)
  if k * bits <= 32:
    for j in range(k):
      packed += np.uint64(winners[t * k + j]) << np.uint64(j * bits)
  else:
    for j in range(k):
      packed = ((packed + np.uint64(winners[t * k + j])) * _MIX_MULTIPLIER
                + np.uint64(j + 1)) & _MASK32
  packed &= _MASK32
  if k * bits > range_bits:
    packed = ((packed * _FOLD_MULTIPLIER) & _MASK32) >> np.uint64(32 - range_bits)
  return np.int32(packed)


@nb.njit(cache=True, parallel=True)
def wta_codes(weights, start, count, positions, probes, densified, k, bits, range_bits, out):
  """Codes int32 ``out[count, l]`` of rows ``start .. start+count-1`` of ``weights[n, dim]``.

  ``positions int32[l*k, bin_size]``: coordinates of each bin; ``probes int32[attempts,
  l*k]``: DWTA probe sequence (ignored for plain WTA, ``densified=False``).
  """
  num_hashes, bin_size = positions.shape
  num_tables = num_hashes // k
  num_tasks = (count + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
  minus_inf = weights.dtype.type(-np.inf)
  for task in nb.prange(num_tasks):
    winners = np.empty(num_hashes, np.int32)
    filled = np.empty(num_hashes, np.int32)
    empty = np.empty(num_hashes, np.bool_)
    for r in range(task * _ROWS_PER_TASK, min(count, (task + 1) * _ROWS_PER_TASK)):
      row = weights[start + r]
      any_empty = False
      for h in range(num_hashes):
        # Branch-free first-argmax (compare and select, as the JAX chain): random values
        # make "v > best" unpredictable, and mispredicted branches cost 4x the loads.
        winner = 0
        present = not densified     # WTA: every slot competes, zeros too
        best = row[positions[h, 0]]
        if densified:               # DWTA: zeros do not compete (-inf)
          best = minus_inf
          nonzeros = 0
          for s in range(bin_size):
            v = row[positions[h, s]]
            nonzero = v != 0
            score = v if nonzero else minus_inf
            better = score > best
            best = score if better else best
            winner = s if better else winner
            nonzeros += nonzero
          present = nonzeros > 0
        else:
          for s in range(1, bin_size):
            v = row[positions[h, s]]
            better = v > best       # ties keep the first slot (as jnp.argmax)
            best = v if better else best
            winner = s if better else winner
        winners[h] = winner
        empty[h] = not present
        any_empty = any_empty or not present
      if any_empty:
        for h in range(num_hashes):
          filled[h] = 0 if empty[h] else winners[h]
          if empty[h]:
            for a in range(probes.shape[0]):
              p = probes[a, h]
              if not empty[p]:
                filled[h] = winners[p]
                break
        for h in range(num_hashes):
          winners[h] = filled[h]
      for t in range(num_tables):
        out[r, t] = _pack(winners, t, k, bits, range_bits)


def warmup() -> None:
  """Compiles the kernel on tiny inputs (cached on disk by Numba)."""
  weights = np.zeros((3, 4), np.float32)
  weights.setflags(write=False)          # as a zero-copy view of a jax.Array arrives
  positions = np.array([[0, 1], [2, 3]], np.int32)
  probes = np.array([[1, 0]], np.int32)
  out = np.empty((3, 2), np.int32)
  for densified in (False, True):
    wta_codes(weights, 0, 3, positions, probes, densified, 1, 1, 1, out)
