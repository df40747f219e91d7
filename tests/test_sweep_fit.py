"""The scaling-law fitter (sora_jax/sweeps/fit.py): synthetic recovery of a known Chinchilla law,
refusals that name the budget, the results-file loader and the laws file.

Reference constants: Hoffmann et al. 2022's published approach-3 fit (ANCHORS.md, "Scaling-law
sweeps"): E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28; compute-optimal exponents
a = beta / (alpha + beta) = 0.4516, b = alpha / (alpha + beta) = 0.5484 (their eq. 4).
"""
import json
import math
import re

import numpy as np
import pytest

import sora_jax
from sora_jax.sweeps import fit

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
B_TRUE = TRUE["alpha"] / (TRUE["alpha"] + TRUE["beta"])
BUDGETS = (1e17, 1e18, 1e19, 1e20)
HELD_OUT = 4e20


def _law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def _sweep(budgets=BUDGETS, sizes=6, noise=0.005, seed=0, k=6.0):
    """An IsoFLOP grid, C = k N D, with multiplicative lognormal noise on the loss.

    Each budget's sizes span 6x either side of 1.5x the true optimum: off-centre, as a real
    sweep's guess would be, and ~2x apart.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        centre = 1.5 * fit.parametric_allocation(TRUE, c, k)["n_opt"]
        for n in np.geomspace(centre / 6, centre * 6, sizes):
            d = c / (k * n)
            rows.append({"name": f"C{c:.0e}-N{n:.3g}", "budget": c, "params": float(n), "tokens": float(d),
                         "flops": c, "loss": float(_law(n, d) * math.exp(noise * rng.standard_normal()))})
    return rows


@pytest.fixture(scope="module")
def laws():
    return fit.fit_laws(_sweep(), n_boot=100, seed=0)


def test_parametric_allocation_is_the_constrained_minimum():
    """Hoffmann et al. eq. 4 (with k = 6) against a brute-force search along the IsoFLOP curve."""
    c = 1e20
    opt = fit.parametric_allocation(TRUE, c, 6.0)
    n = np.geomspace(opt["n_opt"] / 3, opt["n_opt"] * 3, 200001)
    brute = n[np.argmin(_law(n, c / (6 * n)))]
    assert opt["n_opt"] == pytest.approx(brute, rel=1e-4)
    assert opt["n_opt"] * opt["d_opt"] * 6 == pytest.approx(c, rel=1e-12)
    assert opt["loss"] == pytest.approx(_law(opt["n_opt"], opt["d_opt"]), rel=1e-12)


def test_synthetic_recovery(laws):
    iso, par, front = laws["isoflop"], laws["parametric"], laws["frontier"]
    # approach 3 recovers the law's constants
    assert abs(par["alpha"] - TRUE["alpha"]) < 0.05
    assert abs(par["beta"] - TRUE["beta"]) < 0.05
    assert par["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert par["flops_per_param_token"] == pytest.approx(6.0)
    assert par["huber_delta"] == 1e-3 and par["objective"] > 0
    # approach 2's exponents match the closed form, and their intervals contain it
    assert abs(iso["n_opt_exponent"] - A_TRUE) < 0.05
    assert abs(iso["d_opt_exponent"] - B_TRUE) < 0.05
    assert iso["n_opt_exponent_ci"][0] <= A_TRUE <= iso["n_opt_exponent_ci"][1]
    assert iso["d_opt_exponent_ci"][0] <= B_TRUE <= iso["d_opt_exponent_ci"][1]
    # C = 6 N D at every point: the exponents add to 1 and D* = C / (6 N*) exactly (the D* rule)
    assert iso["n_opt_exponent"] + iso["d_opt_exponent"] == pytest.approx(1.0, abs=1e-9)
    for row in iso["per_budget"]:
        assert row["n_points"] == 6 and row["tokens_slope"] == pytest.approx(-1.0)
        assert row["d_opt"] == pytest.approx(row["budget"] / (6 * row["n_opt"]), rel=1e-9)
    # every interval brackets its estimate
    for section in ("isoflop", "parametric", "frontier"):
        for key, ci in laws[section].items():
            if key.endswith("_ci"):
                lo, hi = ci
                assert lo <= laws[section][key[:-3]] <= hi, (section, key)
    # the frontier's exponent is near alpha beta / (alpha + beta) = 0.1535
    assert front["gamma"] == pytest.approx(TRUE["alpha"] * TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.02)
    assert front["E"] == par["E"] and front["E_source"] == "parametric"
    assert 0 <= laws["boot_failures"] < laws["n_boot"] == 100
    assert laws["boot_failures_by_part"]["parametric"] == 0
    assert len(laws["points_used"]) == 24


def test_prediction_at_a_held_out_budget(laws):
    """4x past the largest budget: both approaches predict the closed-form optimum's loss within
    1.5% and its size within 25%."""
    truth = fit.parametric_allocation(TRUE, HELD_OUT, 6.0)
    pred = fit.predict(laws, HELD_OUT)
    assert pred["budget"] == HELD_OUT
    for approach in ("isoflop", "parametric"):
        assert pred[approach]["loss"] == pytest.approx(truth["loss"], rel=0.015), approach
        assert pred[approach]["n_opt"] == pytest.approx(truth["n_opt"], rel=0.25), approach
        assert pred[approach]["n_opt"] * pred[approach]["d_opt"] * 6 == pytest.approx(HELD_OUT, rel=1e-6)
    with pytest.raises(ValueError, match="budget"):
        fit.predict(laws, -1.0)


def test_refuses_a_budget_with_two_points():
    rows = [r for r in _sweep() if r["budget"] != 1e18] + [r for r in _sweep() if r["budget"] == 1e18][:2]
    with pytest.raises(ValueError, match=re.escape("budget 1e+18: 2 points, need at least 3")):
        fit.fit_laws(rows, n_boot=0)


def test_refuses_a_budget_without_interior_minimum():
    # every size far below the optimum: the loss falls monotonically with N, the vertex lies past the grid
    rows = [r for r in _sweep() if r["budget"] != 1e19]
    for n in np.geomspace(1e5, 1e6, 5):
        rows.append({"name": f"small-{n:.0e}", "budget": 1e19, "params": n, "tokens": 1e19 / (6 * n),
                     "flops": 1e19, "loss": _law(n, 1e19 / (6 * n))})
    with pytest.raises(ValueError, match=re.escape("budget 1e+19: no interior minimum") + ".*above the largest"):
        fit.fit_laws(rows, n_boot=0)
    # a concave run of losses: the parabola opens downward
    for i, loss in enumerate([3.0, 2.95, 2.85, 2.7, 2.5]):
        rows[-5 + i] = dict(rows[-5 + i], loss=loss)
    with pytest.raises(ValueError, match=re.escape("budget 1e+19: no interior minimum") + ".*opens downward"):
        fit.fit_laws(rows, n_boot=0)


def test_refuses_fewer_than_two_budgets_and_off_budget_flops():
    one = [r for r in _sweep() if r["budget"] == 1e18]
    with pytest.raises(ValueError, match="1 budget.*need at least 2"):
        fit.fit_laws(one, n_boot=0)
    rows = _sweep()
    rows[3] = dict(rows[3], flops=rows[3]["budget"] * 1.02)
    with pytest.raises(ValueError, match=re.escape(rows[3]["name"]) + ".*not within 1%"):
        fit.fit_laws(rows, n_boot=0)


def test_flops_per_token_taken_from_the_points():
    """Counting attention makes FLOPs per parameter-token > 6: the parametric allocation uses the
    points' k, so N_opt D_opt k = C; the IsoFLOP D* follows the points' own (N, D) pairs."""
    rows = _sweep(k=8.0, noise=0.0, budgets=BUDGETS[:3])
    laws = fit.fit_laws(rows, n_boot=0)
    assert laws["parametric"]["flops_per_param_token"] == pytest.approx(8.0)
    assert laws["n_boot"] == 0 and laws["isoflop"]["n_opt_exponent_ci"] is None
    for row in laws["isoflop"]["per_budget"]:
        assert row["d_opt"] == pytest.approx(row["budget"] / (8 * row["n_opt"]), rel=1e-9)
    pred = fit.predict(laws, 1e21)["parametric"]
    assert pred["n_opt"] * pred["d_opt"] * 8 == pytest.approx(1e21, rel=1e-9)
    assert laws["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.01)  # noiseless: near exact


def test_loader_skips_unfinished_rows(tmp_path):
    rows = _sweep()[:6]
    lines = [json.dumps(dict(rows[0], status="finished")),
             json.dumps(dict(rows[1], status="failed")),
             json.dumps(dict(rows[2], status="running")),
             json.dumps(dict(rows[3], loss=None, status="finished")),
             json.dumps(dict(rows[4], loss=float("nan"))),  # NaN is written as the bare token NaN
             "",
             json.dumps({k: v for k, v in rows[5].items() if k != "loss"}),
             json.dumps(dict(rows[5], name="no-status", extra="ignored"))]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    points = fit.load_points(path)
    assert [p.name for p in points] == [rows[0]["name"], "no-status"]
    assert isinstance(points[0], fit.SweepPoint) and points[0].loss == rows[0]["loss"]
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=":2: not JSON"):
        fit.load_points(path)
    path.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "tokens"}) + "\n")
    with pytest.raises(ValueError, match=":1: .*missing tokens"):
        fit.load_points(path)


def test_laws_round_trip(laws, tmp_path):
    path = tmp_path / "laws.json"
    fit.write_laws(path, laws)
    back = fit.read_laws(path)
    assert back == json.loads(json.dumps(laws))
    assert back == laws  # nothing in the laws that JSON would change (tuples, numpy scalars)
    assert fit.predict(back, HELD_OUT) == fit.predict(laws, HELD_OUT)
    version = back["code_version"]
    assert version["version"] == sora_jax.__version__
    assert version["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", version["commit"])
    with pytest.raises(ValueError):
        fit.write_laws(tmp_path / "bad.json", {"x": float("inf")})
    assert not (tmp_path / "bad.json").exists() and len(list(tmp_path.iterdir())) == 1
