"""Moving between pixels and normalised latents with a trained VAE.

The DiT sees latents standardised per channel, ``(z - shift) / scale``, with ``shift`` and
``scale`` the per-channel mean and standard deviation of VAE posterior means over training data
(as Stable Diffusion's scaling factor, per channel as in Wan and HunyuanVideo).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class VAECodec:
    """Jitted encode / decode of a ``CausalVAE`` plus latent normalisation.

    Args:
      vae: a trained ``sora_jax.models.vae.CausalVAE``.
      shift, scale: per-channel statistics, float32 (c,); identity when None.
    """

    def __init__(self, vae: nnx.Module, shift: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.graphdef, self.state = nnx.split(vae)
        self.vae = vae
        c = vae.latent_channels
        self.shift = np.zeros((c,), np.float32) if shift is None else np.asarray(shift, np.float32)
        self.scale = np.ones((c,), np.float32) if scale is None else np.asarray(scale, np.float32)
        graphdef = self.graphdef
        self._encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
        self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))

    def encode(self, video: np.ndarray) -> np.ndarray:
        """(B, T, H, W, 3) float32 pixels in [-1, 1] -> (B, t, h, w, c) normalised posterior means."""
        z = np.asarray(self._encode(self.state, jnp.asarray(video, jnp.float32)))
        return (z - self.shift) / self.scale

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, t, h, w, c) normalised latents -> (B, T, H, W, 3) float32 pixels clipped to [-1, 1]."""
        z = np.asarray(latents, np.float32) * self.scale + self.shift
        return np.clip(np.asarray(self._decode(self.state, jnp.asarray(z))), -1.0, 1.0)

    def reconstruct(self, video: np.ndarray) -> np.ndarray:
        """Encode then decode (posterior mean): the VAE round trip of ``video``."""
        return self.decode(self.encode(video))

    def save_stats(self, path: str):
        with open(path, "w") as f:
            json.dump({"shift": self.shift.tolist(), "scale": self.scale.tolist()}, f)

    def load_stats(self, path: str):
        """Reads ``latent_stats.json``; raises FileNotFoundError naming the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"latent statistics not found: {path} (run `sora-jax train-vae`)")
        with open(path) as f:
            d = json.load(f)
        self.shift = np.asarray(d["shift"], np.float32)
        self.scale = np.asarray(d["scale"], np.float32)


def latent_statistics(codec: VAECodec, videos: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of raw (unnormalised) latents over ``videos``.

    Args:
      videos: iterable of (B, T, H, W, 3) float32 batches in [-1, 1].
    Returns:
      (shift, scale), float32 (c,) each; scale is floored at 1e-4.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for video in videos:
        z = np.asarray(codec._encode(codec.state, jnp.asarray(video, jnp.float32)), np.float64)
        z = z.reshape(-1, z.shape[-1])
        total = total + z.sum(0)
        total_sq = total_sq + (z * z).sum(0)
        count += z.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-4).astype(np.float32)
