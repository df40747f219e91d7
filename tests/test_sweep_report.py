"""``sora-jax sweep fit`` and ``sweep report`` on a synthetic sweep whose law is known (Hoffmann et
al. 2022's published constants, ANCHORS.md), and the measurements beside the laws
(:mod:`sora_jax.sweeps.results`): the held-out minimum, the repeat noise, the learning-rate shift.

The synthetic results file is written the way ``sweep run`` writes it (one JSON row per point, a
failed row, a point that failed and then finished), so the commands read what a real sweep leaves.
"""

import json
import math

import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.cli import run as cli_run
from sora_jax.sweeps import fit
from sora_jax.sweeps.results import holdout_measurement, lr_transfer, read_rows, repeat_noise

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BUDGETS, HELD_OUT = (1e18, 2e18, 4e18), 1.6e19
GRID = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


def _law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def _row(name, budget, n, *, holdout=False, kind="isoflop", noise=0.0, **kw):
    d = budget / (6.0 * n)
    return dict(name=name, budget=budget, holdout=holdout, params=n, non_embedding_params=n // 2, flops=budget,
                tokens=d, steps=100, hidden_size=int(kw.pop("width", 64)), depth=2, learning_rate=kw.pop("lr", 1e-3),
                kind=kind, parameterization=kw.pop("parameterization", "sp"),
                loss=_law(n, d) * math.exp(noise), loss_at_t={}, wall_seconds=2.0, status="finished", **kw)


def _lr_loss(lr, best):
    """A loss bowl in log2(learning rate) with its minimum at ``best``."""
    return 1.0 + 0.05 * (math.log2(lr) - math.log2(best)) ** 2


def _synthetic(tmp_path, *, with_holdout=True):
    rng = np.random.default_rng(0)
    rows, plan = [], []
    widths = (32, 48, 64, 96, 128, 192)
    for c in BUDGETS + ((HELD_OUT,) if with_holdout else ()):
        centre = fit.parametric_allocation(TRUE, c, 6.0)["n_opt"]
        sizes = np.geomspace(centre / 8, centre * 8, 6) if c != HELD_OUT else np.geomspace(centre / 3, centre * 3, 3)
        for w, n in zip(widths if c != HELD_OUT else widths[2:5], sizes):
            r = _row(f"C{c:.0e}-N{int(n)}", c, int(n), holdout=c == HELD_OUT, width=w,
                     noise=0.002 * rng.standard_normal())
            rows.append(r)
            plan.append({k: r[k] for k in ("name", "budget", "holdout", "params", "hidden_size", "kind")})
    # a failed point, and one that failed then finished (its last row counts)
    plan.append(dict(name="C4e18-N9", budget=4e18, holdout=False, params=9, hidden_size=16, kind="isoflop"))
    rows.append(dict(name="C4e18-N9", budget=4e18, status="failed", error="RuntimeError: out of memory"))
    retried = rows[0]
    rows.insert(0, dict(name=retried["name"], budget=retried["budget"], status="failed", error="killed"))
    # repeats of the first point: +-0.5% around it
    for s, f in ((1, 1.005), (2, 0.995)):
        rep = dict(retried, name=f"{retried['name']}-s{s}", kind="repeat", seed=s, loss=retried["loss"] * f)
        rows.append(rep)
    # learning-rate transfer: SP's best rate halves per width doubling, μP's stays at 4e-3
    for param, best in (("sp", {32: 8e-3, 64: 4e-3, 128: 2e-3}), ("mup", {32: 4e-3, 64: 4e-3, 128: 4e-3})):
        for w in (32, 64, 128):
            for lr in GRID:
                rows.append(dict(_row(f"LR-{param}-w{w}-lr{lr:g}", 1e15, 1000, kind="lr_transfer", width=w, lr=lr,
                                      parameterization=param), loss=_lr_loss(lr, best[w])))
    plan += [dict(name=r["name"], kind=r["kind"]) for r in rows if r.get("kind") in ("repeat", "lr_transfer")]
    # a row of a point the plan no longer has (an earlier grid's rate): not counted
    rows.append(dict(_row("LR-sp-w32-lr1e-4", 1e15, 1000, kind="lr_transfer", width=32, lr=1e-4), loss=0.5))
    wd = tmp_path / "sweep"
    wd.mkdir()
    (wd / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wd / "plan.json").write_text(json.dumps({"points": plan, "skipped": []}))
    sweep_file = tmp_path / "sweep_cfg.py"
    sweep_file.write_text(
        "from sora_jax import config as c\n"
        "def get_config(arg=None):\n"
        "    s = c.load_config('sweep_cpu')\n"
        f"    s.budgets, s.holdout_budgets, s.n_boot = {BUDGETS}, ({HELD_OUT},), 30\n"
        f"    s.lr_transfer.learning_rates = {GRID}\n"
        "    return s\n")
    return wd, sweep_file


def test_fit_and_report_on_a_known_law(tmp_path):
    wd, sweep_file = _synthetic(tmp_path)
    args = ["--config", str(sweep_file), "--workdir", str(wd)]
    assert cli_run(["sweep", "report", *args]) == 2  # no laws yet: fit first
    assert cli_run(["sweep", "fit", *args]) == 0
    laws = json.loads((wd / "laws.json").read_text())
    assert sorted(laws["points_used"]) == sorted(  # fit budgets only, no holdout, repeat, LR or failed point
        r["name"] for r in read_rows(wd / "results.jsonl").values()
        if r.get("kind") == "isoflop" and r.get("status") == "finished" and not r["holdout"])
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # Hoffmann et al. eq. 4
    assert laws["isoflop"]["n_opt_exponent"] == pytest.approx(a_true, abs=0.05)
    assert "1.6e19" in laws["predictions"]
    assert cli_run(["sweep", "report", *args]) == 0
    s = json.loads((wd / "summary.json").read_text())
    for key in ("fit_budgets", "holdout_budget", "points_finished", "points_failed", "n_opt_exponent",
                "n_opt_exponent_ci", "d_opt_exponent", "d_opt_exponent_ci", "predicted_loss_holdout",
                "measured_loss_holdout", "prediction_rel_error", "lr_best_by_width_mup", "lr_best_by_width_sp",
                "lr_transfer_shift_mup", "lr_transfer_shift_sp", "seconds"):
        assert key in s, key
    assert s["fit_budgets"] == list(BUDGETS) and s["holdout_budget"] == HELD_OUT
    assert s["points_failed"] == 1 and s["points_finished"] == 18 + 3 + 2 + 36
    assert s["rows_not_in_plan"] == ["LR-sp-w32-lr1e-4"]  # and its loss, the lowest, is no one's best
    assert s["measured_method"] == "isoflop_vertex"
    truth = fit.parametric_allocation(TRUE, HELD_OUT, 6.0)["loss"]
    assert s["measured_loss_holdout"] == pytest.approx(truth, rel=0.01)
    assert s["prediction_rel_error"] < 0.01
    assert s["lr_transfer_shift_sp"] == 2 and s["lr_transfer_shift_sp_signed"] == -2
    assert s["lr_transfer_shift_mup"] == 0 and s["lr_best_by_width_mup"] == {"32": 4e-3, "64": 4e-3, "128": 4e-3}
    assert s["repeat_rel_std"] == pytest.approx(0.005, rel=0.01)
    assert s["seconds"] == 2.0 * 59
    report = (wd / "report" / "report.md").read_text()
    assert "[failed]" not in report and "failed ([C4e18-N9](../points/C4e18-N9))" in report
    assert "(../points/C1e+18-N" in report and "| - |" in report  # the held-out column has 3 of 7 sizes
    for png in ("isoflop", "frontier", "allocation", "lr_transfer"):
        assert (wd / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_refuses_naming_the_budget(tmp_path):
    wd, sweep_file = _synthetic(tmp_path, with_holdout=False)
    centre = fit.parametric_allocation(TRUE, 2e18, 6.0)["n_opt"]  # keep only sizes below N* at 2e18: no vertex
    rows = [r for r in read_rows(wd / "results.jsonl").values()
            if not (r["budget"] == 2e18 and r.get("params", 0) > centre / 2)]
    (wd / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Exception, match="budget 2e\\+18"):
        from sora_jax.sweeps import commands
        commands.fit(config_lib.load_config(str(sweep_file)), str(wd))


def test_holdout_measurement_vertex_or_lowest_point():
    n_opt = fit.parametric_allocation(TRUE, 1.6e19, 6.0)["n_opt"]
    rows = [_row(f"p{i}", 1.6e19, int(n)) for i, n in enumerate((n_opt / 3, n_opt, 3 * n_opt))]
    m = holdout_measurement(rows)
    assert m["method"] == "isoflop_vertex" and m["loss"] <= min(r["loss"] for r in rows)
    edge = [_row(f"p{i}", 1.6e19, int(n)) for i, n in enumerate((n_opt / 27, n_opt / 9, n_opt / 3))]  # no vertex
    m = holdout_measurement(edge)
    assert m["method"] == "lowest_point" and m["loss"] == min(r["loss"] for r in edge) and m["why_not_vertex"]
    with pytest.raises(ValueError, match="no finished point"):
        holdout_measurement([])


def test_lr_transfer_refines_between_grid_points_and_flags_grid_ends():
    rows = {}
    for w, best in ((32, 2.0 ** -8), (128, 2.0 ** -8.5)):  # 3.9e-3, then half a grid step lower
        for lr in GRID:
            rows[f"{w}-{lr}"] = dict(name=f"{w}-{lr}", kind="lr_transfer", parameterization="mup", hidden_size=w,
                                     learning_rate=lr, loss=_lr_loss(lr, best), status="finished")
    res = lr_transfer(rows, "mup", GRID)
    assert res["lr_best_by_width"] == {32: 4e-3, 128: 4e-3} or res["lr_best_by_width"][128] == 2e-3
    assert res["shift_refined"] == pytest.approx(-0.5, abs=0.02)  # the parabola through 3 points is exact
    for lr in GRID:  # the best rate past the grid's end: flagged, not refined
        rows[f"64-{lr}"] = dict(name=f"64-{lr}", kind="lr_transfer", parameterization="mup", hidden_size=64,
                                learning_rate=lr, loss=_lr_loss(lr, 0.1), status="finished")
    assert lr_transfer(rows, "mup", GRID)["at_grid_end"] == [64]
    # a diverged (failed) rate is the worst of its width, not a hole that drops the width
    rows["32-0.016"] = dict(rows["32-0.016"], status="failed", loss=None)
    res = lr_transfer(rows, "mup", GRID)
    assert res["diverged"] == ["32-0.016"] and res["lr_best_by_width"][32] == 4e-3
    assert res["loss_by_width"][32][0.016] == math.inf
    assert lr_transfer(rows, "sp", GRID)["shift"] is None  # no SP rows


def test_repeat_noise_needs_the_original():
    rows = {"a": dict(name="a", loss=1.0, kind="isoflop"), "a-s1": dict(name="a-s1", loss=1.02, kind="repeat"),
            "b-s1": dict(name="b-s1", loss=2.0, kind="repeat")}
    out = repeat_noise(rows)
    assert list(out["points"]) == ["a"] and out["rel_std_mean"] == pytest.approx(np.std([1, 1.02], ddof=1) / 1.01)
