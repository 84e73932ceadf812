"""Benchmarks (run as modules, e.g. ``python3 -m slidejax.bench.lsh_speed``)."""
