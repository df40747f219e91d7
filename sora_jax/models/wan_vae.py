"""The Wan 2.1 video VAE in Flax NNX, output-equal to diffusers' ``AutoencoderKLWan``.

Source: Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models" (arXiv
2503.20314), section 3.1 (Wan-VAE), as implemented by diffusers'
``diffusers.models.autoencoders.autoencoder_kl_wan.AutoencoderKLWan`` (the 2.1 variant only:
``is_residual=False``, no patchify). Released weights (e.g. the ``vae/`` folder of
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) load through :func:`wan_vae_key_map` /
:func:`load_wan_vae_state`.

The model is a causal 3D-convolutional VAE compressing video 4x in time and 8x8 in space into
16 channels: video (B, 1 + 4k, H, W, 3) in [-1, 1] <-> latents (B, 1 + k, H/8, W/8, 16).
Channels-last throughout (the reference is channels-first); float32 compute.

What the reference computes, and how this module matches it:

* **Causal convolutions** pad time with *zeros* on the past side only (``WanCausalConv3d``):
  a 3x3x3 conv sees frames f-2, f-1, f, with two zero frames before frame 0. (Our own
  ``sora_jax.models.vae.CausalConv3d`` replicates frame 0 instead: not interchangeable.)
* **RMS norm** (``WanRMS_norm``): ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the
  channels of each position; no bias at this config.
* **Resampling.** Encoder down stages: zero-pad one row / column at the bottom / right, 3x3
  conv of stride 2 per frame; a temporal stage then runs a (3, 1, 1) conv of stride 2 with no
  padding, but frame 0 passes through untouched. Decoder up stages: a temporal stage first runs
  a causal (3, 1, 1) conv to 2C channels on frames 1.. (zero history: frame 0 is not part of
  it), splits the channels into two frames each, and keeps frame 0 as it is; then nearest x2 in
  space and a 3x3 conv to C/2 channels. So T = 1 + 2m frames <-> 1 + m at each temporal stage.
* **Feature cache.** diffusers never runs the network on a whole video: ``encode`` feeds frame
  0 alone, then chunks of 4 frames, and ``decode`` one latent frame at a time, each conv
  keeping the last frames of its input (``feat_cache``) for the next chunk. Its temporal
  resampling only exists in that cached mode. Here the whole-video pass (``cache=None``)
  computes exactly what the chunked reference computes, and the same modules also run chunk by
  chunk with a :class:`sora_jax.models.vae.FeatureCache` (memory independent of the length):
  every chunked schedule gives the whole pass's output up to float rounding. Tails kept per
  conv have fixed sizes (two frames for a causal 3-tap conv, one for a temporal downsample), so
  under ``jax.jit`` all later chunks share one compile.
* **Mid block**: ResBlock, single-head self-attention over the H*W positions of each frame
  separately (``WanAttentionBlock``), ResBlock.
* **Posterior**: ``quant_conv`` (1x1x1) gives 2 * z_dim channels, mean then log-variance
  (clipped to [-30, 20] as ``DiagonalGaussianDistribution`` does); decode starts with
  ``post_quant_conv`` (1x1x1).
* **Latent statistics**: the config's ``latents_mean`` / ``latents_std`` become the model's
  ``latent_shift`` / ``latent_scale`` (``sora_jax.models.vae.LatentStat``), so
  ``(z - latent_shift) / latent_scale`` is the normalisation of diffusers' ``WanPipeline``
  (``(latents - latents_mean) * (1 / latents_std)``), and ``VAECodec`` applies it.

The module mirrors the interface of ``sora_jax.models.vae.CausalVAE`` (``encode`` ->
(mean, logvar), ``decode``, ``in_channels``, ``latent_channels``, ``spatial_downsample``,
``temporal_downsample``, ``latent_shape``, ``video_frames``, the two ``LatentStat`` variables,
``cache=`` arguments), so ``sora_jax.inference.latents.VAECodec`` and
``sora_jax.models.vae_streaming.StreamingVAE`` drive it unchanged; ``StreamingVAE(vae,
chunk=1)`` runs exactly diffusers' schedule (frame 0 alone, then 4 frames; decode one latent
frame at a time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import weight_map
from sora_jax.models.vae import CausalVideoGeometry, FeatureCache, LatentStat, _triple

__all__ = [
    "WAN_VAE_IGNORED_KEYS",
    "WanAttentionBlock",
    "WanCausalConv3d",
    "WanConv2d",
    "WanDecoder3d",
    "WanEncoder3d",
    "WanMidBlock",
    "WanRMSNorm",
    "WanResample",
    "WanResidualBlock",
    "WanUpBlock",
    "WanVAE",
    "WanVAEConfig",
    "load_wan_vae_state",
    "rms_gamma",
    "wan_vae_key_map",
]

# diffusers' AutoencoderKLWan defaults (the released Wan 2.1 VAE's statistics).
_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

#: Reference keys that are not parameters of ours. ``AutoencoderKLWan``'s state dict holds
#: parameters only (no buffers), so nothing is ignored.
WAN_VAE_IGNORED_KEYS: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The fields of diffusers' ``AutoencoderKLWan`` config (``vae/config.json``); defaults are
    the released Wan 2.1 VAE's.

    Attributes:
      base_dim: channels of the first encoder level (96).
      decoder_base_dim: the decoder's, None: ``base_dim``.
      z_dim: latent channels (16).
      dim_mult: per-level channel multipliers; len(dim_mult) - 1 down / up stages, each halving
        H and W.
      num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
      attn_scales: must be empty (the Wan 2.1 VAE has no attention outside its mid blocks).
      temperal_downsample: per down stage, whether it also halves time (diffusers' spelling);
        the decoder mirrors it.
      dropout: unused (inference only; the reference's dropout is inactive in eval mode).
      latents_mean, latents_std: per-channel latent statistics (z_dim each).
      is_residual: must be False (True is the Wan 2.2 VAE).
      in_channels, out_channels: pixel channels.
      patch_size: must be None or 1 (patchified input is the Wan 2.2 VAE).
      scale_factor_temporal, scale_factor_spatial: informative (pipelines read them); must
        agree with temperal_downsample / dim_mult when given.

    Raises:
      ValueError: (at construction) for a config this module does not implement or an
        inconsistent one; the message names the field.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        # Lists from JSON become tuples, so the config is hashable (a static model attribute).
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "in_channels", "out_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WanVAEConfig.{name} must be an int >= 1, got {v!r}")
        if self.decoder_base_dim is not None and (
                not isinstance(self.decoder_base_dim, int) or self.decoder_base_dim < 1):
            raise ValueError(f"WanVAEConfig.decoder_base_dim must be None or an int >= 1, "
                             f"got {self.decoder_base_dim!r}")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 0:
            raise ValueError(f"WanVAEConfig.num_res_blocks must be an int >= 0, got {self.num_res_blocks!r}")
        if len(self.dim_mult) < 1 or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig.dim_mult must be positive ints, got {self.dim_mult}")
        if self.is_residual:
            raise ValueError("WanVAEConfig.is_residual=True is the Wan 2.2 VAE; only the Wan 2.1 "
                             "VAE (is_residual=False) is implemented")
        if self.patch_size not in (None, 1):
            raise ValueError(f"WanVAEConfig.patch_size={self.patch_size} (Wan 2.2 VAE) is not "
                             "implemented; the Wan 2.1 VAE has patch_size None")
        if self.attn_scales:
            raise ValueError(f"WanVAEConfig.attn_scales={self.attn_scales}: encoder attention "
                             "outside the mid block is not implemented (the Wan 2.1 VAE has none)")
        n_stages = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != n_stages:
            raise ValueError(f"WanVAEConfig.temperal_downsample needs one bool per down stage "
                             f"({n_stages}), got {self.temperal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"WanVAEConfig.latents_mean / latents_std need z_dim={self.z_dim} "
                             f"values, got {len(self.latents_mean)} / {len(self.latents_std)}")
        if any(not s > 0 for s in self.latents_std):
            raise ValueError(f"WanVAEConfig.latents_std must be positive, got {self.latents_std}")
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != self.spatial_downsample:
            raise ValueError(f"WanVAEConfig.scale_factor_spatial={self.scale_factor_spatial} "
                             f"disagrees with dim_mult ({n_stages} stages: {self.spatial_downsample})")
        if self.scale_factor_temporal is not None and self.scale_factor_temporal != self.temporal_downsample:
            raise ValueError(f"WanVAEConfig.scale_factor_temporal={self.scale_factor_temporal} "
                             f"disagrees with temperal_downsample ({self.temporal_downsample})")

    @property
    def spatial_downsample(self) -> int:
        """Pixels per latent along H and W: 2 ** (len(dim_mult) - 1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_downsample(self) -> int:
        """Frames per latent frame after the first: 2 ** (number of temporal stages)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WanVAEConfig:
        """From a diffusers config dict; keys starting with "_" (``_class_name``,
        ``_diffusers_version``, ...) are skipped.

        Raises:
          ValueError: for keys this config does not know (they could change the computation),
            or as the constructor.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown AutoencoderKLWan config keys {unknown}; known: {sorted(fields)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> WanVAEConfig:
        """From a diffusers ``vae/config.json`` (or the folder holding it).

        Raises:
          FileNotFoundError: no such file; ValueError: as :meth:`from_dict`.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _encoder_plan(cfg: WanVAEConfig) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Channel widths and the flat ``down_blocks`` list of diffusers' ``WanEncoder3d``:
    ("res", c_in, c_out) or ("downsample2d" / "downsample3d", c, c), in order."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    plan = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", cin, cout))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            plan.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", cout, cout))
    return dims, plan


def _decoder_plan(cfg: WanVAEConfig) -> tuple[list[int], list[tuple[int, int, str | None]]]:
    """Channel widths and the ``up_blocks`` of diffusers' ``WanDecoder3d`` (2.1 variant):
    (c_in, c_out, upsample mode or None) each; an up stage's conv halves its channels, so every
    block after the first starts at half the previous width."""
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_up = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2
        mode = None
        if i != len(cfg.dim_mult) - 1:
            mode = "upsample3d" if temporal_up[i] else "upsample2d"
        blocks.append((cin, cout, mode))
    return dims, blocks


# --------------------------------------------------------------------------------- layers


def _precision(p) -> jax.lax.Precision | None:
    if p is None or isinstance(p, jax.lax.Precision):
        return p
    return jax.lax.Precision(p)


def _init_kernel(rngs: nnx.Rngs | None, shape: tuple[int, ...]) -> jax.Array:
    """Zeros without ``rngs`` (weights are meant to be loaded); else LeCun normal over the
    fan-in (all axes but the last), drawn flat (cheap to compile on CPU)."""
    if rngs is None:
        return jnp.zeros(shape, jnp.float32)
    fan_in = math.prod(shape[:-1])
    flat = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (math.prod(shape),), jnp.float32)
    return (flat / math.sqrt(fan_in) / 0.87962566103423978).reshape(shape)


def _conv_valid_time(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int, int],
                     space_pad: tuple[tuple[int, int], tuple[int, int]], impl: str,
                     precision) -> jax.Array:
    """3D conv, 'valid' in time, zero-padded by ``space_pad`` in H and W.

    x (B, T, H, W, C_in), kernel (kt, kh, kw, C_in, C_out) -> (B, T', H', W', C_out) with
    T' = max((T - kt) // st + 1, 0) (an empty time axis when T < kt).
    """
    kt, kh, kw, _, cout = kernel.shape
    st, sh, sw = strides
    b, tp, h, w, _ = x.shape
    h_out = (h + sum(space_pad[0]) - kh) // sh + 1
    w_out = (w + sum(space_pad[1]) - kw) // sw + 1
    t_out = (tp - kt) // st + 1 if tp >= kt else 0
    if t_out == 0:
        return jnp.zeros((b, 0, h_out, w_out, cout), x.dtype)
    if impl == "auto":
        impl = "taps" if jax.default_backend() == "cpu" else "conv3d"
    if impl == "conv3d":
        y = jax.lax.conv_general_dilated(
            x, kernel, (st, sh, sw), ((0, 0),) + tuple(space_pad),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision,
        )
    else:
        # The kt frames each output sees, stacked along channels, time folded into batch: one
        # 2D conv (XLA:CPU runs 3D convs several times slower than the equivalent 2D one).
        taps = [x[:, tau:tau + st * (t_out - 1) + 1:st] for tau in range(kt)]
        xs = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
        xs = xs.reshape((b * t_out,) + xs.shape[2:])
        k2 = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kt * kernel.shape[3], cout)
        y = jax.lax.conv_general_dilated(
            xs, k2, (sh, sw), tuple(space_pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
        )
        y = y.reshape((b, t_out) + y.shape[1:])
    return y + bias


class WanCausalConv3d(nnx.Module):
    """diffusers' ``WanCausalConv3d``: a Conv3d padded in time by 2 * padding_t *zero* frames on
    the past side only, and by padding_h / padding_w on both sides in space.

    Args:
      in_channels, out_channels: feature sizes.
      kernel_size, stride, padding: int or (t, h, w), as the torch layer's arguments.
      impl: "taps" (time taps folded into channels, one 2D conv; fastest on CPU), "conv3d" (one
        native 3D conv; for GPU / TPU) or "auto" (taps on the CPU backend). Same result to
        float rounding.
      precision: ``jax.lax.Precision`` (or its name) of the conv; "highest" keeps float32 on
        accelerators that would otherwise use TF32 / bf16 passes.
      rngs: None: zero kernel (to be loaded); else LeCun-normal init. Bias starts at zero.

    Parameters: ``kernel`` (kt, kh, kw, C_in, C_out), ``bias`` (C_out,), float32.

    Call: ``conv(x, cache=None)``: x (B, T, H, W, C_in) float -> (B, T', H', W', C_out) with
    T' = T for a causally padded conv (2 * padding_t = kt - 1, stride 1). With a
    ``FeatureCache`` (padded convs only; they own one slot) the zero frames of a later chunk are
    replaced by the stored last 2 * padding_t frames of the previous chunk's padded input, so
    chunked outputs concatenate to the whole-video output.

    Raises:
      ValueError: a padded conv with a temporal stride other than 1 (the cache assumes it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, impl: str = "auto",
                 precision="highest", rngs: nnx.Rngs | None = None):
        self.kernel_size = _triple(kernel_size)
        self.strides = _triple(stride)
        pt, ph, pw = _triple(padding)
        self.time_pad = 2 * pt
        if self.time_pad and self.strides[0] != 1:
            raise ValueError("WanCausalConv3d: a time-padded conv must have temporal stride 1")
        if impl not in ("auto", "taps", "conv3d"):
            raise ValueError(f"WanCausalConv3d: impl must be 'auto', 'taps' or 'conv3d', got {impl!r}")
        self.space_pad = ((ph, ph), (pw, pw))
        self.impl = impl
        self.precision = _precision(precision)
        self.kernel = nnx.Param(_init_kernel(rngs, (*self.kernel_size, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        if self.time_pad:
            prev = None if cache is None else cache.take()
            if prev is None:
                prev = jnp.zeros((x.shape[0], self.time_pad) + x.shape[2:], x.dtype)
            x = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
            if cache is not None:
                cache.put(x[:, x.shape[1] - self.time_pad:])
        return _conv_valid_time(x, self.kernel[...], self.bias[...], self.strides, self.space_pad,
                                self.impl, self.precision)


class WanConv2d(nnx.Module):
    """A torch ``nn.Conv2d`` applied to every frame of a video (time folded into batch).

    Args:
      in_channels, out_channels, kernel_size: sizes (square kernel).
      stride: spatial stride.
      padding: ((top, bottom), (left, right)) zero padding.
      precision, rngs: as ``WanCausalConv3d``.

    Parameters: ``kernel`` (k, k, C_in, C_out), ``bias`` (C_out,).

    Call: x (B, T, H, W, C_in) -> (B, T, H', W', C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                 precision="highest", rngs: nnx.Rngs | None = None):
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.precision = _precision(precision)
        self.kernel = nnx.Param(_init_kernel(rngs, (kernel_size, kernel_size, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv_valid_time(x, self.kernel[...][None], self.bias[...], (1, self.stride, self.stride),
                                self.padding, "taps", self.precision)


class WanRMSNorm(nnx.Module):
    """diffusers' ``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the
    channels of each position (``F.normalize`` along the channel axis), no bias.

    Parameter: ``gamma`` (C,) float32 (ones at init). Call: x (..., C) -> same shape.
    """

    def __init__(self, dim: int):
        self.scale = float(dim) ** 0.5
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        return x / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...]


class WanResidualBlock(nnx.Module):
    """diffusers' ``WanResidualBlock``: (RMS norm, SiLU, causal 3x3x3 conv) twice plus a skip
    (a 1x1x1 conv when the width changes). Dropout is inactive (inference).

    Call: ``block(x, cache=None)``: x (B, T, H, W, C_in) -> (B, T, H, W, C_out). Two cache slots
    (conv1, conv2).
    """

    def __init__(self, in_dim: int, out_dim: int, *, impl: str = "auto", precision="highest",
                 rngs: nnx.Rngs | None = None):
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        self.norm1 = WanRMSNorm(in_dim)
        self.conv1 = WanCausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
        self.norm2 = WanRMSNorm(out_dim)
        self.conv2 = WanCausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(nnx.silu(self.norm1(x)), cache)
        h = self.conv2(nnx.silu(self.norm2(h)), cache)
        return h + skip


class WanAttentionBlock(nnx.Module):
    """diffusers' ``WanAttentionBlock``: single-head self-attention over the H*W positions of
    each frame on its own (so causal in time), with RMS norm, 1x1 qkv / output convs and a
    residual. Softmax scale 1 / sqrt(C), as ``F.scaled_dot_product_attention``.

    Call: x (B, T, H, W, C) -> same shape. Memory: a (H*W)^2 float32 score matrix per frame
    (no cache slot).
    """

    def __init__(self, dim: int, *, precision="highest", rngs: nnx.Rngs | None = None):
        self.norm = WanRMSNorm(dim)
        self.to_qkv = WanConv2d(dim, 3 * dim, 1, precision=precision, rngs=rngs)
        self.proj = WanConv2d(dim, dim, 1, precision=precision, rngs=rngs)
        self.precision = _precision(precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision) / math.sqrt(c)
        attn = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("nqk,nkc->nqc", attn, v, precision=self.precision)
        return self.proj(o.reshape(b, t, h, w, c)) + x


def _interleave_time(y: jax.Array) -> jax.Array:
    """(B, t, H, W, 2C) -> (B, 2t, H, W, C): channels [0, C) become frame 2i, [C, 2C) frame
    2i + 1 (diffusers' reshape(b, 2, c, t, h, w) and stack on the time axis)."""
    b, t, h, w, c2 = y.shape
    c = c2 // 2
    return y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)


class WanResample(nnx.Module):
    """diffusers' ``WanResample`` (modes upsample2d / upsample3d / downsample2d / downsample3d).

    * downsample2d: zero-pad one row / column at the bottom / right, 3x3 conv stride 2, per frame.
    * downsample3d: the same, then ``time_conv`` ((3, 1, 1), stride 2, no padding) over time;
      frame 0 passes untouched: T = 1 + 2m -> 1 + m, output j >= 1 = time_conv(frames 2j-2 ..
      2j). With a cache, a later chunk of 2m frames gives m (one slot: the last frame).
    * upsample3d: ``time_conv`` (causal (3, 1, 1), zero history, C -> 2C) on frames 1.. (frame 0
      kept alone), each output split into two frames: 1 + m -> 1 + 2m (a later chunk: m -> 2m;
      one slot: two frames). Then as upsample2d.
    * upsample2d: nearest x2 in H and W, 3x3 conv (padding 1) to ``upsample_out_dim``
      (default dim // 2).

    Call: ``resample(x, cache=None)``: x (B, T, H, W, dim) -> resampled video.

    Raises:
      ValueError: unknown mode.
    """

    def __init__(self, dim: int, mode: str, *, upsample_out_dim: int | None = None, impl: str = "auto",
                 precision="highest", rngs: nnx.Rngs | None = None):
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"WanResample: unknown mode {mode!r}")
        self.mode = mode
        kw = dict(precision=precision, rngs=rngs)
        time_conv = None
        if mode.startswith("upsample"):
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.conv = WanConv2d(dim, out, 3, padding=((1, 1), (1, 1)), **kw)
            if mode == "upsample3d":
                time_conv = WanCausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), impl=impl, **kw)
        else:
            self.conv = WanConv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
            if mode == "downsample3d":
                time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), impl=impl, **kw)
        self.time_conv = time_conv

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        first = cache is None or cache.first
        if self.mode.startswith("upsample"):
            if self.time_conv is not None:
                if first:
                    # Frame 0 stays alone; frames 1.. start a fresh causal history (zeros), as
                    # diffusers' "Rep" cache entry makes its second chunk do.
                    x = jnp.concatenate([x[:, :1], _interleave_time(self.time_conv(x[:, 1:], cache))], axis=1)
                else:
                    x = _interleave_time(self.time_conv(x, cache))
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return self.conv(x)
        x = self.conv(x)
        if self.time_conv is not None:
            padded = x if first else jnp.concatenate([cache.take().astype(x.dtype), x], axis=1)
            n = max((padded.shape[1] - 3) // 2 + 1, 0)
            if cache is not None:
                cache.put(padded[:, 2 * n:])
            y = self.time_conv(padded)
            x = jnp.concatenate([x[:, :1], y], axis=1) if first else y
        return x


class WanMidBlock(nnx.Module):
    """diffusers' ``WanMidBlock`` (num_layers=1): ResBlock, attention, ResBlock at width dim.

    Call: ``mid(x, cache=None)``: (B, T, H, W, dim) -> same shape.
    """

    def __init__(self, dim: int, *, impl: str = "auto", precision="highest", rngs: nnx.Rngs | None = None):
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        self.resnets = nnx.List([WanResidualBlock(dim, dim, **kw), WanResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([WanAttentionBlock(dim, precision=precision, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class WanEncoder3d(nnx.Module):
    """diffusers' ``WanEncoder3d`` (2.1 variant): conv_in, the flat ``down_blocks`` list
    (ResBlocks and resamples in diffusers' order and indices), mid block, RMS norm, SiLU,
    conv_out to 2 * z_dim channels.

    Call: ``enc(x, cache=None)``: (B, T, H, W, in_channels) -> (B, t, H / s, W / s, 2 * z_dim)
    (before ``quant_conv``).
    """

    def __init__(self, cfg: WanVAEConfig, *, impl: str = "auto", precision="highest",
                 rngs: nnx.Rngs | None = None):
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        dims, plan = _encoder_plan(cfg)
        self.conv_in = WanCausalConv3d(cfg.in_channels, dims[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List([
            WanResidualBlock(cin, cout, **kw) if kind == "res" else WanResample(cout, kind, **kw)
            for kind, cin, cout in plan
        ])
        self.mid_block = WanMidBlock(dims[-1], **kw)
        self.norm_out = WanRMSNorm(dims[-1])
        self.conv_out = WanCausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(nnx.silu(self.norm_out(x)), cache)


class WanUpBlock(nnx.Module):
    """diffusers' ``WanUpBlock``: num_res_blocks + 1 ResBlocks, then an optional
    ``WanResample`` (``upsampler``; diffusers' ``upsamplers.0``).

    Call: ``block(x, cache=None)``: (B, t, h, w, in_dim) -> upsampled (B, t', h', w', C').
    """

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 impl: str = "auto", precision="highest", rngs: nnx.Rngs | None = None):
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        resnets = []
        for _ in range(num_res_blocks + 1):
            resnets.append(WanResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsampler = None if upsample_mode is None else WanResample(out_dim, upsample_mode, **kw)

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache)


class WanDecoder3d(nnx.Module):
    """diffusers' ``WanDecoder3d`` (2.1 variant): conv_in, mid block, ``up_blocks``, RMS norm,
    SiLU, conv_out.

    Call: ``dec(z, cache=None)``: (B, t, h, w, z_dim) (after ``post_quant_conv``) ->
    (B, 1 + td * (t - 1), h * s, w * s, out_channels), or td * t frames for a later chunk.
    """

    def __init__(self, cfg: WanVAEConfig, *, impl: str = "auto", precision="highest",
                 rngs: nnx.Rngs | None = None):
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        dims, blocks = _decoder_plan(cfg)
        self.conv_in = WanCausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = WanMidBlock(dims[0], **kw)
        self.up_blocks = nnx.List([
            WanUpBlock(cin, cout, cfg.num_res_blocks, mode, **kw) for cin, cout, mode in blocks
        ])
        self.norm_out = WanRMSNorm(dims[-1])
        self.conv_out = WanCausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(nnx.silu(self.norm_out(x)), cache)


# --------------------------------------------------------------------------------- model


class WanVAE(CausalVideoGeometry, nnx.Module):
    """The Wan 2.1 video VAE (Wan Team 2025, arXiv 2503.20314; diffusers' ``AutoencoderKLWan``,
    2.1 variant), channels-last, float32, with the interface of ``sora_jax.models.vae.CausalVAE``.

    Args:
      config: a :class:`WanVAEConfig` (default: the released Wan 2.1 VAE's).
      impl: causal-conv implementation, "auto" / "taps" / "conv3d" (see ``WanCausalConv3d``).
      precision: matmul / conv precision (default "highest": float32 on every backend).
      rngs: None: zero weights (load them with :func:`load_wan_vae_state`); else a random init.

    Attributes:
      config, in_channels, latent_channels (= z_dim), spatial_downsample (8),
      temporal_downsample (4); ``latent_shift`` / ``latent_scale``: ``LatentStat`` (z_dim,)
      float32 from the config's latents_mean / latents_std.

    Parameter paths mirror diffusers' keys (``encoder.down_blocks.3.time_conv.weight`` ->
    ``("encoder", "down_blocks", 3, "time_conv", "kernel")``; the per-frame 2D conv of a resample
    is ``conv`` (diffusers' ``resample.1``), a decoder block's resample ``upsampler``
    (``upsamplers.0``)). See :func:`wan_vae_key_map`.
    """

    def __init__(self, config: WanVAEConfig | None = None, *, impl: str = "auto", precision="highest",
                 rngs: nnx.Rngs | None = None):
        cfg = WanVAEConfig() if config is None else config
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.latent_channels = cfg.z_dim
        self.spatial_downsample = cfg.spatial_downsample
        self.temporal_downsample = cfg.temporal_downsample
        self.latent_shift = LatentStat(jnp.asarray(cfg.latents_mean, jnp.float32))
        self.latent_scale = LatentStat(jnp.asarray(cfg.latents_std, jnp.float32))
        kw = dict(impl=impl, precision=precision, rngs=rngs)
        self.encoder = WanEncoder3d(cfg, **kw)
        self.quant_conv = WanCausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = WanCausalConv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = WanDecoder3d(cfg, **kw)

    def encode(self, video: jax.Array, cache: FeatureCache | None = None) -> tuple[jax.Array, jax.Array]:
        """Posterior of a video (or of one time chunk of it), as diffusers'
        ``AutoencoderKLWan.encode(x).latent_dist`` (mean, logvar).

        Args:
          video: (B, T, H, W, in_channels) float in [-1, 1]; T = 1 + 4k, H and W multiples of 8.
          cache: None for a whole video. For chunked encoding a ``FeatureCache``: a new one for
            the first chunk (1 + 4k frames; diffusers uses frame 0 alone), then one holding the
            previous chunk's ``feats`` for each later chunk (4k frames, k >= 1; diffusers uses
            4). The chunks' latents concatenate to the whole pass's.

        Returns:
          (mean, logvar), float32 (B, t, H / 8, W / 8, z_dim) each (t = 1 + k, or k for a later
          chunk); logvar clipped to [-30, 20]. ``mean`` is the deterministic code (diffusers'
          ``latent_dist.mode()``); :meth:`sample` draws from the posterior.

        Raises:
          ValueError: video not 5-D with in_channels channels, or T / H / W not as above.
        """
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(f"encode expects video of shape (B, T, H, W, {self.in_channels}), got {video.shape}")
        _, T, H, W, _ = video.shape
        td = self.temporal_downsample
        if cache is not None and not cache.first:
            if T < td or T % td:
                raise ValueError(f"a later chunk of a chunked encode must have a positive multiple of "
                                 f"temporal_downsample={td} frames, got T={T}")
            T = T + 1
        self._check_video_dims(T, H, W, what=f"video of shape {tuple(video.shape)}")
        h = self.quant_conv(self.encoder(video.astype(jnp.float32), cache))
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        """Decodes latents (or one time chunk of them) to video.

        Args:
          z: (B, t, h, w, z_dim) float raw latents (not normalised).
          cache: None for the whole latent video; for chunked decoding a ``FeatureCache`` (new
            for the first chunk, then the previous chunk's ``feats``); any t >= 1 per chunk
            (diffusers decodes one latent frame at a time).

        Returns:
          float32 (B, T, 8h, 8w, out_channels), T = 1 + 4 (t - 1) (4t for a later chunk).
          Unbounded: diffusers clamps its output to [-1, 1] afterwards (``VAECodec.decode``
          clips too); this is the value before that clamp.

        Raises:
          ValueError: z not 5-D with z_dim channels.
        """
        if z.ndim != 5 or z.shape[-1] != self.latent_channels or min(z.shape[1:4]) < 1:
            raise ValueError(f"decode expects latents of shape (B, t, h, w, {self.latent_channels}) with "
                             f"t, h, w >= 1, got {z.shape}")
        return self.decoder(self.post_quant_conv(z.astype(jnp.float32)), cache)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A posterior draw ``mean + exp(logvar / 2) * eps``, eps ~ N(0, I) (diffusers'
        ``DiagonalGaussianDistribution.sample``, with a JAX key). Shapes as :meth:`encode`'s."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def __call__(self, video: jax.Array, *, key: jax.Array | None = None,
                 sample_posterior: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, take the mean (or a sample when ``key`` is given and sample_posterior), decode.

        Returns:
          (recon, mean, logvar); recon has the shape of video, unbounded.

        Raises:
          ValueError: as :meth:`encode`.
        """
        mean, logvar = self.encode(video)
        z = self.sample(mean, logvar, key) if (sample_posterior and key is not None) else mean
        return self.decode(z), mean, logvar


# --------------------------------------------------------------------------------- weights


@weight_map.register_shape(lambda s: (int(np.prod(s[0])),))
def rms_gamma(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``WanRMS_norm.gamma`` (C, 1, 1, 1) or (C, 1, 1) -> our (C,)."""
    (g,) = arrays
    return np.asarray(g).reshape(-1)


# (C,) does not say whether the reference norm is WanRMS_norm(images=True) (C, 1, 1: the mid
# block attention's) or images=False (C, 1, 1, 1: every other): the export passes the shape
@weight_map.register_inverse(rms_gamma, lambda ours, known: [known[0] or _needs_gamma_shape(ours)])
def _rms_gamma_inverse(g: np.ndarray, shapes) -> list[np.ndarray]:
    return [np.asarray(g).reshape(shapes[0])]


def _needs_gamma_shape(ours: tuple[int, ...]) -> tuple[int, ...]:
    raise ValueError(f"the reference shape of an RMS-norm gamma ({ours[0]}, 1, 1[, 1]) is needed to invert it "
                     "(pass it in `known`)")


def wan_vae_key_map(cfg: WanVAEConfig) -> list[weight_map.Target]:
    """Every diffusers ``AutoencoderKLWan`` state-dict key -> our :class:`WanVAE` parameter.

    Args:
      cfg: the model's config (the map follows its block structure; no model is built).

    Returns:
      One ``weight_map.Target`` per parameter of ours (``nnx.to_flat_state`` paths of
      ``nnx.state(model, nnx.Param)``): conv weights through ``weight_map.conv_kernel`` (torch
      (out, in, *k) -> (*k, in, out)), biases through ``copy``, RMS-norm gammas through
      :func:`rms_gamma`. Each target has ``split`` None: export inverts them through the
      inverses registered with the conversions (``weight_map.invert``; the gammas' reference
      shapes must be passed, see ``_rms_gamma_inverse``).
    """
    targets: list[weight_map.Target] = []

    def conv(ref: str, path: tuple) -> None:
        targets.append(weight_map.Target(path + ("kernel",), (f"{ref}.weight",), weight_map.conv_kernel))
        targets.append(weight_map.Target(path + ("bias",), (f"{ref}.bias",), weight_map.copy))

    def norm(ref: str, path: tuple) -> None:
        targets.append(weight_map.Target(path + ("gamma",), (f"{ref}.gamma",), rms_gamma))

    def res(ref: str, path: tuple, cin: int, cout: int) -> None:
        norm(f"{ref}.norm1", path + ("norm1",))
        conv(f"{ref}.conv1", path + ("conv1",))
        norm(f"{ref}.norm2", path + ("norm2",))
        conv(f"{ref}.conv2", path + ("conv2",))
        if cin != cout:
            conv(f"{ref}.conv_shortcut", path + ("conv_shortcut",))

    def resample(ref: str, path: tuple, mode: str) -> None:
        conv(f"{ref}.resample.1", path + ("conv",))
        if mode.endswith("3d"):
            conv(f"{ref}.time_conv", path + ("time_conv",))

    def mid(ref: str, path: tuple, dim: int) -> None:
        for i in range(2):
            res(f"{ref}.resnets.{i}", path + ("resnets", i), dim, dim)
        a, ap = f"{ref}.attentions.0", path + ("attentions", 0)
        norm(f"{a}.norm", ap + ("norm",))
        conv(f"{a}.to_qkv", ap + ("to_qkv",))
        conv(f"{a}.proj", ap + ("proj",))

    dims, plan = _encoder_plan(cfg)
    conv("encoder.conv_in", ("encoder", "conv_in"))
    for i, (kind, cin, cout) in enumerate(plan):
        ref, path = f"encoder.down_blocks.{i}", ("encoder", "down_blocks", i)
        if kind == "res":
            res(ref, path, cin, cout)
        else:
            resample(ref, path, kind)
    mid("encoder.mid_block", ("encoder", "mid_block"), dims[-1])
    norm("encoder.norm_out", ("encoder", "norm_out"))
    conv("encoder.conv_out", ("encoder", "conv_out"))
    conv("quant_conv", ("quant_conv",))
    conv("post_quant_conv", ("post_quant_conv",))
    dims, blocks = _decoder_plan(cfg)
    conv("decoder.conv_in", ("decoder", "conv_in"))
    mid("decoder.mid_block", ("decoder", "mid_block"), dims[0])
    for i, (cin, cout, mode) in enumerate(blocks):
        ref, path = f"decoder.up_blocks.{i}", ("decoder", "up_blocks", i)
        for j in range(cfg.num_res_blocks + 1):
            res(f"{ref}.resnets.{j}", path + ("resnets", j), cin if j == 0 else cout, cout)
        if mode is not None:
            resample(f"{ref}.upsamplers.0", path + ("upsampler",), mode)
    norm("decoder.norm_out", ("decoder", "norm_out"))
    conv("decoder.conv_out", ("decoder", "conv_out"))
    return targets


def load_wan_vae_state(model: WanVAE, tensors: Mapping[str, np.ndarray]) -> WanVAE:
    """``model`` with every parameter taken from a diffusers ``AutoencoderKLWan`` state dict
    (:func:`sora_jax.models.weight_map.load`).

    Args:
      model: a :class:`WanVAE` (concrete or abstract) whose config matches the checkpoint's; it
        is not modified.
      tensors: reference key -> array in torch layout (a dict, e.g. ``safetensors.numpy.load_file``
        of ``vae/diffusion_pytorch_model.safetensors``, or a lazy
        :class:`~sora_jax.safetensors_files.SafetensorsReader`); cast to the parameters' dtype.

    Returns:
      a new :class:`WanVAE` holding the checkpoint's values.

    Raises:
      ValueError: listing every problem ``weight_map.check_complete`` finds (missing reference
        keys, unexpected keys, parameters without a key, shape mismatches); nothing is read then.
    """
    return weight_map.load(model, wan_vae_key_map(model.config), tensors, ignored=WAN_VAE_IGNORED_KEYS,
                           what="the Wan VAE checkpoint")
