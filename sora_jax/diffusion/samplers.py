"""Samplers for rectified flow, from t = 1 (noise) to t = 0 (data): Euler, Heun and
DPM-Solver++(2M), with classifier-free guidance on text and on visual context.

Every solver walks the same grid: u_i = start * (1 - i / N), i = 0..N, mapped per token to
t_i = shift_time(u_i, shift) (SD3's resolution shift). ``start`` < 1 begins part-way, which
is SDEdit (Meng et al. 2022): the caller passes x = (1 - t_start) x0 + t_start noise. Context
tokens (``cond_mask``) sit at t = 0 and never move (:mod:`sora_jax.diffusion.conditioning`).

Solvers (velocity v = noise - x0, data prediction x0_hat = x - t v):
  euler     x' = x + (t' - t) v(x, t)                                      N evaluations
  heun      Euler predictor, trapezoidal corrector (Karras et al. 2022, Alg. 1)   2N
  dpmpp_2m  DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) with alpha_t = 1 - t,
            sigma_t = t, lambda_t = log((1 - t) / t):
              x' = (t'/t) x + (1 - t'/t) D,   D = x0_hat + (x0_hat - x0_hat_prev) / (2 r),
              r = h_prev / h, h = lambda_t' - lambda_t;                    N evaluations
            first order (D = x0_hat, the Euler step) where r is undefined: the first step
            (lambda_1 = -inf) and the last (t' = 0, h = inf).

Guidance (Ho & Salimans 2022; two conditions as InstructPix2Pix, Brooks et al. 2023, eq. 3):
  v = v(0, 0) + s_v (v(ctx, 0) - v(0, 0)) + s_t (v(ctx, txt) - v(ctx, 0))
where "0" text is every text segment id set to 0 (the learned null text), or a negative
prompt's states when given (Wan 2.1's CFG, whose DiT has no null text), and "0" context is
every context token removed (made padding, as visual dropout does in training). With no
visual scale the first term is dropped (v = v(ctx, 0) + s_t (...)): two branches, not three.
All branches run as one batch, so changing a scale never recompiles.

The whole loop is one ``jax.jit`` (``lax.fori_loop``) with ``num_steps`` and ``solver``
static and every float (scales, shift, start) an array argument. An NNX model is split into
its static graph definition and its state (a traced argument), merged inside the jit.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.diffusion.flow import shift_time

SOLVERS = ("euler", "heun", "dpmpp_2m")
EVALS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1}

# Incremented each time a sampling loop is traced; tests use it to prove that changing a
# guidance scale does not retrace.
TRACE_COUNT = 0


class _Inputs(NamedTuple):
    segment_ids: jax.Array
    positions: jax.Array
    text: jax.Array
    text_segment_ids: jax.Array
    cond: jax.Array | None
    w_text: jax.Array | None
    w_visual: jax.Array | None
    neg_text: jax.Array | None = None  # the "no text" branches' text (a negative prompt); None: none
    neg_text_segment_ids: jax.Array | None = None


def _call(model, x, seg, pos, t, text, tseg, cond):
    if cond is None:
        return model(x, seg, pos, t, text, tseg)
    return model(x, seg, pos, t, text, tseg, cond_mask=cond)


def _guided_velocity(model, x, t, inp: _Inputs) -> jax.Array:
    seg, pos, text, tseg, cond = inp.segment_ids, inp.positions, inp.text, inp.text_segment_ids, inp.cond
    if inp.w_text is None and inp.w_visual is None:
        return _call(model, x, seg, pos, t, text, tseg, cond).astype(jnp.float32)
    b = x.shape[0]
    # "no text": every text segment id 0 (the learned null text), or a negative prompt's states
    if inp.neg_text is None:
        null_text, null_tseg = text, jnp.zeros_like(tseg)
    else:
        null_text, null_tseg = inp.neg_text, inp.neg_text_segment_ids
    # branches: (text, context) always; (no text, context) for text guidance; (no text, no
    # context) for visual guidance. Context removal: context tokens become padding.
    segs, texts, tsegs, conds = [seg], [text], [tseg], [cond]
    if inp.w_text is not None:
        segs.append(seg), texts.append(null_text), tsegs.append(null_tseg), conds.append(cond)
    if inp.w_visual is not None:
        segs.append(jnp.where(cond, 0, seg)), texts.append(null_text), tsegs.append(null_tseg)
        conds.append(cond)
    k = len(segs)
    rep = lambda a: jnp.concatenate([a] * k, axis=0)  # noqa: E731
    v = _call(model, rep(x), jnp.concatenate(segs), rep(pos), rep(t), jnp.concatenate(texts),
              jnp.concatenate(tsegs), None if cond is None else jnp.concatenate(conds))
    v = v.astype(jnp.float32)
    vs = [v[i * b:(i + 1) * b] for i in range(k)]
    v_full = vs[0]
    col = lambda w: w[:, None, None]  # noqa: E731
    if inp.w_text is not None and inp.w_visual is not None:
        v_ctx, v_none = vs[1], vs[2]
        return v_none + col(inp.w_visual) * (v_ctx - v_none) + col(inp.w_text) * (v_full - v_ctx)
    if inp.w_text is not None:
        return vs[1] + col(inp.w_text) * (v_full - vs[1])
    # visual guidance only: the unconditional branch drops both text and context
    return vs[1] + col(inp.w_visual) * (v_full - vs[1])


def _lambda(t):
    # log-SNR of x_t = (1 - t) x0 + t noise; -inf at t = 1, +inf at t = 0 (handled by callers)
    return jnp.log1p(-t) - jnp.log(t)


@partial(jax.jit, static_argnames=("graphdef", "num_steps", "solver"))
def _sample_loop(graphdef, state, x, inp: _Inputs, shift, start, *, num_steps, solver):
    global TRACE_COUNT
    TRACE_COUNT += 1
    model = graphdef if state is None else nnx.merge(graphdef, state)
    b, l, _ = x.shape
    shift = jnp.broadcast_to(shift, (b, l))
    start = jnp.broadcast_to(start, (b, l))

    def times(i):
        t = shift_time(start * (1.0 - i / num_steps), shift)
        return t if inp.cond is None else jnp.where(inp.cond, 0.0, t)

    vel = lambda x, t: _guided_velocity(model, x, t, inp)  # noqa: E731

    def step(i, carry):
        x, x0_prev, h_prev = carry
        t, t_next = times(i), times(i + 1)
        moving = (t_next != t)[..., None]  # context tokens and start = 0 stay put
        dt = (t_next - t)[..., None]
        v = vel(x, t)
        if solver == "euler":
            x_new = x + dt * v
        elif solver == "heun":
            v2 = vel(x + dt * v, t_next)
            x_new = x + dt * 0.5 * (v + v2)
        else:  # dpmpp_2m
            x0 = x - t[..., None] * v
            h = _lambda(t_next) - _lambda(t)
            r = h_prev / h
            coef = jnp.where(jnp.isfinite(r) & (r > 0), 0.5 / r, 0.0)[..., None]
            d = x0 + coef * (x0 - x0_prev)
            ratio = (t_next / jnp.where(t > 0, t, 1.0))[..., None]
            x_new = ratio * x + (1.0 - ratio) * d
            x0_prev, h_prev = x0, h
        return jnp.where(moving, x_new, x), x0_prev, h_prev

    x = x.astype(jnp.float32)
    carry = (x, jnp.zeros_like(x), jnp.full((b, l), jnp.inf, jnp.float32))
    return jax.lax.fori_loop(0, num_steps, step, carry)[0]


def sample(model: nnx.Module | Callable[..., jax.Array], *, x: jax.Array, segment_ids: jax.Array,
           positions: jax.Array, text: jax.Array, text_segment_ids: jax.Array, num_steps: int,
           solver: str = "euler", guidance_scale: jax.Array | float | None = None,
           visual_guidance_scale: jax.Array | float | None = None,
           shift: jax.Array | float = 1.0, cond_mask: jax.Array | None = None,
           start: jax.Array | float = 1.0, negative_text: jax.Array | None = None,
           negative_text_segment_ids: jax.Array | None = None) -> jax.Array:
    """Integrates the learned velocity field from u = start to 0.

    Args:
      model: a :class:`sora_jax.models.dit.DiT` (any NNX module) or a plain callable
        ``(tokens, segment_ids, positions, timesteps, text, text_segment_ids[, cond_mask=])
        -> (B, L, D)`` (a plain callable is a static jit argument, hashed by identity).
      x: (B, L, D) state at the start time: noise for start = 1; for SDEdit the noised input
        (1 - t_start) x0 + t_start noise; on context tokens their clean latent.
      segment_ids: (B, L) int, 0 = padding.
      positions: (B, L, 3) int (t, h, w).
      text: (B, Lt, Dt) float; text_segment_ids: (B, Lt) int.
      num_steps: solver steps N (static); model evaluations are N x ``EVALS_PER_STEP[solver]``
        per guidance branch.
      solver: one of :data:`SOLVERS` (static).
      guidance_scale: text CFG scale s_t, scalar or (B,); None: no text guidance.
      visual_guidance_scale: visual CFG scale s_v, scalar or (B,); None: none (= s_v of 1).
        Needs ``cond_mask``.
      shift: scalar or (B, L) per-token time shift
        (:func:`sora_jax.diffusion.flow.time_shift_for_tokens`).
      cond_mask: optional (B, L) bool; True tokens are clean context at t = 0, unchanged.
      start: scalar or (B, L) in [0, 1]: the grid's first u (1: from pure noise; s: SDEdit at
        strength s; 0: nothing moves and x is returned).
      negative_text, negative_text_segment_ids: optional (B, Lt, Dt) / (B, Lt): what the
        guidance branches without text see instead of the null text (segment ids 0): a
        negative prompt's states, laid out as ``text`` (Wan 2.1's CFG; a DiT without a null
        token needs it).

    Returns:
      (B, L, D) float32 x at t = 0 (values on padding tokens are meaningless).

    Raises:
      ValueError: unknown solver, num_steps < 1, a visual scale without ``cond_mask``, or a
        negative text whose shape is not the text's.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if visual_guidance_scale is not None and cond_mask is None:
        raise ValueError("visual_guidance_scale needs a cond_mask (context tokens to guide by)")
    if (negative_text is None) != (negative_text_segment_ids is None) or (
            negative_text is not None and (np.shape(negative_text) != np.shape(text)
                                           or np.shape(negative_text_segment_ids) != np.shape(text_segment_ids))):
        raise ValueError("negative_text and negative_text_segment_ids go together, shaped as text and "
                         "text_segment_ids")
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
    else:
        graphdef, state = model, None
    b = x.shape[0]
    as_rows = lambda w: None if w is None else jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))  # noqa: E731
    inp = _Inputs(jnp.asarray(segment_ids), jnp.asarray(positions), jnp.asarray(text),
                  jnp.asarray(text_segment_ids),
                  None if cond_mask is None else jnp.asarray(cond_mask, bool),
                  as_rows(guidance_scale), as_rows(visual_guidance_scale),
                  None if negative_text is None else jnp.asarray(negative_text),
                  None if negative_text_segment_ids is None else jnp.asarray(negative_text_segment_ids))
    return _sample_loop(graphdef, state, jnp.asarray(x), inp, jnp.asarray(shift, jnp.float32),
                        jnp.asarray(start, jnp.float32), num_steps=int(num_steps), solver=solver)
