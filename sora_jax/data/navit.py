"""NaViT per-example transforms: random resolution under a token budget, and token dropping.

NaViT (Dehghani et al. 2023, "Patch n' Pack", sec. 2.2-2.3) trains on every example at a size
drawn per example, keeping its aspect ratio, and drops a random fraction of each example's
tokens. Both act per example before packing, in NumPy, inside the Grain pipeline.

Our examples are VAE latents (t, h, w, c) that were encoded at their stored size, so a new
resolution is made by resampling the latent (antialiased linear filter). That is exact for
the VAE-free pixel mode and an approximation for VAE latents (a downsampled latent decodes to
a softer picture than the latent of a downsampled video); ``resolution="native"`` turns it off
except where an example exceeds the token budget.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RESOLUTION_DISTRIBUTIONS = ("native", "uniform")
TOKEN_DROP_DISTRIBUTIONS = ("fixed", "uniform")


def choose_grid(grid: Sequence[int], *, max_tokens: int, rng: np.random.Generator,
                resolution: str = "native", min_scale: float = 0.5,
                min_side: int = 2) -> tuple[int, int, int]:
    """Draws an example's patch grid (nt, nh, nw) under a token budget, keeping aspect ratio.

    The side scale s is 1 (``"native"``) or s ~ U(min_scale, 1) (``"uniform"``, NaViT's random
    resolution); then s is lowered until nt * nh * nw <= max_tokens. When even the smallest
    allowed sides (min_side patches on the shorter side) would exceed the budget, the clip is
    shortened instead (a prefix of its latent frames, so a causal latent keeps its first frame).

    Args:
      grid: stored patch grid (nt, nh, nw) of the example.
      max_tokens: per-example token budget (>= 1).
      rng: NumPy generator (the pipeline's per-example generator: deterministic per index).
      resolution: "native" or "uniform".
      min_scale: lower end of the uniform side scale, in (0, 1].
      min_side: the shorter spatial side never goes below this many patches (nor below the
        stored side).

    Returns:
      (nt', nh', nw') with nt' <= nt, nh' <= nh, nw' <= nw and nt' nh' nw' <= max_tokens.

    Raises:
      ValueError: unknown resolution distribution, or max_tokens / min_scale out of range.
    """
    if resolution not in RESOLUTION_DISTRIBUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTION_DISTRIBUTIONS}, got {resolution!r}")
    if max_tokens < 1 or not 0 < min_scale <= 1:
        raise ValueError(f"need max_tokens >= 1 and 0 < min_scale <= 1, got {max_tokens}, {min_scale}")
    nt, nh, nw = (int(g) for g in grid)
    s = 1.0 if resolution == "native" else float(rng.uniform(min_scale, 1.0))
    s = min(s, math.sqrt(max_tokens / (nt * nh * nw)))
    short = min(nh, nw)
    floor_side = min(min_side, short)
    s = max(s, floor_side / short)  # never below the minimum side; time gives way instead
    nh2 = max(1, min(nh, int(round(nh * s))))
    nw2 = max(1, min(nw, int(round(nw * s))))
    while nh2 * nw2 > max_tokens:  # rounding or the side floor overshot a tiny budget
        nh2, nw2 = max(1, nh2 - (nh2 >= nw2)), max(1, nw2 - (nw2 > nh2))
    nt2 = max(1, min(nt, max_tokens // (nh2 * nw2)))
    return nt2, nh2, nw2


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) antialiased linear (triangle-filter) resampling weights, rows sum to 1."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    scale = n_out / n_in
    support = max(1.0, 1.0 / scale)  # widen the kernel when shrinking: antialiasing
    centres = (np.arange(n_out) + 0.5) / scale - 0.5
    x = np.arange(n_in)
    w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_latent(latent: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resamples a (t, h, w, c) latent to (t, height, width, c) with an antialiased linear filter.

    Separable, like ``jax.image.resize(..., "linear", antialias=True)``; identity when the size
    is unchanged. Returns float32.
    """
    t, h, w, c = latent.shape
    if (h, w) == (height, width):
        return np.asarray(latent, np.float32)
    mh, mw = _resample_matrix(h, height), _resample_matrix(w, width)
    return np.einsum("yh,xw,thwc->tyxc", mh, mw, np.asarray(latent, np.float32), optimize=True)


def token_drop_rate(rng: np.random.Generator, rate: float, distribution: str = "fixed") -> float:
    """Per-example drop rate: ``rate`` itself ("fixed") or U(0, rate) ("uniform").

    Raises:
      ValueError: rate outside [0, 1) or unknown distribution.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"token drop rate must be in [0, 1), got {rate}")
    if distribution not in TOKEN_DROP_DISTRIBUTIONS:
        raise ValueError(f"token drop distribution must be one of {TOKEN_DROP_DISTRIBUTIONS}, "
                         f"got {distribution!r}")
    return rate if distribution == "fixed" else float(rng.uniform(0.0, rate))


def drop_tokens(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Indices of the tokens kept after NaViT continuous token dropping (sorted, int64).

    Keeps ceil((1 - rate) * n) >= 1 tokens chosen uniformly without replacement; order is kept,
    so each kept token keeps its own (t, h, w) position for 3D RoPE and the loss is computed on
    kept tokens only (dropped ones are simply absent from the packed row).
    """
    keep = max(1, int(math.ceil((1.0 - rate) * n)))
    if keep >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=keep, replace=False))
