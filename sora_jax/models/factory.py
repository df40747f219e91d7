"""Models from a config: the autoencoder, the DiT, the text encoder, and the latent shapes.

Everything that needs "the model of this config" (stages, generation, sweeps, weight import and
export, ``model-info``, ``aot-compile``) builds it here; restoring weights into it is
:mod:`sora_jax.train.run_folder`'s job.
"""

from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from sora_jax.errors import ConfigError, StageError
from sora_jax.models.dit import DiT
from sora_jax.models.pixel import IdentityAutoencoder
from sora_jax.models.text_encoder import TextEncoder
from sora_jax.models.vae import CausalVAE

__all__ = ["VAE_KINDS", "build_dit", "build_vae", "dit_in_dim", "latent_shape", "text_encoder"]

# vae.kind: "causal" = CausalVAE; "identity" = IdentityAutoencoder (pixel-space mode)
VAE_KINDS = ("causal", "identity")


def build_vae(cfg: ml_collections.ConfigDict) -> nnx.Module:
    """The autoencoder of ``cfg.vae``, untrained: ``CausalVAE`` or, for ``vae.kind = "identity"``,
    ``IdentityAutoencoder`` (every other key of the section is passed to the constructor).
    Parameters are drawn from ``nnx.Rngs(cfg.seed)``.

    Raises:
      ConfigError: unknown ``vae.kind``. ValueError: the constructor rejects the section.
    """
    kwargs = {k: v for k, v in cfg.vae.to_dict().items() if k != "kind"}
    if cfg.vae.kind == "causal":
        return CausalVAE(**kwargs, rngs=nnx.Rngs(cfg.seed))
    if cfg.vae.kind == "identity":
        return IdentityAutoencoder(**kwargs)
    raise ConfigError(f"config key 'vae.kind': {cfg.vae.kind!r} is not one of {VAE_KINDS}")


def dit_in_dim(cfg: ml_collections.ConfigDict) -> int:
    """Width of one DiT input token: pt * ph * pw * latent channels."""
    pt, ph, pw = cfg.dit.patch
    return pt * ph * pw * cfg.vae.latent_channels


def build_dit(cfg: ml_collections.ConfigDict) -> DiT:
    """The DiT of ``cfg.dit`` over ``cfg``'s latent patches, untrained; parameters drawn from
    ``nnx.Rngs(cfg.seed + 1)``. Under ``nnx.eval_shape`` it allocates nothing."""
    return DiT.from_config(cfg.dit, dit_in_dim(cfg), rngs=nnx.Rngs(cfg.seed + 1))


@functools.lru_cache(maxsize=2)
def text_encoder(max_length: int) -> TextEncoder:
    """The frozen MiniLM :class:`TextEncoder` for ``max_length`` tokens, loaded once per process
    (the quickstart needs it in three stages, latent encoding in another)."""
    return TextEncoder(max_length=max_length)


def latent_shape(cfg: ml_collections.ConfigDict, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent (t, h, w, c) of a (frames, height, width) pixel video under ``cfg``.

    Raises:
      StageError: frames is not 1 + td k (td: the VAE's temporal compression), or the size is
        not a multiple of the VAE's spatial compression times the DiT patch, or the latent
        frames do not divide by the DiT's temporal patch.
    """
    v, (pt, ph, pw) = cfg.vae, cfg.dit.patch
    tds, sds = v.temporal_downsample, v.spatial_downsample
    if frames < 1 or (frames - 1) % tds:
        raise StageError(f"impossible frame count {frames}: use 1 + {tds}k frames (1, {1 + tds}, {1 + 2 * tds}, ...)")
    if height <= 0 or width <= 0 or height % (sds * ph) or width % (sds * pw):
        raise StageError(f"impossible size {height}x{width}: height must be a multiple of {sds * ph} "
                         f"and width of {sds * pw}")
    t = 1 + (frames - 1) // tds
    if t % pt:
        raise StageError(f"{frames} frames give {t} latent frames, not divisible by patch {pt}")
    return t, height // sds, width // sds, v.latent_channels
