"""Moving between pixels and normalised latents with a trained autoencoder.

The DiT sees latents standardised per channel, ``(z - shift) / scale``, with ``shift`` and
``scale`` the per-channel mean and standard deviation of posterior means over training data
(as Stable Diffusion's scaling factor, per channel as in Wan and HunyuanVideo). The statistics
live in the autoencoder itself, as its ``latent_shift`` / ``latent_scale`` variables
(``sora_jax.models.vae.LatentStat``), so every checkpoint carries the statistics of its own
weights and restoring the checkpoint is all a later stage needs.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax.models.factory import build_vae
from sora_jax.models.vae_streaming import StreamingVAE
from sora_jax.train.run_folder import paths, restore

__all__ = ["VAECodec", "latent_statistics", "load_codec", "set_latent_statistics"]


class VAECodec:
    """Jitted encode / decode of an autoencoder plus latent normalisation.

    Works with any module that has the interface of ``sora_jax.models.vae.CausalVAE`` used
    here: ``latent_channels``, ``encode(video) -> (mean, logvar)``, ``decode(z)`` and the
    ``LatentStat`` variables ``latent_shift`` / ``latent_scale`` (float32 (c,)); e.g.
    ``CausalVAE`` or ``sora_jax.models.pixel.IdentityAutoencoder``.

    The statistics are read from the model on every call (no copy is kept), so statistics
    restored from a checkpoint or written by :func:`set_latent_statistics` take effect at once.

    Args:
      vae: the trained autoencoder.
      chunk, tile, overlap: 0 / None: encode and decode each video in one pass. Otherwise a
        ``CausalVAE`` runs through ``sora_jax.models.vae_streaming.StreamingVAE``: ``chunk``
        latent frames per time chunk with a feature cache (memory independent of the length;
        equal to the whole pass within float tolerance), and / or spatial tiles of ``tile``
        pixels overlapping by ``overlap`` pixels, blended linearly.
    """

    def __init__(self, vae: nnx.Module, *, chunk: int | None = None, tile: int | None = None,
                 overlap: int | None = None):
        # nnx.split shares the Variable objects with ``vae``: later writes into the model
        # (checkpoint restores, statistics) are seen by the jitted functions through ``state``.
        self.graphdef, self.state = nnx.split(vae)
        self.vae = vae
        graphdef = self.graphdef
        self._encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
        self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
        self.streaming = None
        if chunk or tile:
            self.streaming = StreamingVAE(vae, chunk=chunk or None, tile=tile or None,
                                          overlap=overlap or None)

    @property
    def shift(self) -> np.ndarray:
        """Per-channel latent mean, float32 (c,), from the model's ``latent_shift``."""
        return np.asarray(self.vae.latent_shift[...], np.float32)

    @property
    def scale(self) -> np.ndarray:
        """Per-channel latent standard deviation, float32 (c,), from ``latent_scale``."""
        return np.asarray(self.vae.latent_scale[...], np.float32)

    def normalize(self, z: np.ndarray) -> np.ndarray:
        """Raw latents (..., c) -> ``(z - shift) / scale``, float32."""
        return (np.asarray(z, np.float32) - self.shift) / self.scale

    def denormalize(self, latents: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalize`: ``latents * scale + shift``, float32 (..., c)."""
        return np.asarray(latents, np.float32) * self.scale + self.shift

    def encode_raw(self, video: np.ndarray) -> np.ndarray:
        """(B, T, H, W, C) float32 pixels in [-1, 1] -> (B, t, h, w, c) raw posterior means.

        Raises:
          ValueError: the video shape does not fit the model (see its ``encode``).
        """
        if self.streaming is not None:
            return np.asarray(self.streaming.encode(np.asarray(video, np.float32)))
        return np.asarray(self._encode(self.state, jnp.asarray(video, jnp.float32)))

    def encode(self, video: np.ndarray) -> np.ndarray:
        """(B, T, H, W, C) float32 pixels in [-1, 1] -> (B, t, h, w, c) normalised posterior
        means, float32. Raises ValueError as :meth:`encode_raw`."""
        return self.normalize(self.encode_raw(video))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, t, h, w, c) normalised latents -> (B, T, H, W, C) float32 pixels clipped to [-1, 1]."""
        z = self.denormalize(latents)
        if self.streaming is not None:
            video = self.streaming.decode(z)
            return np.clip(video, -1.0, 1.0, out=video)  # in place: no second full-length copy
        return np.clip(np.asarray(self._decode(self.state, jnp.asarray(z))), -1.0, 1.0)

    def reconstruct(self, video: np.ndarray) -> np.ndarray:
        """Encode then decode (posterior mean): the autoencoder round trip of ``video``."""
        return self.decode(self.encode(video))


def latent_statistics(codec: VAECodec, videos: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of raw (unnormalised) latents over ``videos``.

    Accumulated in float64 over every latent position of every batch (population variance).

    Args:
      codec: the codec of the model whose latents are measured.
      videos: iterable of (B, T, H, W, C) float32 batches in [-1, 1].
    Returns:
      (shift, scale), float32 (c,) each; scale is floored at 1e-4 so that a dead channel does
      not blow up the normalisation.
    Raises:
      ValueError: ``videos`` is empty.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for video in videos:
        z = codec.encode_raw(video).astype(np.float64)
        z = z.reshape(-1, z.shape[-1])
        total = total + z.sum(0)
        total_sq = total_sq + (z * z).sum(0)
        count += z.shape[0]
    if count == 0:
        raise ValueError("latent_statistics: no videos given")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-4).astype(np.float32)


def set_latent_statistics(vae: nnx.Module, videos: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Measures :func:`latent_statistics` of ``vae`` on ``videos`` and writes them into its
    ``latent_shift`` / ``latent_scale`` variables (so the next checkpoint save carries them).

    The statistics are measured with the model's current shift / scale ignored (raw latents).

    Returns:
      (shift, scale), float32 (c,) each, as written.
    Raises:
      ValueError: ``videos`` is empty.
    """
    shift, scale = latent_statistics(VAECodec(vae), videos)
    vae.latent_shift[...] = jnp.asarray(shift)
    vae.latent_scale[...] = jnp.asarray(scale)
    return shift, scale


def load_codec(cfg: ml_collections.ConfigDict, workdir: str) -> VAECodec:
    """The trained autoencoder of a run folder as a :class:`VAECodec`, streaming as
    ``cfg.vae_inference`` says (chunk / tile / overlap; the identity autoencoder has nothing to
    stream). Its latent statistics come back with the checkpoint (the model's
    ``latent_shift`` / ``latent_scale`` variables).

    Raises:
      StageError: the run folder has no VAE checkpoint, or one of another model.
    """
    vae = build_vae(cfg)
    # checkpoints hold a VAETrainModel; inference reads its autoencoder only
    restore(vae, paths(workdir)["vae"], "vae", subtree="vae")
    if cfg.vae.kind == "identity":
        return VAECodec(vae)
    i = cfg.vae_inference
    return VAECodec(vae, chunk=i.chunk, tile=i.tile, overlap=i.overlap)
