"""Fit scaling laws to a finished compute sweep: IsoFLOP minima, the parametric loss, the frontier.

Pure numpy + scipy, no JAX: the fitter runs anywhere a results file can be read.

Inputs are finished sweep points (:class:`SweepPoint`): one trained model each, at a training-FLOP
budget C, with N counted parameters, D training tokens, its actual training FLOPs and a held-out
loss. Three fits, after Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models",
arXiv 2203.15556) and the refit of Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
attempt", arXiv 2404.10102):

1. **IsoFLOP (approach 2)**, :func:`fit_isoflop`: per budget, loss as a quadratic in ln N fitted
   by least squares; its vertex gives N*(C), L*(C), and D*(C) (rule below). Then the power laws
   N*(C) = A C^a and D*(C) = B C^b by least squares on (ln C, ln N*) and (ln C, ln D*)
   (Hoffmann et al. Sec. 3.2, Table 2). With the parametric form below and C = k N D the exact
   exponents are a = beta / (alpha + beta), b = alpha / (alpha + beta) (their eq. 4), e.g.
   0.452 and 0.548 for the published alpha 0.34, beta 0.28.
2. **Parametric (approach 3)**, :func:`fit_parametric`: L(N, D) = E + A / N^alpha + B / D^beta
   (Hoffmann et al. eq. 2), fitted by minimising the Huber loss (delta 1e-3) of the log-loss
   residuals with the log-sum-exp parametrisation (their eq. 3 and App. D.2; Besiroglu et al. Sec. 2)
   ``log L_hat = LSE(a - alpha ln N, b - beta ln D, e)``, A = exp(a), B = exp(b), E = exp(e),
   with scipy's L-BFGS-B from a grid of starting points; the lowest final objective wins.
3. **Compute frontier**, :func:`fit_frontier`: L*(C) - E = A_f C^(-gamma) by least squares in
   log-log space over the per-budget minima, with E taken from the parametric fit. In the
   parametric form both loss terms at the optimum scale as C^(-alpha beta / (alpha + beta)), so
   L*(C) - E is an exact power law there and gamma ~ 0.154 for the published constants.

Bootstrap intervals (:func:`fit_laws`) resample points with replacement within each budget and
refit; resamples whose fit is refused are counted and skipped (by the part that refused). They are
percentile intervals: on synthetic 24-point sweeps (4 budgets x 6 sizes, 0.5% noise) those of the
IsoFLOP exponents held the true exponents 10 times in 10, but those of the parametric alpha, beta
and E only 9, 7 and 8 times in 10 (the Huber fit with delta 1e-3 is nearly least-absolute-deviations,
whose bootstrap is lumpy and narrow on few points): read them as a lower bound on the uncertainty.

Rules chosen here (each documented where it is applied):

- **Interior minimum**: a budget's parabola must open upward (c2 > 0) and its vertex must lie within
  [min ln N, max ln N] of that budget's points; otherwise the budget is refused. That the smallest
  *observed* loss sits at an end of the grid is reported (``argmin_at_edge``) but not refused: with
  noise a well-bracketed vertex can have its lowest sample at the edge.
- **D* rule**: D*(C) is read off the budget's own (N, D) pairs: a least-squares line of ln D on
  ln N, evaluated at ln N*. Our FLOP counter counts attention, so FLOPs per parameter-token vary
  with N and a single ``C / (k N*)`` would be off; with a constant k the line is exact
  (ln D = ln(C/k) - ln N) and gives the same answer.
- **k** (parametric allocation only): the median over all points of flops / (params * tokens);
  6 for the 6ND rule, larger when attention is counted.
- **Frontier E**: the parametric E (refused when E >= the smallest L*).

Units: budget and flops in FLOPs, params in parameters, tokens in tokens, loss as reported (the
fits take logs of N, D, C and L, which must all be positive). Logarithms are natural throughout;
quadratic coefficients are for ln N.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.optimize

import sora_jax

try:  # scikit-learn's dependency, so normally present; the fit only runs slower without it
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = [
    "SweepPoint",
    "load_points",
    "json_lines",
    "fit_isoflop_budget",
    "fit_isoflop",
    "fit_parametric",
    "parametric_allocation",
    "fit_frontier",
    "fit_laws",
    "predict",
    "write_laws",
    "read_laws",
    "HUBER_DELTA",
    "MIN_POINTS_PER_BUDGET",
    "FLOPS_TOLERANCE",
]

HUBER_DELTA = 1e-3  # Hoffmann et al. App. D.2 and Besiroglu et al.: Huber delta on log-loss residuals
MIN_POINTS_PER_BUDGET = 3  # a quadratic has 3 coefficients
FLOPS_TOLERANCE = 0.01  # a point's actual FLOPs must be within 1% of its budget to sit on its IsoFLOP curve

# Starting-point grid for the parametric fit, after Hoffmann et al. (alpha, beta in 0..2, e in -1..1.5,
# a, b in 0..25). alpha = beta = 0 is left out (the term is then a constant, indistinguishable from E).
# Every grid point is scored (vectorised, cheap); L-BFGS-B runs from the best n_starts only, which keeps
# a fit well under a second where running all 7776 starts, as the papers do, would take minutes.
_GRID_ALPHA = (0.1, 0.3, 0.6, 1.0, 1.5, 2.0)
_GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
_GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# L-BFGS-B box: exponents positive and at most 5 (a term then falls 32x per doubling of N or D, far
# past any published fit); a, b, e free.
_BOUNDS = [(None, None), (None, None), (None, None), (1e-4, 5.0), (1e-4, 5.0)]


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One finished sweep point (one trained model).

    Attributes:
      name: the point's name, e.g. ``"C3e13-N1.2M"``.
      budget: training FLOPs C of the point's budget (float, FLOPs).
      params: N, counted parameters; the fitter uses what it is given (pass non-embedding counts
        if that is the convention of the sweep).
      tokens: D, training tokens.
      flops: the point's actual training FLOPs; within ``FLOPS_TOLERANCE`` (1%) of ``budget``.
      loss: held-out loss (positive: the fits take its log).
    """

    name: str
    budget: float
    params: float
    tokens: float
    flops: float
    loss: float

    def __post_init__(self):
        for field in ("budget", "params", "tokens", "flops", "loss"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"point {self.name!r}: {field} must be a finite positive number, got {value!r}")
            object.__setattr__(self, field, float(value))

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> "SweepPoint":
        """Build from a mapping with at least the six fields (extra keys are ignored).

        Raises:
          ValueError: a field is missing or not a finite positive number.
        """
        missing = [k for k in ("name", "budget", "params", "tokens", "flops", "loss") if k not in row]
        if missing:
            raise ValueError(f"point {row.get('name', '?')!r}: missing {', '.join(missing)}")
        return cls(name=str(row["name"]), budget=row["budget"], params=row["params"], tokens=row["tokens"],
                   flops=row["flops"], loss=row["loss"])


def _as_points(points: Iterable[SweepPoint | Mapping[str, Any]]) -> list[SweepPoint]:
    return [p if isinstance(p, SweepPoint) else SweepPoint.from_mapping(p) for p in points]


def load_points(path: str | os.PathLike) -> list[SweepPoint]:
    """Read finished sweep points from a JSON-lines results file (one JSON object a line).

    Rows whose ``status`` is present and not ``"finished"`` are skipped, and so are rows with a
    missing, null or non-finite ``loss`` (a diverged or unfinished run). A row without ``status``
    counts as finished. Blank lines are ignored.

    Returns:
      the kept points, in file order.
    Raises:
      ValueError: a line is not a JSON object, or a kept row lacks a field (message names the line).
    """
    out = []
    for lineno, row in json_lines(path):
        if row.get("status", "finished") != "finished":
            continue
        loss = row.get("loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
            continue
        try:
            out.append(SweepPoint.from_mapping(row))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON-lines file.

    Raises:
      ValueError: a line that is not a JSON object (the message names the line).
    """
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            yield lineno, row


def _budget_label(budget: float) -> str:
    return f"budget {budget:.3g}"


def _group_by_budget(points: Sequence[SweepPoint]) -> dict[float, list[SweepPoint]]:
    """Points grouped by their exact ``budget`` value (budgets come from one config, so equal
    budgets are equal floats; JSON round-trips floats exactly), budgets ascending."""
    groups: dict[float, list[SweepPoint]] = {}
    for p in points:
        if abs(p.flops / p.budget - 1.0) > FLOPS_TOLERANCE:
            raise ValueError(f"point {p.name!r}: flops {p.flops:.4g} are not within {FLOPS_TOLERANCE:.0%} of its "
                             f"{_budget_label(p.budget)}")
        groups.setdefault(p.budget, []).append(p)
    return dict(sorted(groups.items()))


def fit_isoflop_budget(budget: float, points: Sequence[SweepPoint]) -> dict[str, Any]:
    """Approach 2 at one budget: the vertex of a least-squares quadratic of loss in ln N.

    Hoffmann et al. 2022 Sec. 3.2: "we fit a parabola to each IsoFLOPs curve to directly estimate
    at what model size we achieve the minimum loss".

    Args:
      budget: C, FLOPs.
      points: that budget's points (at least 3, with at least 3 distinct sizes).
    Returns:
      ``{budget, n_points, n_opt, d_opt, loss_opt, coeffs, argmin_at_edge, tokens_slope, names}``:
      ``coeffs`` = [c2, c1, c0] of loss = c2 (ln N)^2 + c1 ln N + c0; ``loss_opt`` is the parabola's
      value at its vertex N* = ``n_opt``; ``d_opt`` is D* from the log-log line of D on N
      (module docstring, "D* rule"); ``tokens_slope`` is that line's slope (-1 for C = k N D with a
      constant k); ``argmin_at_edge`` says the lowest observed loss is at the smallest or largest N.
    Raises:
      ValueError naming the budget: fewer than 3 points or 3 distinct sizes; the parabola opens
      downward (or is flat); its vertex lies outside the budget's range of N.
    """
    label = _budget_label(budget)
    if len(points) < MIN_POINTS_PER_BUDGET:
        raise ValueError(f"{label}: {len(points)} points, need at least {MIN_POINTS_PER_BUDGET}")
    x = np.log([p.params for p in points])
    if len(np.unique(x)) < MIN_POINTS_PER_BUDGET:
        raise ValueError(f"{label}: {len(np.unique(x))} distinct sizes, need at least {MIN_POINTS_PER_BUDGET}")
    y = np.array([p.loss for p in points])
    logd = np.log([p.tokens for p in points])
    # Centre ln N before the solve: (ln N)^2 ~ 300 next to 1 conditions badly; convert back after.
    m = x.mean()
    u = x - m
    q2, q1, q0 = np.linalg.lstsq(np.stack([u * u, u, np.ones_like(u)], 1), y, rcond=None)[0]
    if not q2 > 0:
        raise ValueError(f"{label}: no interior minimum (the fitted parabola in ln N opens downward, "
                         f"c2 = {q2:.3g})")
    u_star = -q1 / (2 * q2)
    if not (u.min() <= u_star <= u.max()):
        side = "below the smallest" if u_star < u.min() else "above the largest"
        raise ValueError(f"{label}: no interior minimum (the parabola's minimum N = {math.exp(m + u_star):.3g} "
                         f"lies {side} size of the grid, {math.exp(x.min()):.3g}..{math.exp(x.max()):.3g})")
    x_star = m + u_star
    loss_opt = q0 - q1 * q1 / (4 * q2)
    c2, c1, c0 = q2, q1 - 2 * q2 * m, q2 * m * m - q1 * m + q0
    slope, intercept = np.polyfit(x, logd, 1)
    order = np.argsort(x, kind="stable")
    lowest = int(np.argmin(y[order]))
    return {
        "budget": float(budget),
        "n_points": len(points),
        "n_opt": float(math.exp(x_star)),
        "d_opt": float(math.exp(intercept + slope * x_star)),
        "loss_opt": float(loss_opt),
        "coeffs": [float(c2), float(c1), float(c0)],
        "argmin_at_edge": bool(lowest in (0, len(points) - 1)),
        "tokens_slope": float(slope),
        "names": [p.name for p in points],
    }


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of ln y = ln coef + exponent ln c; returns (exponent, coef)."""
    exponent, log_coef = np.polyfit(np.log(c), np.log(y), 1)
    return float(exponent), float(math.exp(log_coef))


def fit_isoflop(points: Sequence[SweepPoint | Mapping[str, Any]]) -> dict[str, Any]:
    """Approach 2 over all budgets: per-budget minima, then N*(C) = A C^a and D*(C) = B C^b.

    Power laws by least squares in log-log space (Hoffmann et al. 2022 Sec. 3.2, Table 2 reports
    a = 0.49, b = 0.51 for their approach 2).

    Returns:
      ``{per_budget: [fit_isoflop_budget(...) per budget, ascending], n_opt_exponent (a),
      n_opt_coef (A, parameters / FLOPs^a), d_opt_exponent (b), d_opt_coef (B)}``.
    Raises:
      ValueError: fewer than 2 budgets, or any budget refused by :func:`fit_isoflop_budget`.
    """
    groups = _group_by_budget(_as_points(points))
    if len(groups) < 2:
        raise ValueError(f"{len(groups)} budget(s), need at least 2 to fit a power law across budgets")
    per_budget = [fit_isoflop_budget(c, pts) for c, pts in groups.items()]
    c = np.array([r["budget"] for r in per_budget])
    a, coef_a = _power_law(c, np.array([r["n_opt"] for r in per_budget]))
    b, coef_b = _power_law(c, np.array([r["d_opt"] for r in per_budget]))
    return {"per_budget": per_budget, "n_opt_exponent": a, "n_opt_coef": coef_a,
            "d_opt_exponent": b, "d_opt_coef": coef_b}


def _huber_objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of log-loss residuals, divided by delta (so it reads as a mean |residual| and
    L-BFGS-B's tolerances act on O(1e-3..1) numbers), and its gradient. theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t1 = a - alpha * logn
    t2 = b - beta * logd
    top = np.maximum(np.maximum(t1, t2), e)  # shift before exp: no overflow for any start
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    s = w1 + w2 + w3
    r = top + np.log(s) - logl  # log L_hat - log L
    absr = np.abs(r)
    h = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    g = np.clip(r, -delta, delta) / (delta * len(r) * s)  # d objective / d r, times the softmax's 1 / s
    grad = np.array([g @ w1, g @ w2, g @ w3, -(g * w1) @ logn, -(g * w2) @ logd])
    return float(h.mean() / delta), grad


# Every grid start, (S, 5) = (7776, 5): a, b, e, alpha, beta.
_GRID = np.array(np.meshgrid(_GRID_AB, _GRID_AB, _GRID_E, _GRID_ALPHA, _GRID_ALPHA, indexing="ij")).reshape(5, -1).T


def _grid_objectives(logn, logd, logl, delta) -> tuple[np.ndarray, np.ndarray]:
    """Every grid start (S, 5) and its objective (S,), vectorised over starts and points."""
    grid = _GRID
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    t1 = a - alpha * logn
    t2 = b - beta * logd
    t3 = np.broadcast_to(e, t1.shape)
    r = np.logaddexp(np.logaddexp(t1, t2), t3) - logl  # (S, P)
    absr = np.abs(r)
    h = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    return grid, h.mean(1) / delta


def fit_parametric(params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, *, delta: float = HUBER_DELTA,
                   n_starts: int = 32, extra_starts: Sequence[Sequence[float]] = ()) -> dict[str, Any]:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta by Huber-loss minimisation in log space.

    Minimises mean_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i) (Hoffmann et
    al. 2022 eq. 3, with the refit protocol of Besiroglu et al. 2024: L-BFGS-B, tight tolerances,
    the best of many starts). The starting grid follows Hoffmann et al.'s (alpha, beta, e, a, b);
    every grid point is scored and L-BFGS-B runs from the best ``n_starts`` plus ``extra_starts``
    (e.g. a previous optimum, for bootstrap refits).

    Args:
      params, tokens, loss: (P,) arrays of N, D and loss, all positive.
      delta: Huber delta on log-loss residuals (1e-3 in both papers).
      n_starts: grid starts to optimise from.
      extra_starts: further (a, b, e, alpha, beta) starts.
    Returns:
      ``{E, A, B, alpha, beta, theta: [a, b, e, alpha, beta], objective (mean Huber loss per point,
      not divided by delta), huber_delta, n_starts}``.
    Raises:
      ValueError: fewer than 5 points (5 unknowns) or no start converged to a finite objective.
    """
    logn, logd, logl = np.log(params), np.log(tokens), np.log(loss)
    if len(logl) < 5:
        raise ValueError(f"parametric fit: {len(logl)} points, need at least 5 for 5 constants")
    starts = [np.asarray(s, float) for s in extra_starts]
    if n_starts > 0:
        grid, scores = _grid_objectives(logn, logd, logl, delta)
        starts = list(grid[np.argsort(scores, kind="stable")[:n_starts]]) + starts
    if not starts:
        raise ValueError("parametric fit: no starting point (n_starts = 0 and no extra_starts)")
    best = None
    for x0 in starts:
        res = scipy.optimize.minimize(_huber_objective, x0, args=(logn, logd, logl, delta), jac=True,
                                      method="L-BFGS-B", bounds=_BOUNDS,
                                      options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise ValueError("parametric fit: no start reached a finite objective")
    a, b, e, alpha, beta = (float(v) for v in best.x)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
            "theta": [a, b, e, alpha, beta], "objective": float(best.fun) * delta, "huber_delta": delta,
            "n_starts": len(starts)}


def parametric_allocation(fit: Mapping[str, float], budget: float | np.ndarray, k: float) -> dict[str, Any]:
    """Compute-optimal N, D and loss of the parametric law at budget C under C = k N D.

    Minimising A N^-alpha + B D^-beta subject to D = C / (k N) gives (Hoffmann et al. eq. 4 with
    6 replaced by k):

        N_opt(C) = G (C / k)^(beta / (alpha + beta)),   D_opt(C) = G^-1 (C / k)^(alpha / (alpha + beta)),
        G = (alpha A / (beta B))^(1 / (alpha + beta)),

    and L_opt = E + A N_opt^-alpha + B D_opt^-beta.

    Args:
      fit: a :func:`fit_parametric` result (E, A, B, alpha, beta).
      budget: C in FLOPs (scalar or array).
      k: FLOPs per parameter per token (6 for the 6ND rule).
    Returns:
      ``{n_opt, d_opt, loss}`` (floats for a scalar budget).
    """
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    ck = np.asarray(budget, float) / k
    n = g * ck ** (beta / (alpha + beta))
    d = ck ** (alpha / (alpha + beta)) / g
    loss = fit["E"] + fit["A"] * n ** -alpha + fit["B"] * d ** -beta
    as_out = float if np.ndim(budget) == 0 else np.asarray
    return {"n_opt": as_out(n), "d_opt": as_out(d), "loss": as_out(loss)}


def fit_frontier(budgets: np.ndarray, losses: np.ndarray, e: float) -> dict[str, float]:
    """Compute frontier L*(C) = E + A_f C^(-gamma), by least squares of ln(L* - E) on ln C.

    E is given (the parametric fit's): with L(N, D) = E + A/N^alpha + B/D^beta, both terms at the
    compute optimum scale as C^(-alpha beta / (alpha + beta)), so L* - E is an exact power law.

    Args:
      budgets: (K,) budgets C, FLOPs, K >= 2.
      losses: (K,) per-budget minimum losses L*(C).
      e: the irreducible loss E.
    Returns:
      ``{E, A, gamma}``.
    Raises:
      ValueError: fewer than 2 budgets, or E not below every L* (the log is then undefined).
    """
    budgets, losses = np.asarray(budgets, float), np.asarray(losses, float)
    if len(budgets) < 2:
        raise ValueError(f"frontier: {len(budgets)} budget(s), need at least 2")
    if not np.all(losses > e):
        worst = budgets[np.argmin(losses)]
        raise ValueError(f"frontier: E = {e:.4g} is not below L* = {losses.min():.4g} at {_budget_label(worst)}")
    slope, coef = _power_law(budgets, losses - e)
    return {"E": float(e), "A": coef, "gamma": -slope}


_SECTIONS = ("isoflop", "parametric", "frontier")


def _fit_parts(points: Sequence[SweepPoint], *, n_starts: int, extra_starts=(),
               strict: bool = False) -> tuple[dict, dict[str, str]]:
    """The three fits, each on its own, so that a bootstrap resample whose IsoFLOP fit refuses still
    counts for the parametric intervals. Returns (fit by section, refusal message by section);
    ``strict`` raises the first refusal instead (the full-data fit: no point fitting the rest)."""
    fits, refused = {}, {}
    try:
        fits["isoflop"] = fit_isoflop(points)
    except ValueError as e:
        if strict:
            raise
        refused["isoflop"] = str(e)
    try:
        par = fit_parametric(np.array([p.params for p in points]), np.array([p.tokens for p in points]),
                             np.array([p.loss for p in points]), n_starts=n_starts, extra_starts=extra_starts)
        alpha, beta = par["alpha"], par["beta"]
        par["flops_per_param_token"] = float(np.median([p.flops / (p.params * p.tokens) for p in points]))
        par["n_opt_exponent"] = beta / (alpha + beta)  # Hoffmann et al. eq. 4
        par["d_opt_exponent"] = alpha / (alpha + beta)
        par["n_opt_coef"] = (alpha * par["A"] / (beta * par["B"])) ** (1 / (alpha + beta))  # G
        fits["parametric"] = par
    except ValueError as e:
        refused["parametric"] = str(e)
    if "isoflop" in fits and "parametric" in fits:
        per_budget = fits["isoflop"]["per_budget"]
        try:
            front = fit_frontier(np.array([r["budget"] for r in per_budget]),
                                 np.array([r["loss_opt"] for r in per_budget]), fits["parametric"]["E"])
            front["gamma_parametric"] = alpha * beta / (alpha + beta)
            front["E_source"] = "parametric"
            fits["frontier"] = front
        except ValueError as e:
            refused["frontier"] = str(e)
    return fits, refused


# (section, key) of every constant that gets a bootstrap interval.
_BOOT_KEYS = (
    [("isoflop", k) for k in ("n_opt_exponent", "n_opt_coef", "d_opt_exponent", "d_opt_coef")]
    + [("parametric", k) for k in ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent",
                                   "n_opt_coef")]
    + [("frontier", k) for k in ("E", "A", "gamma", "gamma_parametric")]
)


def code_version() -> dict[str, str | None]:
    """``{"version": sora_jax.__version__, "commit": git HEAD of the package's repository or None}``."""
    commit = None
    try:
        out = subprocess.run(["git", "-C", str(pathlib.Path(sora_jax.__file__).resolve().parent), "rev-parse",
                              "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        commit = out.stdout.strip() or None
    except Exception:  # no git, not a checkout (an installed wheel), a timeout: provenance is best effort
        commit = None
    return {"version": sora_jax.__version__, "commit": commit}


def fit_laws(points: Iterable[SweepPoint | Mapping[str, Any]], *, n_boot: int = 200, seed: int = 0,
             n_starts: int = 32, boot_starts: int = 1) -> dict[str, Any]:
    """Fit all three laws with bootstrap intervals; the result is JSON-serialisable.

    Bootstrap: ``n_boot`` resamples, each drawing every budget's points with replacement (same count
    per budget; seeded ``numpy.random.default_rng(seed)``), refit; intervals are the 2.5 and 97.5
    percentiles over the resamples that fit. The three fits are kept apart: a resample whose IsoFLOP
    fit refuses (a budget left with fewer than 3 distinct sizes or no interior minimum, which happens
    often with 6 sizes a budget) still counts for the parametric intervals; the frontier's need both.
    A resample with any refusal is counted in ``boot_failures`` (``boot_failures_by_part`` and
    ``boot_failure_reasons`` say which and why) and skipped by the parts that refused. Parametric
    refits start from the full-data optimum plus the best ``boot_starts`` grid points (on 10 synthetic
    sweeps, 16 grid starts gave the same intervals to 4 digits).

    Args:
      points: finished points (:class:`SweepPoint` or mappings with its fields).
      n_boot: bootstrap resamples (0: no intervals, every ``*_ci`` is None).
      seed: bootstrap seed.
      n_starts: L-BFGS-B starts of the full-data parametric fit.
      boot_starts: grid starts of each bootstrap parametric refit.
    Returns:
      ``{"isoflop": {per_budget: [...], n_opt_exponent, n_opt_exponent_ci, n_opt_coef, ..._ci,
      d_opt_exponent, ..., d_opt_coef, ...}, "parametric": {E, A, B, alpha, beta, n_opt_exponent,
      d_opt_exponent, n_opt_coef (G), each with "_ci", theta, objective, huber_delta, n_starts,
      flops_per_param_token}, "frontier": {E, A, gamma, gamma_parametric, each with "_ci",
      E_source}, "points_used": [names], "n_boot", "boot_failures", "boot_failures_by_part":
      {section: count}, "boot_failure_reasons": {message head: count}, "seed",
      "code_version": {version, commit}}``; ``*_ci`` = [lo, hi] or None (no resample fitted).
    Raises:
      ValueError: the full-data fit refuses (see :func:`fit_isoflop_budget`, :func:`fit_isoflop`,
      :func:`fit_frontier`), or a point's flops miss its budget by more than 1%.
    """
    # L-BFGS-B's BLAS calls act on 5-vectors: a multi-threaded BLAS only adds synchronisation,
    # which made the fits ~3x slower on a 2-core machine.
    limit = threadpool_limits(1, user_api="blas") if threadpool_limits is not None else contextlib.nullcontext()
    with limit:
        return _fit_laws(_as_points(points), n_boot=n_boot, seed=seed, n_starts=n_starts, boot_starts=boot_starts)


def _fit_laws(pts: list[SweepPoint], *, n_boot: int, seed: int, n_starts: int, boot_starts: int) -> dict[str, Any]:
    laws, refused = _fit_parts(pts, n_starts=n_starts, strict=True)
    for section in _SECTIONS:  # the full-data fit must succeed in every part
        if section in refused:
            raise ValueError(refused[section])
    groups = list(_group_by_budget(pts).values())
    rng = np.random.default_rng(seed)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in _BOOT_KEYS}
    failed = 0
    by_part = {section: 0 for section in _SECTIONS}
    reasons: dict[str, int] = {}
    for _ in range(n_boot):
        resample = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        fits, refused = _fit_parts(resample, n_starts=boot_starts, extra_starts=[laws["parametric"]["theta"]])
        failed += bool(refused)
        for section, message in refused.items():
            by_part[section] += 1
            reason = message.split(" (")[0]  # group by the message's head, not its numbers
            reasons[reason] = reasons.get(reason, 0) + 1
        for section, key in _BOOT_KEYS:
            if section in fits:
                samples[(section, key)].append(fits[section][key])
    for section, key in _BOOT_KEYS:
        vals = samples[(section, key)]
        laws[section][f"{key}_ci"] = [float(v) for v in np.percentile(vals, [2.5, 97.5])] if vals else None
    laws["points_used"] = [p.name for p in pts]
    laws["n_boot"] = int(n_boot)
    laws["boot_failures"] = int(failed)
    laws["boot_failures_by_part"] = by_part
    laws["boot_failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    laws["seed"] = int(seed)
    laws["code_version"] = code_version()
    return laws


def predict(laws: Mapping[str, Any], budget: float) -> dict[str, Any]:
    """Predicted best loss, N* and D* at a (new) budget, from both approaches.

    ``"isoflop"``: N* = A C^a and D* = B C^b (the IsoFLOP power laws), loss from the frontier
    E + A_f C^-gamma. ``"parametric"``: :func:`parametric_allocation` with the fitted k.

    Args:
      laws: a :func:`fit_laws` result (or :func:`read_laws` of one).
      budget: C, training FLOPs.
    Returns:
      ``{"budget": C, "isoflop": {n_opt, d_opt, loss}, "parametric": {n_opt, d_opt, loss}}``.
    Raises:
      ValueError: budget not a finite positive number.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite positive number of FLOPs, got {budget!r}")
    iso, front, par = laws["isoflop"], laws["frontier"], laws["parametric"]
    return {
        "budget": float(budget),
        "isoflop": {"n_opt": iso["n_opt_coef"] * budget ** iso["n_opt_exponent"],
                    "d_opt": iso["d_opt_coef"] * budget ** iso["d_opt_exponent"],
                    "loss": front["E"] + front["A"] * budget ** -front["gamma"]},
        "parametric": parametric_allocation(par, budget, par["flops_per_param_token"]),
    }


def write_laws(path: str | os.PathLike, laws: Mapping[str, Any]) -> None:
    """Write fitted laws as indented JSON, atomically (a temporary file renamed into place).

    Raises:
      TypeError: a value is not JSON-serialisable.
      ValueError: a value is not finite (NaN / inf are not JSON).
    """
    text = json.dumps(laws, indent=2, allow_nan=False) + "\n"
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def read_laws(path: str | os.PathLike) -> dict[str, Any]:
    """Read laws written by :func:`write_laws`."""
    with open(path) as f:
        return json.load(f)
