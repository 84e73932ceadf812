"""Returning freed heap memory to the operating system.

XLA's compiler and the CPU runtime's temporaries leave freed but resident pages in glibc's
arenas (about 100 MB after compiling an Amazon-670K training step, the same after building
a model); with the CLI's malloc tuning nothing is ever returned by itself. The trainer calls
:func:`release_free_memory` after its large one-off phases (init, first step, rebuilds),
which costs a few milliseconds each time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):    # not glibc (musl has no malloc_trim)
    return None


def release_free_memory() -> bool:
  """Gives free heap pages back to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
