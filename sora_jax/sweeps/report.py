"""``sora-jax sweep report``: a finished sweep's plots, its results table and its summary JSON.

Written into the sweep's work folder:

  summary.json           the keys below (issue 19's names), for tools
  report/report.md       the grid as a table (size x budget: held-out loss, linked to the point's
                         run folder; "-" where no point finished, "failed" where one failed), the
                         laws with their intervals, the prediction at the held-out budget, the
                         learning-rate transfer table
  report/isoflop.png     loss against N per budget, with each budget's fitted parabola and vertex
  report/frontier.png    the per-budget minima, the fitted frontier L*(C) = E + A C^-gamma carried to
                         the held-out budget, and the measured held-out minimum beside its prediction
  report/allocation.png  N*(C) and D*(C) with their power laws
  report/lr_transfer.png held-out loss against learning rate per width, SP and μP side by side

Summary keys: ``fit_budgets``, ``holdout_budget``, ``points_planned``, ``points_finished``,
``points_failed`` (of the plan's points; ``rows_not_in_plan`` names rows of points a re-plan dropped),
``n_opt_exponent`` / ``d_opt_exponent`` (IsoFLOP, approach 2) with ``_ci``
(bootstrap 95%), ``parametric`` (alpha, beta, E and their intervals), ``predicted_loss_holdout``
(the IsoFLOP frontier's; ``predicted_loss_holdout_parametric`` beside it),
``predicted_n_opt_holdout``, ``measured_loss_holdout`` (:func:`~sora_jax.sweeps.results.holdout_measurement`)
with ``measured_method`` and ``measured_n_opt_holdout``, ``prediction_rel_error`` = |predicted -
measured| / measured (and ``prediction_rel_error_signed``), ``repeat_rel_std`` (the noise of a point
over seeds), ``lr_best_by_width_mup`` / ``_sp``, ``lr_transfer_shift_mup`` / ``_sp`` (grid steps,
:func:`~sora_jax.sweeps.results.lr_transfer`) with ``_refined``, ``seconds`` (the points' summed
wall time; ``seconds_by_kind`` splits it).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from sora_jax.io import write_json
from sora_jax.sweeps.fit import predict
from sora_jax.sweeps.plan import format_budget, format_params
from sora_jax.sweeps.results import fit_rows, holdout_measurement, lr_transfer, repeat_noise

__all__ = ["grid_table", "summarize", "write_report"]


def _finished(row: Mapping[str, Any]) -> bool:
    """The point ran to its end (its loss may still be non-finite: a diverged run is finished)."""
    return row.get("status", "finished") == "finished"


def summarize(sweep: Mapping[str, Any], plan_points: Sequence[Mapping[str, Any]],
              rows: Mapping[str, Mapping[str, Any]], laws: Mapping[str, Any]) -> dict[str, Any]:
    """The summary JSON (module docstring) of a sweep from its plan, rows and fitted laws.

    Raises:
      ValueError: the sweep has no held-out budget, or no finished point at it.
    """
    holdout_budgets = [float(c) for c in sweep["holdout_budgets"]]
    if not holdout_budgets:
        raise ValueError("the sweep has no holdout_budgets: nothing to check the laws against")
    c_h = holdout_budgets[0]
    measured = holdout_measurement([r for r in fit_rows(rows, holdout=True) if float(r["budget"]) == c_h])
    pred = predict(laws, c_h)
    iso, par = laws["isoflop"], laws["parametric"]
    # the plan's points only: rows of points a re-plan dropped (e.g. a learning rate taken out of
    # the grid) stay in results.jsonl but are not this sweep's
    planned = {p["name"] for p in plan_points}
    last = {name: r for name, r in rows.items() if name in planned}
    seconds_by_kind: dict[str, float] = {}
    for r in last.values():
        if _finished(r):
            kind = r.get("kind", "isoflop")
            seconds_by_kind[kind] = seconds_by_kind.get(kind, 0.0) + float(r.get("wall_seconds", 0.0))
    out: dict[str, Any] = {
        "fit_budgets": sorted({float(r["budget"]) for r in fit_rows(rows)}),
        "holdout_budget": c_h,
        "points_planned": len(plan_points),
        "points_finished": sum(_finished(r) for r in last.values()),
        "points_failed": sum(r.get("status") == "failed" for r in last.values()),
        "rows_not_in_plan": sorted(set(rows) - planned),
        "n_opt_exponent": iso["n_opt_exponent"], "n_opt_exponent_ci": iso.get("n_opt_exponent_ci"),
        "d_opt_exponent": iso["d_opt_exponent"], "d_opt_exponent_ci": iso.get("d_opt_exponent_ci"),
        "parametric": {k: par.get(k) for k in ("alpha", "alpha_ci", "beta", "beta_ci", "E", "E_ci",
                                               "n_opt_exponent", "d_opt_exponent")},
        "predicted_loss_holdout": pred["isoflop"]["loss"],
        "predicted_loss_holdout_parametric": pred["parametric"]["loss"],
        "predicted_n_opt_holdout": pred["isoflop"]["n_opt"],
        "measured_loss_holdout": measured["loss"],
        "measured_method": measured["method"],
        "measured_n_opt_holdout": measured["n_opt"],
        "measured_lowest_point_holdout": measured["lowest_point"],
        "prediction_rel_error": abs(pred["isoflop"]["loss"] - measured["loss"]) / measured["loss"],
        "prediction_rel_error_signed": (pred["isoflop"]["loss"] - measured["loss"]) / measured["loss"],
        "prediction_rel_error_parametric": abs(pred["parametric"]["loss"] - measured["loss"]) / measured["loss"],
        "repeat_rel_std": repeat_noise(rows)["rel_std_mean"],
    }
    lt = sweep.get("lr_transfer")
    for param in ("mup", "sp"):
        res = lr_transfer(rows, param, lt["learning_rates"]) if lt else None
        out[f"lr_best_by_width_{param}"] = {str(w): v for w, v in res["lr_best_by_width"].items()} if res else None
        out[f"lr_transfer_shift_{param}"] = res["shift"] if res else None
        out[f"lr_transfer_shift_{param}_signed"] = res["shift_signed"] if res else None
        out[f"lr_transfer_shift_{param}_refined"] = res["shift_refined"] if res else None
        out[f"lr_at_grid_end_{param}"] = res["at_grid_end"] if res else None
    out["seconds"] = round(sum(seconds_by_kind.values()), 1)
    out["seconds_by_kind"] = {k: round(v, 1) for k, v in sorted(seconds_by_kind.items())}
    out["holdout"] = measured
    return out


def grid_table(plan_points: Sequence[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The IsoFLOP grid as a Markdown table: one row per size, one column per budget (held-out ones
    marked); a cell is the held-out loss linked to ``points/<name>``, "failed", or "-"."""
    iso = [p for p in plan_points if p.get("kind", "isoflop") == "isoflop"]
    budgets = sorted({(float(p["budget"]), bool(p["holdout"])) for p in iso})
    sizes = sorted({(int(p["hidden_size"]), int(p["params"])) for p in iso})
    by_cell = {(int(p["hidden_size"]), float(p["budget"])): p["name"] for p in iso}
    head = ["size"] + [f"C={format_budget(c)}{' (held out)' if h else ''}" for c, h in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for width, params in sizes:
        cells = [f"w{width}, N={format_params(params)}"]
        for c, _ in budgets:
            name = by_cell.get((width, c))
            row = rows.get(name) if name else None
            if row is not None and _finished(row):
                cells.append(f"[{float(row['loss']):.4f}](points/{name})")
            elif row is not None and row.get("status") == "failed":
                cells.append(f"failed ([{name}](points/{name}))")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_ci(v: Any, ci: Any) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _plots(folder: str, rows: Mapping[str, Mapping[str, Any]], laws: Mapping[str, Any],
           summary: Mapping[str, Any], lr_rates: Sequence[float] | None) -> list[str]:
    # imported here for import speed: every `sweep run` job imports this module, only report plots
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        written.append(os.path.join(folder, f"{name}.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    iso = laws["isoflop"]
    fit_pts, held = fit_rows(rows), fit_rows(rows, holdout=True)
    budgets = sorted({float(r["budget"]) for r in fit_pts})
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(budgets) + 1))
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for color, per in zip(colors, iso["per_budget"]):
        c = per["budget"]
        pts = sorted((r for r in fit_pts if float(r["budget"]) == c), key=lambda r: r["params"])
        n = np.array([r["params"] for r in pts], float)
        ax.scatter(n, [r["loss"] for r in pts], color=color, label=f"C={format_budget(c)}")
        x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.plot(np.exp(x), np.polyval(per["coeffs"], x), color=color, lw=1)
        ax.scatter([per["n_opt"]], [per["loss_opt"]], color=color, marker="*", s=120, edgecolor="k")
    if held:
        h = summary["holdout"]
        pts = sorted(held, key=lambda r: r["params"])
        n = np.array([r["params"] for r in pts], float)
        ax.scatter(n, [r["loss"] for r in pts], color=colors[-1], marker="s",
                   label=f"C={format_budget(h['budget'])} (held out)")
        if h.get("coeffs"):
            x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
            ax.plot(np.exp(x), np.polyval(h["coeffs"], x), color=colors[-1], lw=1, ls="--")
        ax.scatter([summary["predicted_n_opt_holdout"]], [summary["predicted_loss_holdout"]], color="red",
                   marker="X", s=90, label="predicted (laws of the fit budgets)")
    ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss", title="IsoFLOP curves (stars: vertices)")
    ax.legend(fontsize=7)
    save(fig, "isoflop")

    front = laws["frontier"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cs = np.array([p["budget"] for p in iso["per_budget"]])
    ax.scatter(cs, [p["loss_opt"] for p in iso["per_budget"]], color="k", label="fit budgets' minima")
    c_h = summary["holdout_budget"]
    grid = np.geomspace(cs.min() / 1.5, c_h * 1.5, 100)
    ax.plot(grid, front["E"] + front["A"] * grid ** -front["gamma"], color="C0",
            label=f"L*(C) = {front['E']:.3f} + A C^-{front['gamma']:.3f}")
    ax.scatter([c_h], [summary["predicted_loss_holdout"]], color="red", marker="X", s=90, label="predicted")
    noise = summary.get("repeat_rel_std") or 0.0
    ax.errorbar([c_h], [summary["measured_loss_holdout"]], yerr=[noise * summary["measured_loss_holdout"]],
                color="C1", marker="s", capsize=4, label="measured (bar: repeat noise)")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="best held-out loss", title="Compute frontier")
    ax.legend(fontsize=7)
    save(fig, "frontier")

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for ax, key, label in ((axes[0], "n_opt", "N*(C), parameters"), (axes[1], "d_opt", "D*(C), tokens")):
        ax.scatter(cs, [p[key] for p in iso["per_budget"]], color="k")
        ax.plot(grid, iso[f"{key}_coef"] * grid ** iso[f"{key}_exponent"], color="C0",
                label=f"exponent {_fmt_ci(iso[f'{key}_exponent'], iso.get(f'{key}_exponent_ci'))}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
        ax.legend(fontsize=7)
    save(fig, "allocation")

    if lr_rates:
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
        for ax, param in zip(axes, ("sp", "mup")):
            res = lr_transfer(rows, param, lr_rates)
            for width, losses in res["loss_by_width"].items():
                finite = {k: v for k, v in losses.items() if np.isfinite(v)}  # diverged rates: not drawn
                ax.plot(list(finite), list(finite.values()), marker="o", label=f"width {width}")
                if width in res["lr_best_by_width"]:
                    ax.scatter([res["lr_best_by_width"][width]], [min(finite.values())], marker="*", s=120,
                               color="k", zorder=3)
            ax.set(xscale="log", xlabel="learning rate", title=f"{'μP' if param == 'mup' else 'SP'}: shift "
                   f"{res['shift']} grid steps")
            if ax.get_legend_handles_labels()[0]:  # no rows of this parameterization yet: no legend
                ax.legend(fontsize=7)
        axes[0].set_ylabel("held-out loss")
        save(fig, "lr_transfer")
    return written


def write_report(workdir: str, sweep: Mapping[str, Any], plan_points: Sequence[Mapping[str, Any]],
                 rows: Mapping[str, Mapping[str, Any]], laws: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``summary.json``, ``report/report.md`` and the plots (module docstring) and returns the
    summary.

    Raises:
      ValueError: as :func:`summarize`.
    """
    summary = summarize(sweep, plan_points, rows, laws)
    folder = os.path.join(workdir, "report")
    os.makedirs(folder, exist_ok=True)
    lt = sweep.get("lr_transfer")
    plots = _plots(folder, rows, laws, summary, lt["learning_rates"] if lt else None)
    iso, par = laws["isoflop"], laws["parametric"]
    md = [f"# Sweep {sweep.get('name', '')}: results", "",
          "Held-out loss of every point (fixed noise and timesteps), linked to its run folder.", "",
          grid_table(plan_points, rows).replace("](points/", "](../points/"), "",
          "## Laws (fit budgets only; 95% bootstrap intervals)", "",
          f"- N*(C) exponent a = {_fmt_ci(iso['n_opt_exponent'], iso.get('n_opt_exponent_ci'))}",
          f"- D*(C) exponent b = {_fmt_ci(iso['d_opt_exponent'], iso.get('d_opt_exponent_ci'))}",
          f"- parametric: alpha = {_fmt_ci(par['alpha'], par.get('alpha_ci'))}, "
          f"beta = {_fmt_ci(par['beta'], par.get('beta_ci'))}, E = {_fmt_ci(par['E'], par.get('E_ci'))}", "",
          f"## Held-out budget C={format_budget(summary['holdout_budget'])}", "",
          f"- predicted best loss {summary['predicted_loss_holdout']:.4f} (frontier; parametric "
          f"{summary['predicted_loss_holdout_parametric']:.4f}) at N* = {summary['predicted_n_opt_holdout']:,.0f}",
          f"- measured {summary['measured_loss_holdout']:.4f} ({summary['measured_method']})",
          f"- relative error {summary['prediction_rel_error']:.4f}; a point's loss moves by "
          f"{(summary['repeat_rel_std'] or float('nan')):.4f} (relative std over seeds)", ""]
    if lt:
        md += ["## Learning-rate transfer (best rate per width)", "",
               "| parameterization | " + " | ".join(f"w{w}" for w in lt["widths"]) + " | shift (grid steps) |",
               "|---|" + "---|" * (len(lt["widths"]) + 1)]
        for param in ("sp", "mup"):
            best = summary[f"lr_best_by_width_{param}"] or {}
            md.append(f"| {param} | " + " | ".join(f"{best[str(w)]:g}" if str(w) in best else "-" for w in lt["widths"])
                      + f" | {summary[f'lr_transfer_shift_{param}']} |")
        md.append("")
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
