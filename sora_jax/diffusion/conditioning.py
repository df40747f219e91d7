"""One conditioning scheme for every image and video prompt: clean context frames at t = 0.

Any set of latent frames (an image as frame 0, the end of a video to extend, both ends of a
gap to fill, keyframes) is given to the DiT as *clean context*: those tokens hold the clean
latent x0, carry timestep 0 (every token has its own t), are flagged by a learned embedding
(``cond_mask`` of :class:`sora_jax.models.dit.DiT`), never move during sampling, and are left out
of the loss. This is the per-frame mask of Open-Sora 1.x (Zheng et al. 2024) with a flag
embedding instead of a concatenated mask channel, so one model does image-to-video, extension
both ways, connection, loops and, with no context, text-to-video and text-to-image.

Training draws a pattern per example at configured rates (:data:`CONDITION_PATTERNS`). With
probability ``visual_dropout`` the drawn context is *removed* instead (its tokens become
padding): that is the visually unconditional branch that classifier-free guidance on the
visual condition needs at sampling time (:mod:`sora_jax.diffusion.samplers`).

Frames are the DiT's time-patch index ``positions[..., 0]`` (a latent frame when the time
patch is 1). All functions act on packed (B, L) batches inside ``jit``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

CONDITION_PATTERNS = ("none", "first_frame", "first_k", "last_k", "first_last", "keyframes")

# The keys of the ``conditioning`` config section (its values live in the configs).
CONDITIONING_KEYS = CONDITION_PATTERNS + ("max_k", "keyframe_prob", "visual_dropout")


def conditioning_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``conditioning`` config section, checked and converted to plain Python values.

    Keys (all required): one rate per pattern of :data:`CONDITION_PATTERNS` (relative weights, >= 0, not all
    0), ``max_k`` (>= 1: k of first_k / last_k is drawn from 1..max_k), ``keyframe_prob`` (in
    (0, 1): chance that a frame is a keyframe), ``visual_dropout`` (in [0, 1): chance that
    the drawn context is removed rather than given).

    Raises:
      ValueError: an unknown or missing key, or a value out of range (naming it).
    """
    c = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown, missing = sorted(set(c) - set(CONDITIONING_KEYS)), sorted(set(CONDITIONING_KEYS) - set(c))
    if unknown or missing:
        raise ValueError(f"conditioning config keys: unknown {unknown}, missing {missing}; "
                         f"expected {list(CONDITIONING_KEYS)}")
    for p in CONDITION_PATTERNS:
        c[p] = float(c[p])
        if c[p] < 0:
            raise ValueError(f"conditioning.{p} must be >= 0, got {c[p]}")
    if sum(c[p] for p in CONDITION_PATTERNS) <= 0:
        raise ValueError("conditioning rates are all 0; set conditioning.none=1 to train without context")
    c["max_k"] = int(c["max_k"])
    if c["max_k"] < 1:
        raise ValueError(f"conditioning.max_k must be >= 1, got {c['max_k']}")
    c["keyframe_prob"], c["visual_dropout"] = float(c["keyframe_prob"]), float(c["visual_dropout"])
    if not 0 < c["keyframe_prob"] < 1:
        raise ValueError(f"conditioning.keyframe_prob must be in (0, 1), got {c['keyframe_prob']}")
    if not 0 <= c["visual_dropout"] < 1:
        raise ValueError(f"conditioning.visual_dropout must be in [0, 1), got {c['visual_dropout']}")
    return c


def is_enabled(settings: Mapping[str, Any]) -> bool:
    """True when some pattern other than "none" has a positive rate."""
    return any(settings[p] > 0 for p in CONDITION_PATTERNS[1:])


def _per_segment(values: jax.Array, idx: jax.Array) -> jax.Array:
    """Gathers a (B, L + 1) per-(row, segment id) table at (B, L) segment ids."""
    return jnp.take_along_axis(values, idx, axis=1)


def _segment_reduce(x: jax.Array, idx: jax.Array, op) -> jax.Array:
    nseg = idx.shape[1] + 1
    return jax.vmap(lambda v, i: op(v, i, num_segments=nseg))(x, idx)


def draw_condition_mask(key: jax.Array, segment_ids: jax.Array, frame_index: jax.Array,
                        settings: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """Draws a context pattern per example of a packed batch.

    Per (row, segment): a pattern from the configured rates, k ~ U{1..max_k}, and for
    "keyframes" an independent Bernoulli(keyframe_prob) per frame. With n the example's frame
    count (max frame index + 1), the context frames are: first_frame {0}; first_k {0..k-1};
    last_k {n-k..n-1}; first_last {0, n-1}; keyframes the drawn frames; k is capped at n - 1
    and a pattern that would leave no frame to generate gives no context (an image, n = 1,
    never has context). Then with probability ``visual_dropout`` the context is removed.

    Args:
      key: PRNG key.
      segment_ids: (B, L) int, 0 = padding; ids must lie in [0, L].
      frame_index: (B, L) int, the token's frame (``positions[..., 0]``).
      settings: from :func:`conditioning_settings`.

    Returns:
      (cond, removed): (B, L) bool each, disjoint, False on padding. ``cond``: clean context
      tokens; ``removed``: context tokens dropped for visual guidance (make them padding).
    """
    b, l = segment_ids.shape
    idx = jnp.clip(segment_ids, 0, l).astype(jnp.int32)
    real = segment_ids != 0
    f = frame_index.astype(jnp.int32)
    n = _per_segment(_segment_reduce(jnp.where(real, f, -1), idx, jax.ops.segment_max), idx) + 1
    k_pat, k_k, k_key, k_drop = jax.random.split(key, 4)
    rates = jnp.asarray([settings[p] for p in CONDITION_PATTERNS], jnp.float32)
    pattern = _per_segment(jax.random.categorical(k_pat, jnp.log(rates), shape=(b, l + 1)), idx)
    k = _per_segment(jax.random.randint(k_k, (b, l + 1), 1, settings["max_k"] + 1), idx)
    k = jnp.minimum(k, n - 1)
    # One uniform per (row, segment, frame), so every token of a keyframe agrees.
    u = jax.vmap(jax.vmap(lambda r, s, t: jax.random.uniform(
        jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k_key, r), s), t))))(
        jnp.broadcast_to(jnp.arange(b)[:, None], (b, l)), idx, f)
    key_frame = u < settings["keyframe_prob"]
    # A segment whose every token is a keyframe would have nothing to generate.
    count = lambda m: _per_segment(_segment_reduce(m.astype(jnp.int32), idx, jax.ops.segment_sum), idx)  # noqa: E731
    key_frame &= count(key_frame & real) < count(real)
    masks = jnp.stack([
        jnp.zeros_like(real),
        f == 0,
        f < k,
        f >= n - k,
        ((f == 0) | (f == n - 1)) & (n >= 3),
        key_frame,
    ])
    cond = jnp.take_along_axis(masks, pattern[None], axis=0)[0] & real & (n >= 2)
    drop = _per_segment(jax.random.bernoulli(k_drop, settings["visual_dropout"], (b, l + 1)), idx)
    return cond & ~drop, cond & drop


# ----------------------------------------------------------------------------- inference side

def latent_frame_spans(num_latent_frames: int, temporal_downsample: int) -> list[tuple[int, int]]:
    """Pixel frames [start, stop) of each latent frame of a causal VAE.

    Latent 0 holds pixel frame 0 alone; latent j >= 1 holds frames td (j - 1) + 1 .. td j
    (causal VAE convention, ``sora_jax.models.vae``).
    """
    td = int(temporal_downsample)
    return [(0, 1)] + [(td * (j - 1) + 1, td * j + 1) for j in range(1, num_latent_frames)]


def context_latent_frames(known: np.ndarray, temporal_downsample: int) -> np.ndarray:
    """Which latent frames can be clean context: those whose pixel frames are all given.

    Args:
      known: (F,) bool, F = 1 + td * n pixel frames; True where the user gave the frame.
      temporal_downsample: td of the VAE.

    Returns:
      (n + 1,) bool.

    Raises:
      ValueError: F is not 1 + td * n.
    """
    known = np.asarray(known, bool)
    td = int(temporal_downsample)
    if known.ndim != 1 or (known.size - 1) % td:
        raise ValueError(f"{known.size} frames: need 1 + {td}k")
    spans = latent_frame_spans(1 + (known.size - 1) // td, td)
    return np.array([known[a:b].all() for a, b in spans])


def token_condition_mask(context_frames: np.ndarray, positions: np.ndarray,
                         time_patch: int) -> np.ndarray:
    """Per-token context flag of one patchified example.

    A token is context when every latent frame of its time patch is a context frame.

    Args:
      context_frames: (t,) bool per latent frame.
      positions: (n, 3) int patch-grid positions from ``sora_jax.data.packing.patchify``.
      time_patch: the DiT's pt.

    Returns:
      (n,) bool.
    """
    cf = np.asarray(context_frames, bool)
    pt = int(time_patch)
    per_patch = cf[: (cf.size // pt) * pt].reshape(-1, pt).all(axis=1)
    return per_patch[np.asarray(positions)[:, 0]]
