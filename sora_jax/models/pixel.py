"""Pixel-space mode: an identity "autoencoder", so the DiT denoises pixel patches directly.

The seed's alternative to training a VAE (DESIGN.md: "the autoencoder is optional"): the
"latents" are the pixels themselves, standardised per RGB channel with statistics of the
training pixels, and the DiT's spacetime patch (e.g. (1, 8, 8) pixels x 3 channels = 192
values per token) does all the compression into tokens, as pixel-space diffusion transformers
do (e.g. Simple Diffusion, Hoogeboom et al. 2023; the ViT patch embedding of DiT, Peebles & Xie
2023, applied to pixels). Select it with ``vae.kind = "identity"`` (``configs/pixel.py``).

The module has the interface the pipeline uses from ``sora_jax.models.vae.CausalVAE``, so every
stage (``train-vae``, ``train-dit``, ``generate``, ``evaluate``, ``encode``) runs unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.vae import LOGVAR_MIN, LatentStat

__all__ = ["IdentityAutoencoder"]


class IdentityAutoencoder(nnx.Module):
    """The identity map with the interface of ``CausalVAE``: encode and decode return their input.

    No parameters; the only variables are the per-channel statistics ``latent_shift`` and
    ``latent_scale`` (``LatentStat``, float32 (in_channels,)), which ``sora_jax.inference.latents``
    applies and a checkpoint carries. The posterior is a point mass: ``encode`` returns the
    video as the mean and ``LOGVAR_MIN`` (the CausalVAE's clip floor) as the log-variance, and
    ``__call__`` never samples, so a round trip is exact.

    Args:
      in_channels: pixel channels C (3 for RGB).
      latent_channels: must equal ``in_channels`` (accepted so a config's ``vae`` section keeps
        the keys the pipeline reads).
      spatial_downsample, temporal_downsample, patch_size: must be 1 (same reason).
      rngs: accepted and unused (no parameters to initialise).

    Raises:
      ValueError: a size differs from what the identity map implies, or in_channels < 1.
    """

    def __init__(self, *, in_channels: int = 3, latent_channels: int | None = None,
                 spatial_downsample: int = 1, temporal_downsample: int = 1, patch_size: int = 1,
                 rngs: nnx.Rngs | None = None):
        del rngs
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        if latent_channels is not None and latent_channels != in_channels:
            raise ValueError(f"identity autoencoder: latent_channels ({latent_channels}) must "
                             f"equal in_channels ({in_channels})")
        for name, val in (("spatial_downsample", spatial_downsample),
                          ("temporal_downsample", temporal_downsample), ("patch_size", patch_size)):
            if val != 1:
                raise ValueError(f"identity autoencoder: {name} must be 1, got {val!r} "
                                 "(pixel patches are the DiT's dit.patch)")
        self.in_channels = in_channels
        self.latent_channels = in_channels
        self.spatial_downsample = 1
        self.temporal_downsample = 1
        self.patch_size = 1
        self.latent_shift = LatentStat(jnp.zeros((in_channels,), jnp.float32))
        self.latent_scale = LatentStat(jnp.ones((in_channels,), jnp.float32))

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(T, H, W, C): the latents of a T x H x W video are its pixels.

        Raises:
          ValueError: T, H or W < 1.
        """
        if min(T, H, W) < 1:
            raise ValueError(f"video of shape (T, H, W) = ({T}, {H}, {W}) must have T, H, W >= 1")
        return (T, H, W, self.latent_channels)

    def video_frames(self, t: int) -> int:
        """Video frames decoded from t latent frames: t. Raises ValueError if t < 1."""
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"latent frame count must be an int >= 1, got {t!r}")
        return t

    def _check(self, x: jax.Array, what: str):
        if x.ndim != 5 or x.shape[-1] != self.in_channels or min(x.shape[1:4]) < 1:
            raise ValueError(f"{what} expects (B, T, H, W, {self.in_channels}) with T, H, W >= 1, "
                             f"got {x.shape}")

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, T, H, W, C) float pixels -> (mean, logvar): the video itself and LOGVAR_MIN.

        Raises:
          ValueError: video is not 5-D with in_channels channels.
        """
        self._check(video, "encode")
        return video, jnp.full(video.shape, LOGVAR_MIN, video.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, t, h, w, C) latents -> the same array as video (unbounded; clip for display).

        Raises:
          ValueError: z is not 5-D with in_channels channels.
        """
        self._check(z, "decode")
        return z

    def __call__(self, video: jax.Array, *, key: jax.Array | None = None,
                 sample_posterior: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(recon, mean, logvar) as ``CausalVAE.__call__``; recon is ``video`` exactly (the
        point-mass posterior is never sampled, so ``key`` and ``sample_posterior`` are ignored).

        Raises:
          ValueError: as ``encode``.
        """
        del key, sample_posterior
        mean, logvar = self.encode(video)
        return self.decode(mean), mean, logvar
