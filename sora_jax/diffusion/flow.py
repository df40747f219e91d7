"""Rectified flow: interpolation, velocity target, timestep sampling and shift, loss.

Conventions (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching";
Esser et al. 2024, SD3):

  x_t = (1 - t) * x0 + t * noise,   t in [0, 1], t = 1 is pure noise,
  v   = dx_t/dt = noise - x0        (the model's regression target).

Timesteps are per token (B, L): a conditioning frame is a token at t = 0. Training draws one
t per example (segment) from a logit-normal (SD3 eq. 19) and shifts it towards noise for
examples with many tokens (SD3 §5.3.2; Open-Sora): at higher resolution more noise is needed
to destroy the same amount of signal.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion.conditioning import draw_condition_mask


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise. x0, noise: (B, L, D); t: (B, L) (or broadcastable)."""
    t = jnp.asarray(t, x0.dtype)[..., None]
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Rectified-flow velocity v = noise - x0 (the time derivative of :func:`interpolate`)."""
    return noise - x0


def shift_time(t: jax.Array, shift: jax.Array | float) -> jax.Array:
    """Resolution shift t' = s t / (1 + (s - 1) t) (SD3 §5.3.2, with t = 1 as noise).

    Monotone increasing on [0, 1], fixes 0 and 1, identity at s = 1; s > 1 moves mass
    towards noise. Equivalent to scaling the noise-to-signal ratio t/(1-t) by s.
    """
    t = jnp.asarray(t, jnp.float32)
    s = jnp.asarray(shift, jnp.float32)
    return s * t / (1.0 + (s - 1.0) * t)


def time_shift_for_tokens(num_tokens: jax.Array | float, base_tokens: float = 256.0,
                          max_shift: float = 3.0) -> jax.Array:
    """Shift s = sqrt(num_tokens / base_tokens), clipped to [1, max_shift].

    sqrt because the SD3 argument keeps the per-pixel signal-to-noise of a constant image
    equal across resolutions: n times more tokens average n times the noise, which
    needs sqrt(n) more noise standard deviation. Float32 array of num_tokens' shape.
    """
    n = jnp.asarray(num_tokens, jnp.float32)
    return jnp.clip(jnp.sqrt(n / base_tokens), 1.0, max_shift)


def _segment_table_index(segment_ids: jax.Array) -> jax.Array:
    # Tables hold one entry per possible segment id 0..L; clip guards foreign batches.
    return jnp.clip(segment_ids, 0, segment_ids.shape[1]).astype(jnp.int32)


def segment_token_counts(segment_ids: jax.Array) -> jax.Array:
    """(B, L) -> (B, L) float32: number of tokens of each token's segment (0 on padding)."""
    idx = _segment_table_index(segment_ids)
    length = segment_ids.shape[1]
    counts = jax.vmap(lambda s: jnp.bincount(s, length=length + 1))(idx)  # (B, L + 1)
    n = jnp.take_along_axis(counts, idx, axis=1).astype(jnp.float32)
    return jnp.where(segment_ids != 0, n, 0.0)


def sample_timesteps(key: jax.Array, segment_ids: jax.Array, *, logit_mean: float = 0.0,
                     logit_std: float = 1.0, base_tokens: float = 256.0,
                     max_shift: float = 3.0, use_shift: bool = True) -> jax.Array:
    """Per-token training times, one logit-normal draw per (row, segment).

    u ~ N(logit_mean, logit_std), t = sigmoid(u) (SD3 eq. 19), then, if ``use_shift``,
    t' = shift_time(t, time_shift_for_tokens(n_segment)) with n_segment that segment's token
    count. A draw is made for each possible segment id 0..L of each row (segment ids must
    lie in [0, L]) and gathered per token, so all tokens of one example share one t.

    Args:
      key: PRNG key.
      segment_ids: (B, L) int, 0 = padding.

    Returns:
      (B, L) float32 in (0, 1); exactly 0 on padding tokens.
    """
    b, l = segment_ids.shape
    idx = _segment_table_index(segment_ids)
    u = logit_mean + logit_std * jax.random.normal(key, (b, l + 1), jnp.float32)
    t = jnp.take_along_axis(jax.nn.sigmoid(u), idx, axis=1)
    if use_shift:
        t = shift_time(t, time_shift_for_tokens(segment_token_counts(segment_ids),
                                                base_tokens, max_shift))
    return jnp.where(segment_ids != 0, t, 0.0)


def drop_captions(key: jax.Array, text_segment_ids: jax.Array, p: float,
                  max_segment_id: int) -> jax.Array:
    """Caption dropout: with probability ``p`` per (row, segment), zero that segment's text ids.

    Args:
      key: PRNG key.
      text_segment_ids: (B, Lt) int.
      p: drop probability.
      max_segment_id: largest possible segment id (the latent length L).

    Returns:
      (B, Lt) int, same dtype; dropped segments have id 0, so the model sees no text for
      them (the unconditional branch of classifier-free guidance, Ho & Salimans 2022).
    """
    b = text_segment_ids.shape[0]
    drop = jax.random.bernoulli(key, p, (b, max_segment_id + 1))
    idx = jnp.clip(text_segment_ids, 0, max_segment_id).astype(jnp.int32)
    d = jnp.take_along_axis(drop, idx, axis=1)
    return jnp.where(d, jnp.zeros_like(text_segment_ids), text_segment_ids)


def rectified_flow_loss(model: Callable[..., jax.Array], batch: dict[str, jax.Array],
                        key: jax.Array, *, caption_dropout: float = 0.1,
                        loss_weighting: str = "per_token", logit_mean: float = 0.0,
                        logit_std: float = 1.0, base_tokens: float = 256.0,
                        max_shift: float = 3.0, use_shift: bool = True,
                        timesteps: jax.Array | None = None,
                        conditioning: dict[str, Any] | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Rectified-flow (flow-matching) MSE on a packed batch.

    noise ~ N(0, I) per token, t per segment from :func:`sample_timesteps`,
    x_t = (1 - t) x0 + t noise, loss = || model(x_t, t) - (noise - x0) ||^2 averaged over the
    feature axis, weighted by ``loss_mask * (segment_ids != 0)``.

    Args:
      model: callable ``model(tokens, segment_ids, positions, timesteps, text,
        text_segment_ids) -> (B, L, D)`` (e.g. :class:`sora_jax.models.dit.DiT`).
      batch: packed batch (see :mod:`sora_jax.data.packing`); ``tokens`` are the clean
        latents x0. Its ``timesteps`` entry is ignored.
      key: PRNG key (split for timesteps, noise and caption dropout).
      caption_dropout: probability of dropping each segment's text.
      loss_weighting: "per_token" (mean over real tokens: big examples weigh more) or
        "per_example" (mean per segment, then over segments: every example weighs the same).
      logit_mean, logit_std, base_tokens, max_shift, use_shift: see :func:`sample_timesteps`.
      timesteps: optional (B, L) per-token times used instead of sampling.
      conditioning: optional settings from
        :func:`sora_jax.diffusion.conditioning.conditioning_settings`. When given, a context
        pattern is drawn per example (:func:`~sora_jax.diffusion.conditioning.draw_condition_mask`):
        context tokens keep their clean value x0 at t = 0, are flagged to the model with
        ``cond_mask`` and weigh 0 in the loss; removed context tokens become padding.

    Returns:
      (loss scalar float32, aux) with aux ``loss``, ``num_tokens`` (weighted token count),
      ``mean_t`` (mean t over weighted tokens); with ``conditioning`` also ``cond_fraction``
      (share of real tokens given as context).

    Raises:
      ValueError: unknown ``loss_weighting``.
    """
    if loss_weighting not in ("per_token", "per_example"):
        raise ValueError(f"loss_weighting must be 'per_token' or 'per_example', "
                         f"got {loss_weighting!r}")
    x0 = batch["tokens"].astype(jnp.float32)
    seg = batch["segment_ids"]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    cond = None
    if conditioning is not None:
        real = seg != 0
        cond, removed = draw_condition_mask(jax.random.fold_in(key, 3), seg, batch["positions"][..., 0], conditioning)
        seg = jnp.where(removed, 0, seg)
    if timesteps is None:
        t = sample_timesteps(k_t, seg, logit_mean=logit_mean, logit_std=logit_std,
                             base_tokens=base_tokens, max_shift=max_shift, use_shift=use_shift)
    else:
        t = jnp.asarray(timesteps, jnp.float32)
    if cond is not None:
        t = jnp.where(cond, 0.0, t)  # interpolate() then gives the clean x0
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = interpolate(x0, noise, t)
    text_seg = batch["text_segment_ids"]
    if caption_dropout > 0:
        text_seg = drop_captions(k_drop, text_seg, caption_dropout, seg.shape[1])
    if cond is None:
        pred = model(x_t, seg, batch["positions"], t, batch["text"], text_seg)
    else:
        pred = model(x_t, seg, batch["positions"], t, batch["text"], text_seg, cond_mask=cond)
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise)), axis=-1)
    w = batch["loss_mask"].astype(jnp.float32) * (seg != 0)
    if cond is not None:
        w = w * ~cond  # context is given, not predicted
    num_tokens = jnp.sum(w)
    if loss_weighting == "per_token":
        loss = jnp.sum(w * err) / jnp.maximum(num_tokens, 1.0)
    else:
        idx = _segment_table_index(seg)
        nseg = seg.shape[1] + 1
        seg_sum = jax.vmap(lambda e, i: jax.ops.segment_sum(e, i, nseg))(w * err, idx)
        seg_w = jax.vmap(lambda e, i: jax.ops.segment_sum(e, i, nseg))(w, idx)
        valid = (seg_w > 0).at[:, 0].set(False)
        per_seg = seg_sum / jnp.maximum(seg_w, 1e-12)
        loss = jnp.sum(jnp.where(valid, per_seg, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    aux = {"loss": loss, "num_tokens": num_tokens,
           "mean_t": jnp.sum(w * t) / jnp.maximum(num_tokens, 1.0)}
    if cond is not None:
        aux["cond_fraction"] = jnp.sum(cond) / jnp.maximum(jnp.sum(real), 1)
    return loss, aux
