"""Reconstruction metrics for videos: PSNR and SSIM.

Inputs follow the project convention: float pixels in [-1, 1] (uint8 inputs are converted with
`sora_jax.io.to_float` first), channels-last, any leading shape.

PSNR is shift-invariant, so PSNR on [-1, 1] with data_range 2 equals PSNR on [0, 255] with
data_range 255 (up to uint8 rounding). SSIM is not (its luminance term depends on the means), so
`ssim` maps [-1, 1] to [0, 1] first and uses data_range 1: values then equal SSIM on [0, 1] or
uint8 images, the convention behind published autoencoder numbers (e.g. Open-Sora's).
Neither metric clips: clip (or round-trip through uint8) first to score what a viewer would see.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from sora_jax.io import to_float

__all__ = ["psnr", "psnr_per_video", "ssim", "ssim_per_frame", "ssim_per_video"]

# Wang et al. 2004 use an 11x11 Gaussian window, sigma 1.5 (skimage: truncate 3.5 -> radius 5).
_SSIM_SIGMA = 1.5
_SSIM_WINDOW = 11


def _as_float64(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        # Skips to_float's float32 cast, so float64 callers keep their precision.
        return x.astype(np.float64)
    return to_float(x).astype(np.float64)  # uint8; raises TypeError for other dtypes


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("empty arrays")
    return a, b


def psnr(a: Any, b: Any, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE).

    The MSE is the mean over the whole array (all frames, pixels and channels together), not a
    mean of per-frame PSNRs; per-frame averaging weights bad frames less and gives higher numbers.

    Args:
      a, b: arrays of the same shape, float in [-1, 1] or uint8 (converted to [-1, 1]).
      data_range: peak-to-peak range of the float pixels (2 for [-1, 1]).

    Returns:
      PSNR in dB; +inf when the arrays are equal.

    Raises:
      ValueError: shapes differ or arrays are empty.
    """
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def psnr_per_video(a: Any, b: Any, data_range: float = 2.0) -> np.ndarray:
    """PSNR of each item along the leading axis, as in `psnr`.

    Args:
      a, b: (B, ...) arrays of the same shape, e.g. (B, T, H, W, 3).

    Returns:
      float64 array (B,) in dB (+inf for identical items).
    """
    a, b = _pair(a, b)
    mse = np.mean((a - b).reshape(a.shape[0], -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _ssim_frame(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one (H, W, C) frame pair in [0, 1]."""
    side = min(x.shape[0], x.shape[1])
    kwargs = {}
    if side < _SSIM_WINDOW:
        # skimage refuses images smaller than the window; a smaller odd window only trims less
        # of the border from the mean (the Gaussian filter itself stays sigma 1.5).
        kwargs["win_size"] = side if side % 2 else side - 1
    return float(
        structural_similarity(
            x,
            y,
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=_SSIM_SIGMA,
            use_sample_covariance=False,
            **kwargs,
        )
    )


def ssim(a: Any, b: Any) -> float:
    """Mean structural similarity over frames (Wang et al. 2004, "Image quality assessment: from
    error visibility to structural similarity").

    Each frame's SSIM comes from ``skimage.metrics.structural_similarity`` with the paper's
    settings: 11-tap Gaussian window of sigma 1.5, population covariances, K1 = 0.01, K2 = 0.03,
    channels averaged. Pixels are mapped to [0, 1] (data_range 1) first; see the module docstring.
    Frames smaller than 11 px use the largest odd window that fits.

    Args:
      a, b: (T, H, W, C) videos or one (H, W, C) frame, same shape; float in [-1, 1] or uint8.

    Returns:
      Mean SSIM over frames, in [-1, 1]; 1.0 for identical inputs.

    Raises:
      ValueError: shapes differ, or not 3-D / 4-D.
    """
    return float(np.mean(ssim_per_frame(a, b)))


def ssim_per_frame(a: Any, b: Any) -> np.ndarray:
    """SSIM of each frame, as in `ssim`. Returns float64 (T,) (or (1,) for one frame)."""
    a, b = _pair(a, b)
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected (T, H, W, C) or (H, W, C), got shape {a.shape}")
    a = (a + 1.0) / 2.0
    b = (b + 1.0) / 2.0
    return np.array([_ssim_frame(x, y) for x, y in zip(a, b)])


def ssim_per_video(a: Any, b: Any) -> np.ndarray:
    """Mean SSIM of each (T, H, W, C) video in a (B, T, H, W, C) batch. Returns float64 (B,)."""
    a, b = _pair(a, b)
    if a.ndim != 5:
        raise ValueError(f"expected (B, T, H, W, C), got shape {a.shape}")
    return np.array([ssim(x, y) for x, y in zip(a, b)])
