"""Causal spacetime VAE: compresses video 4x in time and s x s in space.

Sora's technical report (OpenAI 2024, "Video generation models as world simulators") describes a
network that compresses raw video "both temporally and spatially" into a latent on which the
diffusion transformer works. We build it as a causal 3D-convolutional VAE in the style of
MAGVIT-v2 (Yu et al. 2024, "Language Model Beats Diffusion -- Tokenizer is Key to Visual
Generation"): every temporal convolution only looks at the current and past frames, with the
first frame replicated into the left padding (as in the CogVideoX and Wan VAEs). Hence

* the first frame is coded alone, so an image is a 1-frame video and images and videos share one
  latent space;
* a video of T = 1 + 4k frames maps to t = 1 + k latent frames, and latent frame j depends only on
  input frames 0 .. 4j; the decoder is causal in the same way, so output frame f depends only on
  latent frames 0 .. ceil(f / 4).

Shapes are channels-last throughout: video (B, T, H, W, C) float in [-1, 1]; latents
(B, t, h, w, c). The posterior is a diagonal Gaussian (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes"); see ``sora_jax.models.vae_loss`` for the objective.

Layout. The encoder has ``len(channel_mults)`` levels; level i runs ``num_res_blocks`` ResNet
blocks at ``base_channels * channel_mults[i]`` channels and then, if i < number of down stages,
one downsampling conv. Down stage i halves H and W when i < log2(spatial_downsample) and halves
the frame count (keeping frame 0 alone) when i < log2(temporal_downsample): the temporal
downsamples sit in the *first* stages, where they also cut the cost of every later layer. The
decoder mirrors this, so its temporal upsamples are in its last stages.

Normalisation is GroupNorm computed per frame (statistics over H, W and the channels of a
group, never over time): normalising over time would leak future frames into past ones and
break causality.

Chunked inference. Every module that convolves over time takes an optional ``FeatureCache``
(the feature cache of the Wan 2.1 VAE): fed a video a few frames at a time, the encoder and
decoder then give the same output as one whole-video pass, with memory that does not grow with
the video's length. Without a cache (training) the computation is exactly the whole-video pass.
Drivers (time chunks, spatial tiles with overlap blending) are in
``sora_jax.models.vae_streaming``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.data.patches import depth_to_space, space_to_depth
from sora_jax.models.patch_shortcut import LinearPatchShortcut

__all__ = [
    "FeatureCache",
    "CausalConv3d",
    "CausalGroupNorm",
    "ResBlock3d",
    "Downsample3d",
    "Upsample3d",
    "FrameAttention",
    "CausalEncoder",
    "CausalDecoder",
    "CausalVAE",
    "LatentStat",
]

class LatentStat(nnx.Variable):
    """Per-channel latent statistic (shift or scale) stored in the model, so it is saved and
    restored with every checkpoint; not a ``nnx.Param``, so the optimizer never updates it."""


LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _triple(x: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(x, int):
        return (x, x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 3:
        raise ValueError(f"expected an int or 3 ints, got {x}")
    return x  # type: ignore[return-value]


def _same_pad(size_kernel: int, stride: int) -> tuple[int, int]:
    # For even input sizes and kernel >= stride this equals XLA 'SAME' padding without needing
    # the input size; stride 1 gives the symmetric (k-1)/2 pad.
    total = max(size_kernel - stride, 0)
    return (total // 2, total - total // 2)


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def _default_groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` that is <= min(max_groups, channels // 4) (at least 1).

    Groups of at least 4 channels keep per-frame statistics stable on small feature maps.
    """
    cap = max(1, min(max_groups, channels // 4))
    for g in range(cap, 0, -1):
        if channels % g == 0:
            return g
    return 1


def _lecun_normal_flat(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """LeCun-normal kernel as ``nnx.initializers.lecun_normal`` (fan-in: all but last axis).

    Same distribution as the stock initializer, but drawn as one flat vector and reshaped:
    XLA:CPU compiles a 1-D threefry draw about 4x faster than a 5-D one, and eager model
    construction compiles one draw per distinct kernel shape (seconds per model on a laptop).
    """
    fan_in = math.prod(shape[:-1])
    # 0.8796... is the std of a standard normal truncated to [-2, 2] (as in variance_scaling).
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), jnp.float32)
    return (flat * std).reshape(shape)


class FeatureCache:
    """Per-conv temporal context carried from one time chunk of a video to the next.

    The feature cache of the Wan 2.1 VAE (Wan Team 2025, "Wan: Open and Advanced Large-Scale
    Video Generative Models", ``feat_cache`` / ``feat_idx``), made exact for the strided causal
    convolutions of MAGVIT-v2 (Yu et al. 2024). It is threaded through ``CausalEncoder`` /
    ``CausalDecoder`` calls; every ``CausalConv3d`` with a temporal kernel kt > 1 owns one slot,
    visited in call order (the order is fixed by the module tree, so slot i always belongs to
    the same conv). A slot holds the tail of that conv's causally padded input that outputs of
    later chunks still need: with P the padded input seen so far (first chunk: kt - 1 copies of
    frame 0 and the chunk; later chunks: the stored tail and the chunk) and
    n = (len(P) - kt) // st + 1 outputs produced, the new tail is P[st * n:]. Hence the
    concatenated outputs of the chunks equal the output of one whole-video pass, for any chunk
    lengths as long as every conv produces at least one output per chunk (what
    ``sora_jax.models.vae_streaming`` guarantees: encoder chunks of 1 + td*k frames first, then
    td*k frames; decoder chunks of any number of latent frames).

    A cache is a plain Python object, not a pytree: under ``jax.jit`` pass ``feats`` (a list of
    arrays, each (B, n_tail, H_l, W_l, C_l) in the conv's computation dtype) in and out of the
    jitted function and wrap it in a new ``FeatureCache`` inside. Memory: about kt - 1 frames
    per conv, independent of the video's length.

    Args:
      feats: the slots returned by the previous chunk's pass (``cache.feats``), or None for the
        first chunk of a video.

    Attributes:
      first: True on the first chunk (no slots given). ``Upsample3d`` needs it: the temporal
        upsample keeps latent frame 0 alone, so only the first chunk treats its first frame
        specially.
      feats: the slots, updated in place during a pass.
    """

    def __init__(self, feats: Sequence[jax.Array] | None = None):
        self.first = feats is None
        self.feats: list[jax.Array] = [] if feats is None else list(feats)
        self.index = 0

    def take(self) -> jax.Array | None:
        """The current slot's stored tail (None on the first chunk).

        Raises:
          ValueError: if a later chunk visits more slots than the first chunk created (the
            cache was made by a different model).
        """
        if self.first:
            return None
        if self.index >= len(self.feats):
            raise ValueError(
                f"FeatureCache has {len(self.feats)} slots but the model asks for slot "
                f"{self.index}: the cache comes from a different model"
            )
        return self.feats[self.index]

    def put(self, tail: jax.Array) -> None:
        """Stores the current slot's new tail and moves to the next slot."""
        if self.first:
            self.feats.append(tail)
        else:
            self.feats[self.index] = tail
        self.index += 1


class CausalConv3d(nnx.Module):
    """3D convolution that is causal in time and 'SAME'-padded in space.

    The input is padded with ``kt - 1`` copies of its first frame on the left of the time axis
    and nothing on the right (the causal padding of MAGVIT-v2 and the CogVideoX / Wan VAEs, with
    replication instead of zeros so that a 1-frame input is treated as a still image). Output
    frame f therefore depends only on input frames <= f * stride_t.

    Args:
      in_channels, out_channels: feature sizes.
      kernel_size: int or (kt, kh, kw).
      strides: int or (st, sh, sw). With st = 2 and kt = 3 an input of T = 1 + 2m frames gives
        1 + m frames; output 0 sees only input 0 (three copies), output j >= 1 sees inputs
        2j-2 .. 2j.
      impl: "taps" computes the 3D conv as one 2D conv over the kt frames each output sees,
        stacked along channels (XLA:CPU runs 3D convs 4-5x slower than the equivalent 2D
        ones); "conv3d" uses one native 3D conv (for GPU / TPU); "auto" picks "taps" on the
        CPU backend. Same parameters and result (to float rounding) either way.
      dtype: computation dtype (None: inferred from the input and float32 params).
      rngs: ``nnx.Rngs`` for initialisation (kernel: LeCun normal over kt*kh*kw*C_in fan-in,
        like ``nnx.Conv``; bias: zeros).

    Call: ``conv(x, cache=None)``: x (B, T, H, W, C_in) -> (B, T', H', W', C_out) with
    T' = (T - 1) // st + 1 and H' = H / sh, W' = W / sw (H, W even when strided). With a
    ``FeatureCache`` the left padding of a later chunk is the previous chunk's stored tail
    instead of copies of its first frame, and T' = (len(tail) + T - kt) // st + 1.

    Raises:
      ValueError: if kt < st or impl is unknown; at call time, if a cached chunk is too short to
        produce one output frame.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        strides: int | Sequence[int] = 1,
        *,
        impl: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.kernel_size = _triple(kernel_size)
        self.strides = _triple(strides)
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        if kt < st:
            # With kt < st some frames would never be seen by any output.
            raise ValueError(
                f"CausalConv3d: temporal kernel {kt} must be >= temporal stride {st}"
            )
        if impl not in ("auto", "taps", "conv3d"):
            raise ValueError(f"CausalConv3d: impl must be 'auto', 'taps' or 'conv3d', got {impl!r}")
        self.impl = impl
        self.dtype = dtype
        self.time_pad = kt - 1
        self.space_pad = (_same_pad(kh, sh), _same_pad(kw, sw))
        self.kernel = nnx.Param(
            _lecun_normal_flat(rngs.params(), (kt, kh, kw, in_channels, out_channels))
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...]
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        kt = self.kernel_size[0]
        st, sh, sw = self.strides
        if self.time_pad > 0:
            prev = None if cache is None else cache.take()
            if prev is None:
                first = jnp.repeat(x[:, :1], self.time_pad, axis=1)
                x = jnp.concatenate([first, x], axis=1)
            else:
                x = jnp.concatenate([prev.astype(dtype), x], axis=1)
            if cache is not None:
                n_out = (x.shape[1] - kt) // st + 1
                if n_out < 1:
                    raise ValueError(
                        f"CausalConv3d: a cached chunk of {x.shape[1]} padded frames is too "
                        f"short for temporal kernel {kt} and stride {st}"
                    )
                cache.put(x[:, st * n_out:])
        b, tp = x.shape[:2]
        t_out = (tp - kt) // st + 1
        impl = self.impl
        if impl == "auto":
            impl = "taps" if jax.default_backend() == "cpu" else "conv3d"
        if impl == "conv3d":
            y = jax.lax.conv_general_dilated(
                x, kernel, (st, sh, sw), ((0, 0),) + self.space_pad,
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            )
        else:
            # Stack the kt frames each output sees along channels (frames tau, tau + st, ... of
            # the padded input meet tap tau) and fold time into batch: one 2D conv with a
            # (kh, kw, kt*C_in, C_out) kernel, the same sum of products as the 3D conv.
            taps = [x[:, tau : tau + st * (t_out - 1) + 1 : st] for tau in range(kt)]
            xs = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
            xs = xs.reshape((b * t_out,) + xs.shape[2:])
            k2 = jnp.moveaxis(kernel, 0, 2)
            k2 = k2.reshape(k2.shape[:2] + (kt * k2.shape[3], k2.shape[4]))
            y = jax.lax.conv_general_dilated(
                xs, k2, (sh, sw), self.space_pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            y = y.reshape((b, t_out) + y.shape[1:])
        return y + bias


class CausalGroupNorm(nnx.Module):
    """GroupNorm with statistics per frame: over (H, W, channels of a group), never over time.

    Args:
      channels: feature size C.
      num_groups: number of groups (must divide C).
      dtype: computation dtype (None: inferred).
      rngs: ``nnx.Rngs``.

    Call: x (B, T, H, W, C) -> same shape.
    """

    def __init__(self, channels: int, num_groups: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, num_groups=num_groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        # Folding time into batch makes the stock GroupNorm reduce per frame.
        y = self.norm(x.reshape((b * t,) + x.shape[2:]))
        return y.reshape(x.shape)


class ResBlock3d(nnx.Module):
    """Pre-activation ResNet block: (GroupNorm, SiLU, CausalConv3d 3x3x3) twice, plus a skip.

    The skip is a 1x1x1 conv when the channel count changes. Causal: output frame f depends on
    input frames <= f only.

    Call: ``block(x, cache=None)``: x (B, T, H, W, C_in) -> (B, T, H, W, C_out); ``cache``: a
    ``FeatureCache`` for chunked inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm_groups: int = 32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = CausalGroupNorm(
            in_channels, _default_groups(in_channels, norm_groups), dtype=dtype, rngs=rngs
        )
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = CausalGroupNorm(
            out_channels, _default_groups(out_channels, norm_groups), dtype=dtype, rngs=rngs
        )
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        if in_channels != out_channels:
            self.skip = CausalConv3d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
        else:
            self.skip = None

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)), cache)
        h = self.conv2(nnx.silu(self.norm2(h)), cache)
        s = x if self.skip is None else self.skip(x, cache)
        return s + h


class _Resample3d(nnx.Module):
    """A resampling stage around one causal 3x3x3 conv, strided by 2 in space and / or time
    when the subclass is ``strided`` (a down stage), else of stride 1 (an up stage repeats
    first)."""

    strided: bool

    def __init__(self, in_channels: int, out_channels: int, *, spatial: bool, temporal: bool,
                 dtype=None, rngs: nnx.Rngs):
        self.spatial = spatial
        self.temporal = temporal
        strides = (2 if temporal else 1, 2 if spatial else 1, 2 if spatial else 1)
        self.conv = CausalConv3d(in_channels, out_channels, 3, strides if self.strided else (1, 1, 1),
                                 dtype=dtype, rngs=rngs)


class Downsample3d(_Resample3d):
    """One down stage: a causal 3x3x3 conv with stride 2 in space and/or time.

    Temporal stride keeps frame 0 alone: T = 1 + 2m frames -> 1 + m frames; output 0 depends only
    on input 0, output j >= 1 on inputs <= 2j (see ``CausalConv3d``).

    Call: ``down(x, cache=None)``: x (B, T, H, W, C_in) -> (B, T', H / 2 or H, W / 2 or W, C_out).
    With a ``FeatureCache``, a later chunk of 2m frames gives m frames.
    """

    strided = True

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        return self.conv(x, cache)


class Upsample3d(_Resample3d):
    """One up stage: nearest-neighbour repeat in space and/or time, then a causal 3x3x3 conv.

    Temporal x2 keeps frame 0 alone: latent frame 0 -> 1 frame, every later frame -> 2 frames, so
    t = 1 + m frames -> 1 + 2m. Output frame f depends only on input frames <= ceil(f / 2).

    Call: ``up(x, cache=None)``: x (B, t, h, w, C_in) -> (B, t', 2h or h, 2w or w, C_out).
    With a ``FeatureCache`` past its first chunk, t frames give 2t (nothing is frame 0).
    """

    strided = False

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        if self.temporal:
            if cache is None or cache.first:
                x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
            else:
                # Frame 0 of the video is in the first chunk only; here every frame doubles.
                x = jnp.repeat(x, 2, axis=1)
        if self.spatial:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x, cache)


class FrameAttention(nnx.Module):
    """Single-head self-attention over the h*w positions of each frame separately (causal in time).

    Optional; used in the middle of the encoder and decoder where maps are smallest.

    Call: x (B, T, H, W, C) -> same shape (residual).
    """

    def __init__(self, channels: int, *, norm_groups: int = 32, dtype=None, rngs: nnx.Rngs):
        self.norm = CausalGroupNorm(
            channels, _default_groups(channels, norm_groups), dtype=dtype, rngs=rngs
        )
        self.qkv = nnx.Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
        # Zero-initialised output keeps the block an identity at init, so it cannot hurt early
        # training of a small VAE.
        self.out = nnx.Linear(
            channels, channels, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v)
        return x + self.out(y.reshape(b, t, h, w, c))


def _stage_plan(
    channel_mults: Sequence[int], spatial_downsample: int, temporal_downsample: int
) -> tuple[int, int, int]:
    """Validates the config; returns (n_spatial, n_temporal, n_stages)."""
    if not _is_pow2(spatial_downsample):
        raise ValueError(
            "spatial_downsample must be a power of 2 (1, 2, 4, 8, 16, ...), "
            f"got {spatial_downsample!r}"
        )
    if temporal_downsample not in (1, 2, 4, 8):
        raise ValueError(
            f"temporal_downsample must be 1, 2, 4 or 8, got {temporal_downsample!r}"
        )
    n_s = int(math.log2(spatial_downsample))
    n_t = int(math.log2(temporal_downsample))
    n = max(n_s, n_t)
    if len(channel_mults) == 0 or any(
        (not isinstance(m, int)) or m < 1 for m in channel_mults
    ):
        raise ValueError(
            f"channel_mults must be a non-empty tuple of positive ints, got {channel_mults!r}"
        )
    if len(channel_mults) < n:
        raise ValueError(
            f"channel_mults={tuple(channel_mults)} has {len(channel_mults)} levels but "
            f"spatial_downsample={spatial_downsample} and "
            f"temporal_downsample={temporal_downsample} "
            f"need {n} down stages (one per level at most): give at least {n} channel multipliers"
        )
    return n_s, n_t, n


class CausalEncoder(nnx.Module):
    """Causal 3D conv encoder: video (B, T, H, W, C_in) -> (mean, logvar), each (B, t, h, w, c).

    conv_in -> levels (ResBlocks, then a down stage while stages remain) -> mid (ResBlock,
    optional FrameAttention, ResBlock) -> GroupNorm, SiLU -> conv_out to 2 * latent_channels.
    logvar is clipped to [-30, 20] so exp(logvar) stays finite in float32.

    Call: ``encoder(x, cache=None)``; ``cache``: a ``FeatureCache`` for chunked inference.
    No input validation here; use ``CausalVAE.encode``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_mults: Sequence[int],
        num_res_blocks: int,
        n_spatial: int,
        n_temporal: int,
        norm_groups: int = 32,
        mid_attention: bool = False,
        remat: bool = False,
        logvar_init: float = 0.0,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        n_stages = max(n_spatial, n_temporal)
        chans = [base_channels * m for m in channel_mults]
        kw = dict(norm_groups=norm_groups, dtype=dtype, rngs=rngs)
        self.conv_in = CausalConv3d(in_channels, chans[0], 3, dtype=dtype, rngs=rngs)
        blocks, downs = [], []
        prev = chans[0]
        for i, ch in enumerate(chans):
            level = []
            for _ in range(num_res_blocks):
                level.append(ResBlock3d(prev, ch, **kw))
                prev = ch
            blocks.append(nnx.List(level))
            if i < n_stages:
                downs.append(
                    Downsample3d(
                        prev, prev, spatial=i < n_spatial, temporal=i < n_temporal,
                        dtype=dtype, rngs=rngs,
                    )
                )
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.mid1 = ResBlock3d(prev, prev, **kw)
        self.mid_attn = FrameAttention(prev, **kw) if mid_attention else None
        self.mid2 = ResBlock3d(prev, prev, **kw)
        self.norm_out = CausalGroupNorm(
            prev, _default_groups(prev, norm_groups), dtype=dtype, rngs=rngs
        )
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, 3, dtype=dtype, rngs=rngs)
        # A negative logvar bias starts the posterior nearly deterministic: with logvar 0 the
        # sampled latents carry unit noise that a small KL weight takes thousands of steps to
        # shrink, and reconstructions stay blurred that long.
        self.conv_out.bias[...] = self.conv_out.bias[...].at[latent_channels:].set(logvar_init)

    def __call__(
        self, x: jax.Array, cache: FeatureCache | None = None
    ) -> tuple[jax.Array, jax.Array]:
        h = self.conv_in(x, cache)
        for i, level in enumerate(self.blocks):
            for block in level:
                h = _run_block(block, h, self.remat, cache)
            if i < len(self.downs):
                h = self.downs[i](h, cache)
        h = _run_block(self.mid1, h, self.remat, cache)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = _run_block(self.mid2, h, self.remat, cache)
        h = self.conv_out(nnx.silu(self.norm_out(h)), cache)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


class CausalDecoder(nnx.Module):
    """Causal 3D conv decoder: latents (B, t, h, w, c) -> video (B, T, H, W, C_out), unbounded.

    Mirror of ``CausalEncoder``: conv_in -> mid -> for each level from the deepest: an up stage
    (if that level had a down stage in the encoder; it maps to the level's width) and ResBlocks
    -> GroupNorm, SiLU -> conv_out.
    The output is a linear conv (no tanh): callers clip to [-1, 1] for display.
    Call: ``decoder(z, cache=None)``; ``cache``: a ``FeatureCache`` for chunked inference.
    """

    def __init__(
        self,
        *,
        out_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_mults: Sequence[int],
        num_res_blocks: int,
        n_spatial: int,
        n_temporal: int,
        norm_groups: int = 32,
        mid_attention: bool = False,
        remat: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        n_stages = max(n_spatial, n_temporal)
        chans = [base_channels * m for m in channel_mults]
        kw = dict(norm_groups=norm_groups, dtype=dtype, rngs=rngs)
        prev = chans[-1]
        self.conv_in = CausalConv3d(latent_channels, prev, 3, dtype=dtype, rngs=rngs)
        self.mid1 = ResBlock3d(prev, prev, **kw)
        self.mid_attn = FrameAttention(prev, **kw) if mid_attention else None
        self.mid2 = ResBlock3d(prev, prev, **kw)
        # Stored deepest level first, i.e. in execution order.
        ups, blocks = [], []
        for i in reversed(range(len(chans))):
            if i < n_stages:
                # The up conv already maps to this level's (smaller) width: it runs at the
                # higher resolution, where keeping the deeper width would cost up to 4x more.
                ups.append(
                    Upsample3d(
                        prev, chans[i], spatial=i < n_spatial, temporal=i < n_temporal,
                        dtype=dtype, rngs=rngs,
                    )
                )
                prev = chans[i]
            else:
                ups.append(None)
            level = []
            for _ in range(num_res_blocks):
                level.append(ResBlock3d(prev, chans[i], **kw))
                prev = chans[i]
            blocks.append(nnx.List(level))
        self.ups = nnx.List(ups)
        self.blocks = nnx.List(blocks)
        self.norm_out = CausalGroupNorm(
            prev, _default_groups(prev, norm_groups), dtype=dtype, rngs=rngs
        )
        self.conv_out = CausalConv3d(prev, out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        h = self.conv_in(z, cache)
        h = _run_block(self.mid1, h, self.remat, cache)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = _run_block(self.mid2, h, self.remat, cache)
        for up, level in zip(self.ups, self.blocks):
            if up is not None:
                h = up(h, cache)
            for block in level:
                h = _run_block(block, h, self.remat, cache)
        return self.conv_out(nnx.silu(self.norm_out(h)), cache)


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


_remat_call_block = nnx.remat(_call_block)


def _run_block(
    block: nnx.Module, x: jax.Array, remat: bool, cache: FeatureCache | None = None
) -> jax.Array:
    # Rematerialising whole ResBlocks trades one extra forward for not storing the four
    # full-resolution activations of each block, which dominate VAE training memory. Chunked
    # (cached) passes are inference only: nothing to rematerialise, and the cache is a Python
    # object that remat could not trace through.
    if cache is not None:
        return block(x, cache)
    return _remat_call_block(block, x) if remat else block(x)


class CausalVideoGeometry:
    """Shape rules of a causal video autoencoder (frame 0 coded alone, then ``temporal_downsample``
    frames per latent frame; ``spatial_downsample`` pixels per latent pixel), shared by
    :class:`CausalVAE` and :class:`sora_jax.models.wan_vae.WanVAE`. Needs the attributes
    ``temporal_downsample``, ``spatial_downsample`` and ``latent_channels``.
    """

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(t, h, w, c) of the latents of a T x H x W video.

        Raises:
          ValueError: if T is not 1 + temporal_downsample * k (k >= 0) or H, W are not positive
            multiples of spatial_downsample.
        """
        self._check_video_dims(T, H, W, what=f"video of shape (T, H, W) = ({T}, {H}, {W})")
        return (
            (T - 1) // self.temporal_downsample + 1,
            H // self.spatial_downsample,
            W // self.spatial_downsample,
            self.latent_channels,
        )

    def video_frames(self, t: int) -> int:
        """Video frames T = 1 + temporal_downsample * (t - 1) decoded from t latent frames.

        Raises:
          ValueError: if t < 1.
        """
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"latent frame count must be an int >= 1, got {t!r}")
        return 1 + self.temporal_downsample * (t - 1)

    def _check_video_dims(self, T: int, H: int, W: int, *, what: str) -> None:
        td, sd = self.temporal_downsample, self.spatial_downsample
        if T < 1 or (T - 1) % td != 0:
            ok = ", ".join(str(1 + td * k) for k in range(4))
            raise ValueError(
                f"{what}: T={T} frames is not of the form 1 + {td}*k; accepted T: {ok}, ..."
            )
        if H < sd or W < sd or H % sd or W % sd:
            raise ValueError(
                f"{what}: H={H} and W={W} must be positive multiples of spatial_downsample={sd} "
                f"(e.g. {H // sd * sd or sd} x {W // sd * sd or sd})"
            )


class CausalVAE(CausalVideoGeometry, nnx.Module):
    """Causal spacetime VAE (MAGVIT-v2-style causal 3D conv VAE; Sora's video compressor).

    Maps video (B, T, H, W, in_channels) float32 in [-1, 1] with T = 1 + temporal_downsample * k
    and H, W divisible by spatial_downsample to a diagonal-Gaussian posterior over latents
    (B, 1 + k, H / s, W / s, latent_channels), and latents back to video. The first frame is
    coded alone (an image is a 1-frame video), and the model is causal in time: latent frame j
    depends only on input frames <= temporal_downsample * j, and decoded frame f only on latent
    frames <= ceil(f / temporal_downsample). Temporal downsamples are placed in the first
    (highest-resolution) encoder stages, mirrored by the last decoder stages.

    Args:
      in_channels: pixel channels (3 for RGB).
      latent_channels: c, latent channels.
      base_channels: channels of the first level.
      channel_mults: per-level channel multipliers; the number of levels. There must be at least
        max(log2(spatial_downsample), log2(temporal_downsample)) levels (one down stage per level).
      num_res_blocks: ResNet blocks per level (encoder and decoder alike).
      spatial_downsample: s, a power of 2.
      temporal_downsample: 1, 2, 4 or 8.
      patch_size: p, pixels folded into channels before the first conv (space-to-depth, as the
        LTX-Video and DC-AE autoencoders do) and unfolded after the last; the convolutional
        stages then downsample by spatial_downsample / p. p > 1 runs the widest, costliest layers
        at 1/p^2 of the pixels. A power of 2 dividing spatial_downsample.
      norm_groups: upper bound on GroupNorm groups; each norm uses the largest divisor of its
        channels that is <= min(norm_groups, channels // 4).
      mid_attention: add per-frame self-attention in the encoder and decoder middles.
      remat: rematerialise ResBlocks (``nnx.remat`` / ``jax.checkpoint``) to save memory.
      patch_shortcut: add a learned linear map from each latent's (td, s, s) pixel block to the
        latent and back around the conv encoder and decoder (``LinearPatchShortcut``, DC-AE's
        residual autoencoding); the conv output layers then start at zero.
      logvar_init: initial bias of the posterior log-variance (e.g. -6: a nearly deterministic
        start that trains faster under a small KL weight; 0 is the textbook start).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
      rngs: ``nnx.Rngs`` for initialisation.

    Raises:
      ValueError: for an inconsistent config (non-power-of-2 spatial_downsample, temporal
        downsample not in {1, 2, 4, 8}, too few channel_mults, non-positive sizes).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 1,
        spatial_downsample: int = 8,
        temporal_downsample: int = 4,
        patch_size: int = 1,
        norm_groups: int = 32,
        mid_attention: bool = False,
        remat: bool = False,
        logvar_init: float = 0.0,
        patch_shortcut: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if not _is_pow2(patch_size) or not _is_pow2(spatial_downsample) or (
                spatial_downsample % patch_size):
            raise ValueError(f"patch_size must be a power of 2 dividing spatial_downsample="
                             f"{spatial_downsample}, got {patch_size!r}")
        for name, val, lo in (
            ("in_channels", in_channels, 1),
            ("latent_channels", latent_channels, 1),
            ("base_channels", base_channels, 1),
            ("num_res_blocks", num_res_blocks, 0),
            ("norm_groups", norm_groups, 1),
        ):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        channel_mults = tuple(channel_mults)
        n_s, n_t, _ = _stage_plan(channel_mults, spatial_downsample // patch_size,
                                  temporal_downsample)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        self.patch_size = patch_size
        # Filled in from training data after training (``sora_jax.inference.latents.latent_statistics``).
        self.latent_shift = LatentStat(jnp.zeros((latent_channels,), jnp.float32))
        self.latent_scale = LatentStat(jnp.ones((latent_channels,), jnp.float32))
        common = dict(
            latent_channels=latent_channels,
            base_channels=base_channels,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            n_spatial=n_s,
            n_temporal=n_t,
            norm_groups=norm_groups,
            mid_attention=mid_attention,
            remat=remat,
            dtype=dtype,
            rngs=rngs,
        )
        pixels = in_channels * patch_size * patch_size
        self.encoder = CausalEncoder(in_channels=pixels, logvar_init=logvar_init, **common)
        self.decoder = CausalDecoder(out_channels=pixels, **common)
        self.shortcut = LinearPatchShortcut(
            in_channels, latent_channels, spatial_downsample, temporal_downsample, rngs=rngs
        ) if patch_shortcut else None
        if patch_shortcut:
            # The conv paths start at zero, so the model starts as exactly the linear code
            # (PCA once ``shortcut.init_from_data`` ran) and learns the remainder.
            out = self.encoder.conv_out
            out.kernel[...] = out.kernel[...].at[..., :latent_channels].set(0.0)
            out.bias[...] = out.bias[...].at[:latent_channels].set(0.0)
            self.decoder.conv_out.kernel[...] = jnp.zeros_like(self.decoder.conv_out.kernel[...])

    # ---- model ----

    def encode(
        self, video: jax.Array, cache: FeatureCache | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Posterior parameters of a video, or of one time chunk of it.

        Args:
          video: (B, T, H, W, in_channels) float, pixels in [-1, 1].
          cache: None for a whole video. For chunked encoding (see
            ``sora_jax.models.vae_streaming``) a ``FeatureCache``: a new one for the first chunk
            (T = 1 + temporal_downsample * k frames), then one holding the previous chunk's
            ``feats`` for each later chunk (T = temporal_downsample * k frames, k >= 1: the
            chunk's latent frames). The chunks' latents concatenate to the whole pass's.

        Returns:
          (mean, logvar), each (B, t, h, w, latent_channels) float; logvar clipped to [-30, 20].
          t = 1 + k for a whole video or a first chunk, k for a later chunk.

        Raises:
          ValueError: if video is not 5-D with in_channels channels, T is not
            1 + temporal_downsample * k (temporal_downsample * k, k >= 1, for a later chunk), or
            H / W are not multiples of spatial_downsample.
        """
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(
                f"encode expects video of shape (B, T, H, W, {self.in_channels}), got {video.shape}"
            )
        _, T, H, W, _ = video.shape
        td = self.temporal_downsample
        if cache is not None and not cache.first:
            if T < td or T % td:
                raise ValueError(
                    f"a later chunk of a chunked encode must have a positive multiple of "
                    f"temporal_downsample={td} frames, got T={T}"
                )
            T = T + 1  # the dims check below then sees a valid 1 + td*k length
        self._check_video_dims(T, H, W, what=f"video of shape {tuple(video.shape)}")
        first = cache is None or cache.first
        mean, logvar = self.encoder(space_to_depth(video, (1, self.patch_size, self.patch_size)), cache)
        if self.shortcut is not None:
            mean = mean + self.shortcut.encode(video, first).astype(mean.dtype)
        return mean, logvar

    def decode(self, z: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        """Decodes latents to video, or one time chunk of latents.

        Args:
          z: (B, t, h, w, latent_channels) float.
          cache: None for a whole latent video. For chunked decoding (see
            ``sora_jax.models.vae_streaming``) a ``FeatureCache``: a new one for the first chunk,
            then one holding the previous chunk's ``feats`` for each later chunk; any t >= 1 per
            chunk. The chunks' frames concatenate to the whole pass's.

        Returns:
          (B, T, h * s, w * s, in_channels) float with T = video_frames(t) for a whole video or
          a first chunk and T = temporal_downsample * t for a later chunk; unbounded (no tanh):
          it is trained towards [-1, 1] pixels, so clip before display.

        Raises:
          ValueError: if z is not 5-D with latent_channels channels.
        """
        if z.ndim != 5 or z.shape[-1] != self.latent_channels or any(d < 1 for d in z.shape[1:4]):
            raise ValueError(
                f"decode expects latents of shape (B, t, h, w, {self.latent_channels}) with "
                f"t, h, w >= 1, got {z.shape}"
            )
        first = cache is None or cache.first
        out = depth_to_space(self.decoder(z, cache), (1, self.patch_size, self.patch_size))
        if self.shortcut is not None:
            out = out + self.shortcut.decode(z, first).astype(out.dtype)
        return out

    def __call__(
        self,
        video: jax.Array,
        *,
        key: jax.Array | None = None,
        sample_posterior: bool = True,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, sample z = mean + exp(logvar / 2) * eps (reparameterisation), decode.

        Args:
          video: (B, T, H, W, in_channels) float in [-1, 1].
          key: PRNG key for eps; when None (or sample_posterior is False) z is the mean.
          sample_posterior: whether to sample.

        Returns:
          (recon, mean, logvar): recon has the shape of video; mean and logvar are
          (B, t, h, w, latent_channels).

        Raises:
          ValueError: as ``encode``.
        """
        mean, logvar = self.encode(video)
        if sample_posterior and key is not None:
            eps = jax.random.normal(key, mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * logvar) * eps
        else:
            z = mean
        return self.decode(z), mean, logvar
