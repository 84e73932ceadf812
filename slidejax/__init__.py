"""slidejax: SLIDE-style LSH sparse training for extreme classification in JAX/Flax NNX."""

__version__ = "0.1.0"
