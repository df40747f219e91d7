"""3D patch discriminator for adversarial VAE training.

A PatchGAN (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", Sec. 3.2.2) scores overlapping patches rather than whole images, so it judges local
texture and sharpness -- what L1 / L2 reconstruction losses blur away -- with few parameters and
at any input size. Video autoencoders extend it to spacetime with 3D convolutions (MAGVIT, Yu et
al. 2023; the 3D discriminators of Open-Sora and CogVideoX), so flicker and temporal blur are
penalised too; VQGAN (Esser et al. 2021) trains its autoencoder against such a discriminator
with a hinge loss (``sora_jax.models.vae_loss``).

Layout for ``num_layers = n`` (channels ``c``): a stride-2 conv to ``c`` channels with no norm;
``n - 1`` stride-2 convs doubling the width (capped at ``8 c``); one stride-1 conv; a stride-1
conv to one logit per patch. Every conv but the last is followed by LeakyReLU(0.2), every one
but the first and last by GroupNorm (statistics per example, so batch 1 and any batch split
behave the same; BatchNorm, PatchGAN's original choice, does not). Kernels are 3 x 4 x 4 with
'SAME' zero padding, so the stride-2 layers map (T, H, W) to (ceil(T / 2), ceil(H / 2),
ceil(W / 2)): a 1-frame video (an image) stays 1 frame, and any T >= 1 works. The time axis is
not causal here: the discriminator only scores whole clips and is never run frame by frame.

Shapes are channels-last: video (B, T, H, W, C) float in [-1, 1] -> logits
(B, ceil(T / 2^n), ceil(H / 2^n), ceil(W / 2^n), 1) float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["PatchConv3d", "PatchDiscriminator3d"]

KERNEL = (3, 4, 4)
LEAKY_SLOPE = 0.2


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    # XLA 'SAME': output ceil(size / stride), the extra pad on the right.
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


class PatchConv3d(nnx.Module):
    """3D convolution with 'SAME' zero padding (non-causal), for the discriminator.

    Args:
      in_channels, out_channels: feature sizes.
      strides: (st, sh, sw).
      impl: "taps" computes the conv as one 2D conv over the kt time taps stacked along channels
        with time folded into batch (XLA:CPU runs 3D convs several times slower than that 2D
        form, as ``sora_jax.models.vae.CausalConv3d`` notes); "conv3d" uses a native 3D conv
        (GPU / TPU); "auto" picks "taps" on the CPU backend. Same parameters and result (to
        float rounding).
      dtype: computation dtype (None: inferred from the input and float32 params).
      rngs: ``nnx.Rngs``; kernel ~ N(0, 0.02^2) as in PatchGAN / VQGAN, bias zero.

    Call: x (B, T, H, W, C_in) -> (B, ceil(T / st), ceil(H / sh), ceil(W / sw), C_out).

    Raises:
      ValueError: unknown impl.
    """

    def __init__(self, in_channels: int, out_channels: int, strides: tuple[int, int, int], *,
                 impl: str = "auto", dtype=None, rngs: nnx.Rngs):
        if impl not in ("auto", "taps", "conv3d"):
            raise ValueError(f"PatchConv3d: impl must be 'auto', 'taps' or 'conv3d', got {impl!r}")
        self.strides = tuple(int(s) for s in strides)
        self.impl = impl
        self.dtype = dtype
        shape = KERNEL + (in_channels, out_channels)
        # One flat draw reshaped: XLA:CPU compiles a 1-D draw much faster than a 5-D one.
        flat = jax.random.normal(rngs.params(), (math.prod(shape),), jnp.float32)
        self.kernel = nnx.Param(0.02 * flat.reshape(shape))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.kernel[...], self.bias[...]
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        kt, kh, kw = KERNEL
        st, sh, sw = self.strides
        b, t, h, w, _ = x.shape
        pt, ph, pw = (_same_pads(n, k, s) for n, k, s in zip((t, h, w), KERNEL, self.strides))
        impl = self.impl
        if impl == "auto":
            impl = "taps" if jax.default_backend() == "cpu" else "conv3d"
        if impl == "conv3d":
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, (pt, ph, pw),
                                             dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        else:
            x = jnp.pad(x, ((0, 0), pt, (0, 0), (0, 0), (0, 0)))
            t_out = (x.shape[1] - kt) // st + 1
            taps = [x[:, tau : tau + st * (t_out - 1) + 1 : st] for tau in range(kt)]
            xs = jnp.concatenate(taps, axis=-1).reshape((b * t_out, h, w, -1))
            k2 = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, -1, kernel.shape[-1])
            y = jax.lax.conv_general_dilated(xs, k2, (sh, sw), (ph, pw),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y.reshape((b, t_out) + y.shape[1:])
        return y + bias


class PatchDiscriminator3d(nnx.Module):
    """PatchGAN discriminator with 3D convolutions (Isola et al. 2017, extended to spacetime).

    Args:
      in_channels: pixel channels (3 for RGB).
      channels: width of the first layer (PatchGAN's ndf, 64 there).
      num_layers: stride-2 layers n (3 in PatchGAN: 70 x 70 receptive field in 2D); the logit
        map is 2^n times smaller than the input in H, W and (for T > 1) T.
      norm_groups: upper bound on GroupNorm groups (the largest divisor of the width that is
        at most this and leaves >= 4 channels per group).
      impl: convolution implementation, see ``PatchConv3d``.
      dtype: computation dtype; parameters stay float32.
      rngs: ``nnx.Rngs`` for initialisation.

    Call: video (B, T, H, W, in_channels) float, any T, H, W >= 1 -> logits
      (B, ceil(T / 2^n), ceil(H / 2^n), ceil(W / 2^n), 1) float32: one real-vs-fake score per
      spacetime patch (positive: judged real).

    Raises:
      ValueError: non-positive channels or num_layers < 1 (construction); input not 5-D with
        in_channels channels (call).
    """

    def __init__(self, *, in_channels: int = 3, channels: int = 64, num_layers: int = 3,
                 norm_groups: int = 32, impl: str = "auto", dtype=None, rngs: nnx.Rngs):
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.in_channels = in_channels
        kw = dict(impl=impl, dtype=dtype, rngs=rngs)
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        convs = [PatchConv3d(in_channels, widths[0], (2, 2, 2), **kw)]
        norms: list[nnx.Module] = []
        for i in range(1, num_layers + 1):
            stride = (2, 2, 2) if i < num_layers else (1, 1, 1)
            convs.append(PatchConv3d(widths[i - 1], widths[i], stride, **kw))
            norms.append(nnx.GroupNorm(widths[i], num_groups=_groups(widths[i], norm_groups),
                                       dtype=dtype, rngs=rngs))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = PatchConv3d(widths[-1], 1, (1, 1, 1), **kw)

    def __call__(self, video: jax.Array) -> jax.Array:
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(f"discriminator expects video of shape (B, T, H, W, "
                             f"{self.in_channels}), got {video.shape}")
        h = nnx.leaky_relu(self.convs[0](video), LEAKY_SLOPE)
        for conv, norm in zip(self.convs[1:], self.norms):
            # nnx.GroupNorm reduces over every non-batch axis, (T, H, W) and the group's channels.
            h = nnx.leaky_relu(norm(conv(h)), LEAKY_SLOPE)
        return self.conv_out(h).astype(jnp.float32)


def _groups(channels: int, max_groups: int) -> int:
    cap = max(1, min(max_groups, channels // 4))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)
