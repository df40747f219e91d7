"""sora-jax: Sora-style video generation in JAX / Flax NNX."""

__version__ = "0.1.0"
