"""Initializers for ``[rows, width]`` tables that are filled a block of rows at a time.

Drawing a float32 ``[670091, 128]`` normal in one go holds about four arrays of that size
(random bits, uniforms, their transform), so building an Amazon-670K output layer peaked at
1.3 GB above the model. Filling row blocks inside one ``fori_loop`` keeps one block's
temporaries alive and updates the output in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# 65,536 rows x 128 float32 = 32 MiB per temporary.
DEFAULT_CHUNK_ROWS = 65536

# stddev of the unit-variance normal truncated to [-2, 2] (as jax.nn.initializers uses).
_TRUNCATED_STD = 0.87962566103423978


def row_chunked(init: nnx.Initializer, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> nnx.Initializer:
  """``init`` applied to blocks of ``chunk_rows`` rows of a 2-D shape (keys folded per block).

  Only for initializers whose distribution does not depend on the shape (``normal``,
  ``truncated_normal``, ``uniform``): fan-based ones would see the block's fan, not the table's.
  """

  def fill(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    rows, width = shape
    if rows <= chunk_rows:
      return init(key, (rows, width), dtype)
    num_blocks = -(-rows // chunk_rows)

    def fill_blocks(key):
      def body(i, out):
        start = jnp.minimum(i * chunk_rows, rows - chunk_rows)   # the last block overlaps
        block = init(jax.random.fold_in(key, i), (chunk_rows, width), dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0)
      return jax.lax.fori_loop(0, num_blocks, body, jnp.zeros((rows, width), dtype))

    return jax.jit(fill_blocks)(key)

  return fill


def lecun_rows(num_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> nnx.Initializer:
  """``nnx.initializers.lecun_normal()`` of a ``[num_rows, width]`` kernel (fan-in =
  ``num_rows``, as it computes for that shape), drawn in row blocks."""
  stddev = (1.0 / num_rows) ** 0.5 / _TRUNCATED_STD
  return row_chunked(nnx.initializers.truncated_normal(stddev=stddev), chunk_rows)
