"""Which device mesh a layer's arrays are laid out on (see :mod:`slidejax.distributed`)."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding


def _concrete_mesh_in_context():
  """The device mesh set by ``jax.set_mesh`` while tracing (its devices decide the table
  backend, see ``slidejax.nn._slide_dense``); None if this JAX does not say (then pure JAX)."""
  try:
    from jax._src import mesh as mesh_lib   # no public accessor inside jit (JAX 0.10)
    mesh = mesh_lib.get_concrete_mesh()
  except (ImportError, AttributeError):
    return None
  return None if mesh is None or mesh.empty else mesh


def mesh_of(array):
  """The mesh ``array`` is laid out on (from its sharding when concrete, else the mesh in
  context), or None: one device's view."""
  if isinstance(array, jax.core.Tracer):   # traced: the mesh in context (jax.set_mesh)
    mesh = _concrete_mesh_in_context() or jax.sharding.get_abstract_mesh()
  else:
    sharding = getattr(array, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
  return None if mesh is None or mesh.empty or mesh.size == 1 else mesh
