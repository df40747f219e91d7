"""``sora-jax sweep plan``: the IsoFLOP grid, with FLOPs counted per example (attention included) and
checked against XLA's own count, parameters counted on the built model, names, and the plan file."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.cli import run as cli_run
from sora_jax.models.info import xla_forward_flops
from sora_jax.sweeps.plan import (batch_examples, count_params, family_shape, format_budget, format_params,
                                  plan_points, point_config, train_flops)


def _sweep(**kw):
    c = config_lib.load_config("sweep_cpu")
    c.base = "tiny"
    c.widths = (32, 64)
    c.family = ml_collections.ConfigDict(dict(aspect=32.0, head_dim=16))
    c.budgets, c.holdout_budgets = (2e10, 4e10), (1.6e11,)
    c.min_steps, c.max_steps, c.probe_batches = 5, 100000, 4
    c.update(kw)
    return c


def test_names_and_family():
    assert format_budget(3e13) == "3e13" and format_budget(1.2e15) == "1.2e15"
    assert format_params(1_234_567) == "1.2M" and format_params(950_000) == "950K"
    assert format_params(12_500_000) == "12M"
    assert family_shape(128, aspect=32, head_dim=16) == (128, 4, 8)
    with pytest.raises(ValueError, match="head_dim"):
        family_shape(40, aspect=32, head_dim=16)


def test_batch_examples_reads_segments():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
    tseg = np.array([[1, 1, 2, 0], [1, 0, 0, 0]])
    assert batch_examples({"segment_ids": seg, "text_segment_ids": tseg}) == [(3, 2), (2, 1), (2, 1)]


def test_train_flops_agree_with_xla_and_count_attention():
    cfg = point_config(config_lib.load_config("tiny"), _sweep(), 64)
    n, m = 256, 16
    ours = train_flops(cfg, [(n, m)])
    xla = 3 * xla_forward_flops(cfg, n, m)  # XLA's cost analysis of one forward pass (one example)
    assert 0.85 < ours / xla < 1.02, ours / xla  # XLA also counts elementwise work
    # attention is quadratic in an example's own length: one example of 2n costs more than two of n
    assert train_flops(cfg, [(2 * n, m)]) > 2 * ours * 1.01


def test_plan_points_hit_their_budgets(tmp_path):
    base = config_lib.load_config("tiny")
    probe = [[(64, 8), (48, 8)], [(64, 8), (64, 8), (16, 8)]]
    points, skipped = plan_points(base, _sweep(), probe)
    assert {p.budget for p in points} == {2e10, 4e10, 1.6e11} and skipped == []
    for p in points:
        assert abs(p.flops - p.budget) <= 0.01 * p.budget, p
        assert p.name == f"C{format_budget(p.budget)}-N{format_params(p.params)}"
        assert (p.params, p.non_embedding_params) == count_params(point_config(base, _sweep(), p.hidden_size))
        assert 0 < p.non_embedding_params < p.params
        assert p.tokens == p.steps * 128  # the probe's mean real tokens per step
    assert [p.holdout for p in points].count(True) == 2
    few = plan_points(base, _sweep(min_steps=10**9), probe)
    assert few[0] == [] and len(few[1]) == 6 and "outside" in few[1][0]["why"]


def test_plan_command_on_a_run(trained_run, tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text(
        "from sora_jax import config as c\n"
        "def get_config(arg=None):\n"
        f"    s = c.load_config({str(pathlib.Path('configs/sweep_cpu.py').resolve())!r})\n"
        f"    s.base, s.source_run, s.widths = 'tiny', {trained_run!r}, (32, 64)\n"
        "    s.budgets, s.holdout_budgets, s.min_steps, s.probe_batches = (1e11, 2e11), (8e11,), 2, 3\n"
        "    return s\n")
    wd = tmp_path / "sweep"
    assert cli_run(["sweep", "plan", "--config", str(sweep_file), "--workdir", str(wd)]) == 0
    plan = json.loads((wd / "plan.json").read_text())
    assert len(plan["points"]) + len(plan["skipped"]) == 6 and plan["sweep"]["source_run"] == trained_run
    assert len(plan["points"]) >= 4 and all(s["why"] for s in plan["skipped"])
    assert all(abs(p["flops"] / p["budget"] - 1) <= 0.01 for p in plan["points"])
    assert cli_run(["sweep", "run", "--config", str(sweep_file), "--workdir", str(wd)]) == 2  # not built yet
