"""A sweep's results file read back, and what is measured from it beside the laws: the best loss at
a held-out budget, the noise of repeated points, and where the best learning rate sits per width.

Pure numpy, no JAX (like :mod:`sora_jax.sweeps.fit`). Rows are those ``sora-jax sweep run`` appends
to ``<workdir>/results.jsonl`` (:func:`sora_jax.sweeps.commands.run_point`): one per finished or
failed point; a point that failed and later finished has both rows, and the last row of a name wins.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sora_jax.sweeps.fit import SweepPoint, fit_isoflop_budget, json_lines

__all__ = ["fit_rows", "holdout_measurement", "lr_transfer", "read_rows", "repeat_noise"]


def read_rows(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The last row of every point name in a JSON-lines results file, in first-seen order.

    Raises:
      FileNotFoundError: no results file (no point has run).
      ValueError: a line that is not a JSON object with a ``name`` (the message names the line).
    """
    rows: dict[str, dict[str, Any]] = {}
    for lineno, row in json_lines(path):
        if "name" not in row:
            raise ValueError(f"{path}:{lineno}: a row without a name")
        rows[str(row["name"])] = row
    return rows


def _finished(row: Mapping[str, Any]) -> bool:
    loss = row.get("loss")
    return (row.get("status", "finished") == "finished" and isinstance(loss, (int, float))
            and not isinstance(loss, bool) and math.isfinite(loss))


def fit_rows(rows: Mapping[str, Mapping[str, Any]], *, holdout: bool = False) -> list[dict[str, Any]]:
    """Finished IsoFLOP rows (kind "isoflop"; rows written before kinds existed count as such) of the
    fit budgets (``holdout`` False) or of the held-out budgets (True)."""
    return [dict(r) for r in rows.values() if _finished(r) and r.get("kind", "isoflop") == "isoflop"
            and bool(r.get("holdout", False)) == holdout]


def holdout_measurement(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The measured best loss at one held-out budget from its points.

    With 3 or more sizes whose IsoFLOP parabola has an interior minimum, the measured best loss is
    the parabola's value at its vertex, as the fit budgets' minima are measured (so prediction and
    measurement are read the same way); otherwise the lowest observed loss, flagged by ``method``.

    Args:
      rows: finished rows of one held-out budget.
    Returns:
      ``{budget, loss, method ("isoflop_vertex" | "lowest_point"), lowest_point_loss, lowest_point,
      n_opt (None for "lowest_point"), names, why_not_vertex (None or the refusal)}``.
    Raises:
      ValueError: no rows, or rows of more than one budget.
    """
    if not rows:
        raise ValueError("no finished point at the held-out budget")
    budgets = {float(r["budget"]) for r in rows}
    if len(budgets) != 1:
        raise ValueError(f"held-out rows of several budgets: {sorted(budgets)}")
    budget = budgets.pop()
    lowest = min(rows, key=lambda r: float(r["loss"]))
    out = {"budget": budget, "lowest_point_loss": float(lowest["loss"]), "lowest_point": lowest["name"],
           "names": [r["name"] for r in rows], "why_not_vertex": None}
    try:
        vertex = fit_isoflop_budget(budget, [SweepPoint.from_mapping(r) for r in rows])
        out.update(loss=vertex["loss_opt"], method="isoflop_vertex", n_opt=vertex["n_opt"], coeffs=vertex["coeffs"])
    except ValueError as e:
        out.update(loss=float(lowest["loss"]), method="lowest_point", n_opt=None, why_not_vertex=str(e))
    return out


def repeat_noise(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The spread of a point's loss over seeds: every IsoFLOP point with finished repeats
    (kind "repeat", named ``<point>-s<seed>``) gives the relative standard deviation (ddof 1) of its
    losses, the original's included.

    Returns:
      ``{"points": {name: {"losses": [...], "rel_std": float}}, "rel_std_mean": float or None}``.
    """
    groups: dict[str, list[float]] = {}
    for name, r in rows.items():
        if r.get("kind") == "repeat" and _finished(r):
            base = name.rsplit("-s", 1)[0]
            if base in rows and _finished(rows[base]):
                groups.setdefault(base, [float(rows[base]["loss"])]).append(float(r["loss"]))
    points = {name: {"losses": losses, "rel_std": float(np.std(losses, ddof=1) / np.mean(losses))}
              for name, losses in groups.items()}
    mean = float(np.mean([p["rel_std"] for p in points.values()])) if points else None
    return {"points": points, "rel_std_mean": mean}


def lr_transfer(rows: Mapping[str, Mapping[str, Any]], parameterization: str,
                learning_rates: Sequence[float]) -> dict[str, Any]:
    """Where the best learning rate sits per width in a learning-rate transfer grid.

    The best rate of a width is the grid's lowest-loss rate; ``refined`` is the vertex of a parabola
    in log2(rate) through it and its two neighbours (the grid's end rate where it is at an end).
    The shift is counted in grid steps from the smallest width to the largest: ``shift`` =
    |index(best at the largest width) - index(best at the smallest)|; ``shift_signed`` keeps the
    direction (negative: the best rate falls with width, as SP's does); ``shift_refined`` is the
    same on the refined rates, in grid steps of the grid's (geometric) spacing.

    Args:
      rows: the sweep's rows (kind "lr_transfer" of ``parameterization`` are used).
      parameterization: "sp" or "mup".
      learning_rates: the grid, ascending and geometric.
    Returns:
      ``{"lr_best_by_width": {width: rate}, "lr_refined_by_width": {width: rate},
      "loss_by_width": {width: {rate: loss}}, "at_grid_end": [widths whose best is an end rate],
      "shift", "shift_signed", "shift_refined", "missing": [names not run], "diverged": [names
      that failed or ended non-finite: scored +inf, the worst of their width]}``; the shifts are
      None with fewer than 2 complete widths.
    """
    grid = sorted(float(v) for v in learning_rates)
    step = math.log2(grid[1] / grid[0]) if len(grid) > 1 else 1.0
    table: dict[int, dict[float, float]] = {}
    missing, diverged = [], []
    for name, r in rows.items():
        if r.get("kind") != "lr_transfer" or r.get("parameterization", "sp") != parameterization:
            continue
        if not any(math.isclose(float(r["learning_rate"]), g, rel_tol=1e-9) for g in grid):
            continue  # a rate outside this grid (an earlier plan's)
        if _finished(r):
            loss = float(r["loss"])
        elif r.get("status") == "failed" or r.get("loss") is not None:
            # a rate that failed or ended non-finite is the worst of its width (in a learning-rate
            # grid that is a diverged run), so the width keeps a complete grid
            loss = math.inf
            diverged.append(name)
        else:
            missing.append(name)
            continue
        table.setdefault(int(r["hidden_size"]), {})[float(r["learning_rate"])] = loss
    best, refined, at_end = {}, {}, []
    for width in sorted(table):
        losses = table[width]
        rates = [g for g in grid if any(math.isclose(g, k, rel_tol=1e-9) for k in losses)]
        if len(rates) < len(grid):  # an incomplete width: its best would not be the grid's
            continue
        ys = [next(v for k, v in losses.items() if math.isclose(k, g, rel_tol=1e-9)) for g in grid]
        i = int(np.argmin(ys))
        best[width] = grid[i]
        if i in (0, len(grid) - 1):
            at_end.append(width)
            refined[width] = grid[i]
        elif not all(map(math.isfinite, ys[i - 1 : i + 2])):  # a diverged neighbour: no parabola
            refined[width] = grid[i]
        else:
            x = np.log2(grid[i - 1 : i + 2])
            c2, c1, _ = np.polyfit(x, ys[i - 1 : i + 2], 2)
            refined[width] = float(2.0 ** (-c1 / (2 * c2))) if c2 > 0 else grid[i]
    out = {"lr_best_by_width": best, "lr_refined_by_width": refined,
           "loss_by_width": {w: dict(sorted(v.items())) for w, v in sorted(table.items())},
           "at_grid_end": at_end, "missing": missing, "diverged": diverged, "shift": None, "shift_signed": None,
           "shift_refined": None}
    if len(best) >= 2:
        lo, hi = min(best), max(best)
        signed = grid.index(best[hi]) - grid.index(best[lo])
        out.update(shift=abs(signed), shift_signed=signed,
                   shift_refined=float(math.log2(refined[hi] / refined[lo]) / step))
    return out
