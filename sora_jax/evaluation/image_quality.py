"""PSNR and SSIM in JAX: the one implementation the VAE's training loss and metrics, the
autoencoder evaluation and the prompt modes' measurements all use.

Inputs follow the project convention: float pixels in [-1, 1] or uint8 (mapped to [-1, 1] as
``sora_jax.io.to_float`` does), channels-last, any leading shape; computed in float32.

PSNR is shift-invariant, so PSNR on [-1, 1] with data range 2 equals PSNR on [0, 255] with
data range 255 (up to uint8 rounding). SSIM is not (its luminance term depends on the means),
so it maps [-1, 1] to [0, 1] and uses data range 1: values then equal SSIM on [0, 1] or uint8
images, the convention behind published autoencoder numbers (e.g. Open-Sora's). Neither clips:
clip (or round-trip through uint8) first to score what a viewer would see. The tests check both
against scikit-image (``skimage.metrics``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PSNR_CAP_DB", "gaussian_window", "psnr", "psnr_per_item", "ssim", "ssim_per_frame"]

# Wang et al. 2004: 11-tap Gaussian window, sigma 1.5; K1 = 0.01, K2 = 0.03 on data range 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# What callers that need a finite number report for an exact match (PSNR is +inf there).
PSNR_CAP_DB = 100.0


def _pixels(x) -> jax.Array:
    """float32 pixels in [-1, 1]: floats as they are, uint8 mapped as ``io.to_float``."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    return x.astype(jnp.float32) / 127.5 - 1.0


def _pair(a, b) -> tuple[jax.Array, jax.Array]:
    a, b = _pixels(a), _pixels(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("empty arrays")
    return a, b


def psnr_per_item(a, b, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio of each item along the leading axis, in dB:
    10 log10(data_range^2 / MSE), the MSE over all of the item's frames, pixels and channels
    (not a mean of per-frame PSNRs, which weighs bad frames less and reads higher).

    Args:
      a, b: (B, ...) of the same shape, float in [-1, 1] or uint8.
      data_range: peak-to-peak range of the float pixels (2 for [-1, 1]).

    Returns:
      float32 (B,) in dB; +inf for identical items.

    Raises:
      ValueError: shapes differ or arrays are empty.
    """
    a, b = _pair(a, b)
    mse = jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
    return 10.0 * jnp.log10(data_range**2 / mse)


def psnr(a, b, data_range: float = 2.0) -> jax.Array:
    """PSNR in dB of two whole arrays (one MSE over everything), float32 scalar; +inf when
    equal. See :func:`psnr_per_item`.

    Raises:
      ValueError: shapes differ or arrays are empty.
    """
    a, b = _pair(a, b)
    return psnr_per_item(a.reshape(1, -1), b.reshape(1, -1), data_range)[0]


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> jax.Array:
    """Normalised 1-D Gaussian taps exp(-x^2 / (2 sigma^2)), x = -(size // 2) .. size // 2.

    Returns:
      float32 (size,), summing to 1 (the 2-D window is its outer product).

    Raises:
      ValueError: if size is not a positive odd int or sigma <= 0.
    """
    if not isinstance(size, int) or size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"window size must be a positive odd int and sigma > 0, got {size}, {sigma}")
    return jnp.asarray(_gaussian_taps(size, sigma), jnp.float32)


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    # numpy, so that shapes and taps stay constants when traced under jit
    x = np.arange(size, dtype=np.float64) - size // 2
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / np.sum(w)


def _blur_matrix(n: int, taps: np.ndarray, rows: slice) -> np.ndarray:
    """(len(rows), n) matrix M with M @ v = the Gaussian filter of v (length n) at ``rows``.

    Borders are mirrored (numpy 'symmetric', scipy.ndimage 'reflect', what skimage's SSIM
    uses), extended with period 2n for filters wider than the signal. A dense matrix product
    replaces a depthwise convolution, which XLA:CPU runs several times slower.
    """
    r = len(taps) // 2
    src = np.arange(-r, n + r) % (2 * n)
    src = np.where(src < n, src, 2 * n - 1 - src)
    m = np.zeros((n, n), np.float64)
    for k, tap in enumerate(taps):
        np.add.at(m, (np.arange(n), src[k : k + n]), tap)
    return m[rows]


def ssim_per_frame(a: jax.Array, b: jax.Array) -> jax.Array:
    """Structural similarity of every frame pair (Wang et al. 2004, "Image quality assessment:
    from error visibility to structural similarity", eq. 13), differentiable.

    Pixels in [-1, 1] are mapped to [0, 1] (data range 1, no clipping). Local means, variances
    and the covariance come from an 11-tap Gaussian window of sigma 1.5 (population statistics,
    K1 = 0.01, K2 = 0.03), each channel alone; the SSIM map is averaged over the frame's interior
    (a border of 5 px dropped, fewer on frames under 11 px: the largest odd window that fits)
    and over channels. This reproduces ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False, data_range=1`` to float32 rounding
    (the tests' reference). The window is applied as two
    dense (H', H) and (W', W) matrix products, O(H + W) per pixel: fast for training crops, not
    meant for full-HD frames.

    Args:
      a, b: (..., H, W, C), same shape, float in [-1, 1] or uint8, e.g. video (B, T, H, W, C);
        leading axes are frames.

    Returns:
      float32 (prod of leading axes,) SSIM per frame, in [-1, 1]; 1 for identical frames.

    Raises:
      ValueError: shapes differ or fewer than 3 axes.
    """
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must have the same shape")
    if a.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) frames, got shape {a.shape}")
    h, w, c = a.shape[-3:]
    x = (_pixels(a).reshape(-1, h, w, c) + 1.0) * 0.5
    y = (_pixels(b).reshape(-1, h, w, c) + 1.0) * 0.5
    side = min(h, w)
    win = min(SSIM_WINDOW, side if side % 2 else side - 1)
    pad = (win - 1) // 2
    taps = _gaussian_taps(SSIM_WINDOW, SSIM_SIGMA)
    # Only the rows and columns kept after dropping the border are filtered.
    mh = jnp.asarray(_blur_matrix(h, taps, slice(pad, h - pad)), jnp.float32)
    mw = jnp.asarray(_blur_matrix(w, taps, slice(pad, w - pad)), jnp.float32)
    stats = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    # HIGHEST: TPU / GPU default matmul precision (bf16 / tf32 passes) would wreck the variances
    # E[x^2] - E[x]^2, a difference of nearly equal numbers.
    hi = jax.lax.Precision.HIGHEST
    stats = jnp.einsum("ih,nhwc->niwc", mh, stats, precision=hi)
    stats = jnp.einsum("jw,niwc->nijc", mw, stats, precision=hi)
    ux, uy, uxx, uyy, uxy = jnp.split(stats, 5, axis=-1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean of ``ssim_per_frame`` over all frames: float32 scalar in [-1, 1] (1 iff equal).

    The structural loss of the VAE recipe is ``1 - ssim(recon, target)``; evaluation reports
    ``ssim`` of each clip.

    Raises:
      ValueError: as ``ssim_per_frame``.
    """
    return jnp.mean(ssim_per_frame(a, b))
