"""A linear path from each latent's pixel block to the latent and back, around the conv VAE.

A causal VAE with temporal compression td and spatial compression s codes latent frame j from
the pixel block of frames 1 + td*(j-1) .. td*j (frame 0 alone for j = 0) and s x s pixels.
``LinearPatchShortcut`` maps that block linearly to the latent's c channels (encoder) and back
(decoder); the convolutional encoder and decoder are added on top and learn the non-linear
remainder. This is the residual-autoencoding idea of DC-AE (Chen et al. 2024, "Deep Compression
Autoencoder for Efficient High-Resolution Diffusion Models", Sec. 3.2: space-to-channel
shortcuts make high-compression autoencoders train well), with a learned linear map instead of
channel averaging. Initialised with the principal components of training blocks
(``init_from_data``), the autoencoder starts as the best linear code of its size (PCA: Pearson
1901; the optimal rank-c linear autoencoder, Baldi & Hornik 1989) instead of from noise, which is
what makes a short CPU training budget reach usable quality.

Frame 0 is coded alone: its block is frame 0 repeated td times (as the causal convolutions pad
with copies of frame 0), and decoding keeps the last frame of latent 0's block. Latent frame j
depends only on frames <= td*j and decoded frame f only on latent ceil(f / td), so the shortcut
keeps the VAE causal, works chunk by chunk in time (chunks aligned to td frames) and tile by
tile in space (it is local to each s x s block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.data.patches import depth_to_space, space_to_depth

__all__ = ["LinearPatchShortcut"]


class LinearPatchShortcut(nnx.Module):
    """Linear encoder / decoder over (td, s, s, C) pixel blocks.

    Args:
      in_channels: C, pixel channels.
      latent_channels: c.
      spatial: s, spatial compression.
      temporal: td, temporal compression.
      rngs: ``nnx.Rngs`` for the (LeCun-normal) initial weights.
    """

    def __init__(self, in_channels: int, latent_channels: int, spatial: int, temporal: int, *,
                 rngs: nnx.Rngs):
        self.in_channels, self.spatial, self.temporal = in_channels, spatial, temporal
        d = temporal * spatial * spatial * in_channels
        self.encode_proj = nnx.Linear(d, latent_channels, rngs=rngs)
        self.decode_proj = nnx.Linear(latent_channels, d, rngs=rngs)

    def blocks(self, video: jax.Array, first: bool = True) -> jax.Array:
        """Pixel blocks of each latent position.

        Args:
          video: (B, T, H, W, C); T = 1 + td*k when ``first`` (the video starts at frame 0),
            T = td*k otherwise (a later time chunk); H, W multiples of s.
          first: whether the input starts with frame 0 (coded alone).

        Returns:
          (B, t, H / s, W / s, td * s * s * C), t = k + 1 (first) or k.
        """
        td, s = self.temporal, self.spatial
        if first:
            video = jnp.concatenate([jnp.repeat(video[:, :1], td - 1, axis=1), video], axis=1)
        return space_to_depth(video, (td, s, s))

    def unblocks(self, x: jax.Array, first: bool = True) -> jax.Array:
        """Inverse of ``blocks``: (B, t, h, w, td*s*s*C) -> (B, T, h*s, w*s, C), dropping the
        td - 1 padding frames of latent 0 when ``first``."""
        td, s = self.temporal, self.spatial
        x = depth_to_space(x, (td, s, s))
        return x[:, td - 1:] if first else x

    def encode(self, video: jax.Array, first: bool = True) -> jax.Array:
        """(B, T, H, W, C) pixels -> (B, t, h, w, c) linear code (see ``blocks``)."""
        return self.encode_proj(self.blocks(video, first))

    def decode(self, z: jax.Array, first: bool = True) -> jax.Array:
        """(B, t, h, w, c) -> (B, T, H, W, C) linear reconstruction (see ``unblocks``)."""
        return self.unblocks(self.decode_proj(z), first)

    def init_from_data(self, videos: np.ndarray) -> float:
        """Sets both maps to the principal components of the blocks of ``videos`` (PCA).

        Encoder: z = (x - mu) P^T, decoder: x = z P + mu, with P the top-c right singular
        vectors of the centred blocks: the reconstruction-optimal rank-c linear code.

        Args:
          videos: (N, T, H, W, C) float pixels in [-1, 1], T = 1 + td*k.

        Returns:
          The fraction of the blocks' variance the code keeps, in [0, 1].

        Raises:
          ValueError: fewer blocks than latent channels.
        """
        x = np.asarray(self.blocks(jnp.asarray(videos, jnp.float32)), np.float64)
        x = x.reshape(-1, x.shape[-1])
        c = self.encode_proj.kernel.shape[1]
        if x.shape[0] < c:
            raise ValueError(f"PCA init needs at least {c} pixel blocks, got {x.shape[0]}")
        mu = x.mean(0)
        _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
        p = vt[:c]
        self.encode_proj.kernel[...] = jnp.asarray(p.T, jnp.float32)
        self.encode_proj.bias[...] = jnp.asarray(-mu @ p.T, jnp.float32)
        self.decode_proj.kernel[...] = jnp.asarray(p, jnp.float32)
        self.decode_proj.bias[...] = jnp.asarray(mu, jnp.float32)
        var = sv ** 2
        return float(var[:c].sum() / max(var.sum(), 1e-12))
