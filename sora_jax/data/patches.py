"""Spacetime patches <-> channels: the one rearrangement behind DiT tokens, the VAE's
space-to-depth input and the linear patch shortcut (einops; NumPy and JAX arrays alike).

A (pt, ph, pw) patch of a channels-last (..., T, H, W, C) array becomes one position of
pt * ph * pw * C features, ordered (pt, ph, pw, C), C fastest.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import einops

__all__ = ["depth_to_space", "space_to_depth"]

Array = TypeVar("Array")


def space_to_depth(x: Array, patch: Sequence[int]) -> Array:
    """(..., T, H, W, C) -> (..., T / pt, H / ph, W / pw, pt * ph * pw * C).

    Raises:
      einops.EinopsError: T, H or W is not a multiple of the patch.
    """
    pt, ph, pw = patch
    return einops.rearrange(x, "... (t pt) (h ph) (w pw) c -> ... t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def depth_to_space(x: Array, patch: Sequence[int]) -> Array:
    """Inverse of :func:`space_to_depth`: (..., t, h, w, pt * ph * pw * C) ->
    (..., t * pt, h * ph, w * pw, C).

    Raises:
      einops.EinopsError: the features are not a multiple of pt * ph * pw.
    """
    pt, ph, pw = patch
    return einops.rearrange(x, "... t h w (pt ph pw c) -> ... (t pt) (h ph) (w pw) c", pt=pt, ph=ph, pw=pw)
