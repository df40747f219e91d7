"""A minimal serving runtime for ``sora-jax export --format stablehlo`` folders.

It imports jax, numpy, safetensors and tokenizers only, never the model code: what it runs is the
exported StableHLO (:mod:`sora_jax.serving.runtime`). ``python -m sora_jax.serving EXPORT --prompt
TEXT --out video.npy`` generates from the command line.
"""

from sora_jax.serving.runtime import ServingModel

__all__ = ["ServingModel"]
