"""Building blocks of the diffusion transformer: norms, 3D RoPE, timestep embedding,
adaLN modulation and the MLP.

All layers are Flax NNX modules (or pure functions) operating channels-last on packed
token arrays of shape (B, L, ...). Numerically sensitive pieces (normalisation, RoPE
rotation) are computed in float32 whatever the compute dtype, then cast back.

Sources:
  * Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT): adaLN-Zero,
    sinusoidal timestep embedding followed by an MLP, xavier-uniform init.
  * Su et al. 2021, "RoFormer" (RoPE), extended to three axes (t, h, w) as in
    Open-Sora 2.0 / Wan 2.1 / Flux: the head dimension is split over the axes.
  * Zhang & Sennrich 2019, RMSNorm; used for QK-norm (Henry et al. 2020;
    Dehghani et al. 2023, ViT-22B).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.parallel.axes import EMBED, IN_FEATURES, MLP as MLP_AXIS, NORM
from sora_jax.parallel.sharding import partitioned

# DiT initialises every linear with xavier-uniform and zero biases (Peebles & Xie 2023,
# official code `initialize_weights`), then overrides the modulation and output layers
# with zeros; keeping the default here means a layer only states its exceptions.
xavier_uniform = nnx.initializers.xavier_uniform()
zeros_init = nnx.initializers.zeros_init()


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs, zero: bool = False,
          kernel_init=None, use_bias: bool = True, dtype=None,
          axes: tuple[str | None, str | None] = (None, None)) -> nnx.Linear:
    """A `nnx.Linear` with the DiT initialisation (xavier-uniform kernel, zero bias).

    Args:
      in_features, out_features: input / output widths.
      rngs: NNX random streams (the `params` stream is used).
      zero: zero-initialise the kernel too (adaLN-Zero and the output layer).
      kernel_init: overrides the kernel initialiser (ignored when ``zero``).
      use_bias: whether the layer has a bias.
      dtype: compute dtype (None = inferred from inputs and params, float32 here).
      axes: logical names of the kernel's (in, out) dimensions
        (:mod:`sora_jax.parallel.axes`); the bias takes the out name.
    """
    if zero:
        kinit = zeros_init
    else:
        kinit = kernel_init if kernel_init is not None else xavier_uniform
    return nnx.Linear(in_features, out_features, use_bias=use_bias,
                      kernel_init=partitioned(kinit, axes),
                      bias_init=partitioned(zeros_init, (axes[1],)), dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with a learned per-feature scale.

    y = x / sqrt(mean(x**2) + eps) * scale, computed in float32, returned in x's dtype.
    Used as QK-norm (applied per head to queries and keys, the scale shared across heads),
    which keeps attention logits bounded at scale (Henry et al. 2020; Dehghani et al. 2023).

    Args:
      dim: size of the normalised (last) axis.
      eps: added to the mean square.
      rngs: unused (kept for NNX construction symmetry).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(NORM,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(ms + self.eps) * self.scale[...]
        return y.astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def default_rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Default split of the head dimension over the (t, h, w) RoPE axes.

    About (head_dim/4, 3*head_dim/8, 3*head_dim/8), each rounded to an even number (each
    axis rotates pairs of features), summing exactly to ``head_dim``. Space gets more
    frequencies than time because latents are larger in h and w than in t (Open-Sora 2.0,
    Wan 2.1 use similar splits). Examples: 32 -> (8, 12, 12); 64 -> (16, 24, 24).

    Raises:
      ValueError: if ``head_dim`` is odd or smaller than 6.
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    dt = 2 * max(1, round(head_dim / 8))
    dh = 2 * max(1, round((head_dim - dt) / 4))
    dw = head_dim - dt - dh
    if dw < 2:
        raise ValueError(f"cannot split head_dim={head_dim} over 3 RoPE axes")
    return dt, dh, dw


def rope_cos_sin(positions: jax.Array, axes_dims: Sequence[int],
                 theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Cos / sin tables of 3D rotary position embedding for the rotate-half form.

    Axis a (t, h or w) owns ``axes_dims[a]`` features, i.e. ``axes_dims[a] // 2`` rotation
    frequencies theta**(-2i/axes_dims[a]) (Su et al. 2021, eq. 15, per axis). The angles of
    all axes are concatenated into one half-width vector ``ang`` (B, L, Dh/2), and the
    tables are [ang, ang], so rotate-half pairs feature j with j + Dh/2 at angle ang[j].

    Args:
      positions: (..., 3) integer (t, h, w) patch-grid coordinates.
      axes_dims: three even ints summing to the head dimension Dh.
      theta: RoPE base.

    Returns:
      (cos, sin), each float32 of shape (..., Dh).

    Raises:
      ValueError: if ``axes_dims`` does not have 3 even entries.
    """
    if len(axes_dims) != 3 or any(d % 2 or d <= 0 for d in axes_dims):
        raise ValueError(f"axes_dims must be 3 positive even ints, got {tuple(axes_dims)}")
    pos = positions.astype(jnp.float32)
    angles = []
    for a, d in enumerate(axes_dims):
        freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (d/2,)
        angles.append(pos[..., a:a + 1] * freqs)
    ang = jnp.concatenate(angles, axis=-1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates queries or keys by RoPE, rotate-half form (Su et al. 2021, eq. 34).

    Args:
      x: (B, L, H, Dh) queries or keys.
      cos, sin: (B, L, Dh) tables from :func:`rope_cos_sin` (broadcast over heads).

    Returns:
      (B, L, H, Dh) array in x's dtype. The rotation is computed in float32 because
      bf16 angles lose relative-position precision at long lengths.
    """
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


def sincos_3d(positions: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Fixed sin-cos position embedding of (t, h, w) grid coordinates.

    The DiT paper's 2D embedding (Peebles & Xie 2023, after MAE / ViT; Vaswani et al. 2017
    eq. "PE") extended by a time axis: ``dim`` is split into (t, h, w) parts of 2 * (dim // 6),
    2 * (dim // 6) and the rest, each [sin(p f), cos(p f)] over its own geometric frequencies.

    Args:
      positions: (..., 3) integer coordinates.
      dim: embedding width (even, >= 6).

    Returns:
      float32 (..., dim).

    Raises:
      ValueError: odd ``dim`` or ``dim`` < 6.
    """
    if dim % 2 or dim < 6:
        raise ValueError(f"sincos_3d needs an even dim >= 6, got {dim}")
    dt = 2 * (dim // 6)
    parts = []
    for a, d in enumerate((dt, dt, dim - 2 * dt)):
        half = d // 2
        freqs = max_period ** (-jnp.arange(half, dtype=jnp.float32) / half)
        ang = positions[..., a:a + 1].astype(jnp.float32) * freqs
        parts += [jnp.sin(ang), jnp.cos(ang)]
    return jnp.concatenate(parts, axis=-1)


# ------------------------------------------------------------------ timestep embedding


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0,
                       time_scale: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of (per-token) flow times.

    t in [0, 1] is scaled by ``time_scale`` (1000) so that the frequencies, designed for
    DDPM's integer steps (Peebles & Xie 2023; Vaswani et al. 2017), resolve small steps.

    Args:
      t: float array of any shape (...,).
      dim: embedding size (even).
      max_period: lowest frequency's period.
      time_scale: factor applied to t first.

    Returns:
      float32 array (..., dim): [cos(t*f), sin(t*f)].
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * time_scale)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """Sinusoidal embedding of t followed by Linear-SiLU-Linear (DiT §3.2).

    The MLP is initialised normal(0.02) as in the DiT reference code, not xavier, so the
    conditioning starts small and adaLN-Zero blocks start near identity.

    Args:
      hidden_size: output width.
      freq_dim: width of the sinusoidal features.
      rngs: NNX random streams.

    Call: t (...,) float -> (..., hidden_size) float.
    """

    def __init__(self, hidden_size: int, *, freq_dim: int = 256, rngs: nnx.Rngs,
                 dtype=None):
        self.freq_dim = freq_dim
        init = nnx.initializers.normal(0.02)
        self.fc1 = dense(freq_dim, hidden_size, kernel_init=init, dtype=dtype, rngs=rngs,
                         axes=(IN_FEATURES, EMBED))
        self.fc2 = dense(hidden_size, hidden_size, kernel_init=init, dtype=dtype, rngs=rngs,
                         axes=(EMBED, MLP_AXIS))

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


# -------------------------------------------------------------------- modulation, MLP


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift (DiT); ``1 +`` so zero init is identity."""
    return x * (1.0 + scale) + shift


class AdaLNModulation(nnx.Module):
    """Per-token SiLU -> Linear(c -> n_chunks * hidden), zero-initialised (adaLN-Zero).

    Zero init makes every gate 0 at start, so each residual block is the identity and the
    whole network starts as a well-conditioned shallow map (Peebles & Xie 2023 §3.2).

    Call: c (B, L, cond_dim) -> tuple of ``n_chunks`` arrays (B, L, hidden).
    """

    def __init__(self, cond_dim: int, hidden_size: int, n_chunks: int, *, rngs: nnx.Rngs,
                 dtype=None):
        self.n_chunks = n_chunks
        self.linear = dense(cond_dim, n_chunks * hidden_size, zero=True, dtype=dtype,
                            rngs=rngs, axes=(EMBED, MLP_AXIS))

    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jnp.split(self.project(c), self.n_chunks, axis=-1))

    def project(self, c: jax.Array) -> jax.Array:
        """Linear(SiLU(c)) unsplit: (..., cond_dim) -> (..., n_chunks * hidden)."""
        return self.linear(jax.nn.silu(c))


class MLP(nnx.Module):
    """Transformer feed-forward: Linear -> GELU (tanh approximation, as DiT) -> Linear.

    Call: x (..., dim) -> (..., out_dim or dim).
    """

    def __init__(self, dim: int, hidden_dim: int, *, out_dim: int | None = None,
                 rngs: nnx.Rngs, dtype=None, in_axis: str | None = EMBED):
        self.fc1 = dense(dim, hidden_dim, dtype=dtype, rngs=rngs, axes=(in_axis, MLP_AXIS))
        self.fc2 = dense(hidden_dim, out_dim or dim, dtype=dtype, rngs=rngs, axes=(MLP_AXIS, EMBED))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def layer_norm(dim: int, *, affine: bool, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    """LayerNorm with eps 1e-6; ``affine=False`` before adaLN modulation (DiT)."""
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=affine, use_scale=affine, dtype=dtype,
                         scale_init=partitioned(nnx.initializers.ones_init(), (NORM,)),
                         bias_init=partitioned(zeros_init, (NORM,)), rngs=rngs)
