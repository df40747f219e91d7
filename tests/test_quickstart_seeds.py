"""benchmarks/quickstart_seeds.py's summary over seeds: per-seed values, mean, sample std and
spread of each metric, the loop seam of the demo loop and over each run's loops kept apart,
and the floors judged on means and spreads."""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quickstart_seeds.py")


@pytest.fixture(scope="module")
def seeds_module():
    spec = importlib.util.spec_from_file_location("quickstart_seeds", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(digit, direction, demo_loop, loop_mean=None):
    loop = {"loop_seam_ratio": demo_loop}
    if loop_mean is not None:
        loop["loop_seam_ratio_mean"] = loop_mean
    return {"digit_accuracy": digit, "direction_accuracy": direction, "joint_accuracy": digit,
            "modes": {"loop": loop}, "total_seconds": 700.0}


def test_summary_statistics_and_loop_seams_kept_apart(seeds_module):
    out = seeds_module.summarize({0: _run(0.9, 1.0, 0.6, 1.0), 1: _run(0.8, 0.95, 1.2, 0.8)})
    assert out["digit_accuracy_by_seed"] == [0.9, 0.8]
    assert out["digit_accuracy_mean"] == pytest.approx(0.85)
    assert out["digit_accuracy_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert out["digit_accuracy_spread"] == pytest.approx(0.1)
    # the demo loop's ratio and each run's mean over its loops are separate metrics
    assert out["loop_seam_ratio_mean"] == pytest.approx(0.9)
    assert out["loop_seam_ratio_over_loops_by_seed"] == [1.0, 0.8]
    assert out["loop_seam_ratio_over_loops_mean"] == pytest.approx(0.9)
    # means 0.85 / 0.975 / 0.85 and spreads 0.1 / 0.05: every floor met
    assert out["floors_met"] is True


def test_floors_fail_on_spread_and_runs_without_loop_means_are_left_out(seeds_module):
    out = seeds_module.summarize({0: _run(0.95, 1.0, 0.6), 1: _run(0.8, 1.0, 0.7)})
    assert out["digit_accuracy_mean"] >= 0.8 and out["digit_accuracy_spread"] > 0.1
    assert out["floors_met"] is False
    assert not any(k.startswith("loop_seam_ratio_over_loops") for k in out)
