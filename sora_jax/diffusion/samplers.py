"""Samplers for rectified flow, from t = 1 (noise) to t = 0 (data): Euler, Heun,
DPM-Solver++(2M) and UniPC, with classifier-free guidance on text and on visual context.

Every solver walks the same grid: u_i = start * g_i, i = 0..N, with g_i = 1 - i / N unless the
caller passes its own ``grid`` g (N + 1 values from 1 down to 0), mapped per token to
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
  unipc     UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
            Sampling of Diffusion Models"), UniP-2 + UniC, B(h) = e^-h - 1 ("bh2"), data
            prediction; with m_i = x0_hat(x_i, t_i), lambda and h_i = lambda_{i+1} - lambda_i as
            above, and r_i = (lambda_{i-1} - lambda_i) / h_i (< 0):
              UniP  x_{i+1} = (t_{i+1}/t_i) x^c_i + (1 - t_{i+1}/t_i) (m_i + (m_{i-1} - m_i) / (2 r_i))
                    (-alpha_{i+1} B(h_i) = 1 - t_{i+1}/t_i; dpmpp_2m's formula), first order
                    (m_i alone) at the first step and at the last one;
              UniC  once m_i is known (the model evaluated at the uncorrected x_i, which the next
                    UniP reuses: no extra evaluation), x_i is replaced by
                    x^c_i = (t_i/t_{i-1}) x^c_{i-1}
                            + (1 - t_i/t_{i-1}) (m_{i-1} + a_1 (m_{i-2} - m_{i-1}) / r + a_2 (m_i - m_{i-1})),
                    r = r_{i-1}, [[1, 1], [r, 1]] (a_1, a_2) = (g_1, g_2), g_k = k! z phi_{k+1}(z) / (e^z - 1),
                    z = -h_{i-1}, phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z;
                    after a first-order UniP (i = 1): a_1 = 0, a_2 = 1/2 (UniC-1; 1/2 is also UniP-2's
                    weight above: both are the reference implementation's, the h -> 0 limit of g_1).
                    The last x_N is UniP's (nothing is evaluated at t = 0).          N evaluations
            UniPC needs lambda finite at the first point: a t above 1 - 1e-6 (t = 1, pure noise)
            is lowered to 1 - 1e-6, the first evaluation included.
            This is diffusers' UniPCMultistepScheduler with prediction_type="flow_prediction",
            use_flow_sigmas=True, solver_order=2, solver_type="bh2", predict_x0=True,
            lower_order_final=True (for order 2 it lowers only the final step, at any N),
            final_sigmas_type="zero" and flow_shift = ``shift`` (Wan 2.1's diffusers scheduler,
            flow_shift 3.0 at 480p), to float32 roundoff, on its grid: its set_timesteps(N) takes
            u_i = 1 - (1 - 1/1000) i / N for i < N (np.linspace(1, 1/1000, N + 1)[:-1]) and u_N = 0,
            so the last step jumps from shift_time(1 - 0.999 (N - 1)/N) to 0. ``start`` cannot express
            that grid: pass ``grid=diffusers_flow_grid(N)`` with start = 1 and pure noise as x. The
            Wan 2.1 repository's own FlowUniPCMultistepScheduler (the same updates, by its source)
            walks u_i = 0.999 (1 - i/N) instead: our default grid with start = 1 - 1/1000 and pure
            noise as x (tests/fixtures/unipc runs diffusers' scheduler on both grids).

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

SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc")
EVALS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1, "unipc": 1}

# UniPC's highest t. diffusers lowers a first sigma of 1 by 1e-6 (its set_timesteps with
# use_flow_sigmas) so that lambda_t = log((1 - t) / t) is finite, which the UniC coefficients
# after the first step need; float32(1 - 1e-6) is the sigma diffusers stores.
UNIPC_T_MAX = 1.0 - 1e-6

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


def diffusers_flow_grid(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The unshifted grid of diffusers' flow-sigma schedulers, for ``sample(grid=...)``.

    diffusers' ``UniPCMultistepScheduler.set_timesteps(N)`` with ``use_flow_sigmas=True`` takes
    sigmas ``np.linspace(1, 1 / num_train_timesteps, N + 1)[:-1]``, shifts them, and appends a
    final sigma of 0 (``final_sigmas_type="zero"``). (It also lowers a first sigma of 1 to
    1 - 1e-6; the unipc solver does that itself, see :data:`UNIPC_T_MAX`.)

    Returns:
      (num_steps + 1,) float64: 1 - (1 - 1/num_train_timesteps) i / N for i < N, then 0.
    """
    u = np.linspace(1.0, 1.0 / num_train_timesteps, int(num_steps) + 1)[:-1]
    return np.concatenate([u, [0.0]])


def guidance_inputs(segment_ids, positions, text, text_segment_ids, *, cond_mask=None, w_text=None,
                    w_visual=None, neg_text=None, neg_text_segment_ids=None) -> _Inputs:
    """The conditioning :func:`solver_step` reads (see :func:`sample` for each argument's shape);
    ``w_text`` / ``w_visual``: (B,) float32 guidance scales or None."""
    return _Inputs(segment_ids, positions, text, text_segment_ids, cond_mask, w_text, w_visual, neg_text,
                   neg_text_segment_ids)


def initial_carry(x, solver: str) -> tuple:
    """The sampler loop's state before step 0 for starting point ``x`` (B, L, D) (an array, or a
    ``jax.ShapeDtypeStruct`` for tracing): (x, previous x0 prediction, previous log-SNR step)
    for euler / heun / dpmpp_2m; (x, last corrected x, m_{i-1}, m_{i-2}) for unipc."""
    if isinstance(x, jax.ShapeDtypeStruct):
        row = jax.ShapeDtypeStruct(x.shape[:2], jnp.float32)
        return (x, x, x, x) if solver == "unipc" else (x, x, row)
    x = jnp.asarray(x, jnp.float32)
    if solver == "unipc":
        return (x, x, jnp.zeros_like(x), jnp.zeros_like(x))
    return (x, jnp.zeros_like(x), jnp.full(x.shape[:2], jnp.inf, jnp.float32))


def solver_step(model, i, carry, inp: _Inputs, shift, start, grid=None, *, num_steps, solver: str):
    """Step i of ``num_steps`` of ``solver`` (the loop body of :func:`sample`): carry -> carry.

    Args:
      model: the velocity model (an NNX module or a callable).
      i: int32 step index; ``num_steps``: the step count (a Python int, or a traced int32 scalar:
        a program exported with it as an argument serves every step count).
      carry: as :func:`initial_carry` makes it.
      inp: :func:`guidance_inputs`.
      shift, start: (B, L) float32 per token; grid: optional (num_steps + 1,) unshifted grid.
    """
    b, l = carry[0].shape[:2]
    shift = jnp.broadcast_to(shift, (b, l))
    start = jnp.broadcast_to(start, (b, l))

    def times(i):
        # the default grid stays an expression of i (not a table) so that its results do not
        # change bit for bit from before custom grids existed
        u = (1.0 - i / num_steps) if grid is None else grid[i]
        t = shift_time(start * u, shift)
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

    def unipc_times(i):
        # grid index i (i < 0 only for indices a step does not use; see the masks below)
        return jnp.minimum(times(jnp.maximum(i, 0)), UNIPC_T_MAX)

    def unipc_step(i, carry):
        # x: UniP's output at t_i, not corrected yet; x_prev: the corrected x at t_{i-1}, where
        # that UniP started; m1, m2: the data predictions at t_{i-1}, t_{i-2}. All (B, L, D) f32.
        x, x_prev, m1, m2 = carry
        t2, t1, t, t_next = (unipc_times(i + k) for k in (-2, -1, 0, 1))
        lam2, lam1, lam, lam_next = (_lambda(s) for s in (t2, t1, t, t_next))
        # the data prediction at the uncorrected x: UniC uses it to correct x, and the next UniP
        # starts from the corrected x with this same m (the evaluation is not repeated)
        m = x - t[..., None] * vel(x, t)

        # UniC from t_{i-1} to t_i. Its order is the previous UniP's: 1 after the first step
        # (i = 1: the trapezoid a_2 = 1/2), 2 after that; never after the last step, whose
        # target t = 0 is not evaluated. Masked operands keep NaN/inf out of unused lanes
        # (lambda is inf at t = 0, and t_{i-1}, t_{i-2} do not exist for i < 1, 2).
        moved = (t1 != t) & (i >= 1)  # context tokens (t = 0 throughout) are never corrected
        two = moved & (i >= 2)
        h = jnp.where(two, lam - lam1, 1.0)  # h_{i-1}
        r = jnp.where(two, (lam2 - lam1) / h, -1.0)  # r_{i-1}
        z = -h
        bh = jnp.expm1(z)  # B(h) = e^{-h} - 1 ("bh2"); also h phi_1(h) of the data-prediction update
        phi1 = bh / z
        g1 = (phi1 - 1.0) / bh  # 1! z phi_2(z) / B(h), by the phi recursion (as the reference computes it)
        g2 = 2.0 * ((phi1 - 1.0) / z - 0.5) / bh  # 2! z phi_3(z) / B(h)
        # [[1, 1], [r, 1]] (a_1, a_2) = (g_1, g_2), solved in closed form (1 - r > 1: r < 0)
        a1 = jnp.where(two, (g1 - g2) / (1.0 - r), 0.0)
        a2 = jnp.where(two, (g2 - r * g1) / (1.0 - r), 0.5)
        k1 = jnp.where(two, a1 / r, 0.0)
        ratio_c = jnp.where(moved, t / jnp.where(t1 > 0, t1, 1.0), 1.0)
        col = lambda a: a[..., None]  # noqa: E731
        x_c = col(ratio_c) * x_prev + col(1.0 - ratio_c) * (m1 + col(k1) * (m2 - m1) + col(a2) * (m - m1))
        x = jnp.where(col(moved), x_c, x)

        # UniP from t_i to t_{i+1}: order 1 at the first step (no m_{i-1}) and at the last one
        # (diffusers' lower_order_final: order min(2, N - i)), order 2 in between
        moving = t_next != t
        two_p = moving & (i >= 1) & (i < num_steps - 1)
        r_p = (lam1 - lam) / jnp.where(two_p, lam_next - lam, 1.0)
        kp = jnp.where(two_p, 0.5 / jnp.where(two_p, r_p, 1.0), 0.0)
        ratio = jnp.where(moving, t_next / jnp.where(t > 0, t, 1.0), 1.0)
        x_new = col(ratio) * x + col(1.0 - ratio) * (m + col(kp) * (m1 - m))
        return jnp.where(col(moving), x_new, x), x, m, m1

    if solver == "unipc":
        return unipc_step(i, carry)
    return step(i, carry)


@partial(jax.jit, static_argnames=("graphdef", "num_steps", "solver"))
def _sample_loop(graphdef, state, x, inp: _Inputs, shift, start, grid, *, num_steps, solver):
    global TRACE_COUNT
    TRACE_COUNT += 1
    model = graphdef if state is None else nnx.merge(graphdef, state)
    b, l, _ = x.shape
    body = partial(solver_step, model, inp=inp, shift=jnp.broadcast_to(shift, (b, l)),
                   start=jnp.broadcast_to(start, (b, l)), grid=grid, num_steps=num_steps, solver=solver)
    return jax.lax.fori_loop(0, num_steps, lambda i, c: body(i, c), initial_carry(x, solver))[0]


def sample(model: nnx.Module | Callable[..., jax.Array], *, x: jax.Array, segment_ids: jax.Array,
           positions: jax.Array, text: jax.Array, text_segment_ids: jax.Array, num_steps: int,
           solver: str = "euler", guidance_scale: jax.Array | float | None = None,
           visual_guidance_scale: jax.Array | float | None = None,
           shift: jax.Array | float = 1.0, cond_mask: jax.Array | None = None,
           start: jax.Array | float = 1.0, negative_text: jax.Array | None = None,
           negative_text_segment_ids: jax.Array | None = None,
           grid: jax.Array | np.ndarray | None = None) -> jax.Array:
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
      grid: optional (num_steps + 1,) float, strictly decreasing from 1 (or below) to 0: the
        unshifted grid g_i, so u_i = start * g_i; None: g_i = 1 - i / N. A traced argument
        (changing it does not recompile). :func:`diffusers_flow_grid` gives diffusers' flow
        schedulers' grid (solver "unipc" with it and start = 1 is their UniPC).

    Returns:
      (B, L, D) float32 x at t = 0 (values on padding tokens are meaningless).

    Raises:
      ValueError: unknown solver, num_steps < 1, a visual scale without ``cond_mask``, a
        negative text whose shape is not the text's, or a grid not of num_steps + 1 values.
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
    if grid is not None and np.shape(grid) != (int(num_steps) + 1,):
        raise ValueError(f"grid must hold num_steps + 1 = {int(num_steps) + 1} values, got shape {np.shape(grid)}")
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
                        jnp.asarray(start, jnp.float32), None if grid is None else jnp.asarray(grid, jnp.float32),
                        num_steps=int(num_steps), solver=solver)
