"""Numba host kernels for slidejax (parsing, hash tables, active-set selection).

Kernels take and return NumPy arrays; randomness is passed in as arrays. JAX reaches the
table and selection kernels through one wrapper module, ``slidejax.lsh._host``.
"""
