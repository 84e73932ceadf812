"""Row capture: how :func:`slidejax.nn.value_and_grad` learns what each sparse layer gathers.

A sparse layer (``SparseInput``, ``SlideDense``) reads a few rows of its ``RowParam`` weights
per call. To differentiate with respect to those rows only, ``value_and_grad`` first traces
the loss abstractly with a recorder active: each layer records the shape of the row ids it
gathers. Then it gives each layer a zero perturbation of that shape (``RowDelta``), which the
layer adds to its gathered rows; the gradient with respect to the perturbation is the
gradient of the rows, and the ids the layer gathered land in ``ActiveIds``.
"""
from __future__ import annotations

import contextlib
import contextvars

_RECORDER: contextvars.ContextVar[dict | None] = contextvars.ContextVar("slidejax_rows",
                                                                        default=None)


@contextlib.contextmanager
def recording():
  """Within: sparse layers record ``id(layer) -> (layer, ids shape)`` into the yielded dict."""
  token = _RECORDER.set({})
  try:
    yield _RECORDER.get()
  finally:
    _RECORDER.reset(token)


def record(layer, ids_shape: tuple[int, ...]) -> None:
  """Called by a sparse layer on every forward pass with the shape of the row ids it gathers."""
  found = _RECORDER.get()
  if found is None:
    return
  if id(layer) in found:
    raise ValueError(
        f"{type(layer).__name__} was called twice inside slidejax.nn.value_and_grad: "
        "row-sparse gradients need one call per sparse layer per loss (concatenate the "
        "inputs into one call instead)")
  found[id(layer)] = (layer, tuple(ids_shape))
