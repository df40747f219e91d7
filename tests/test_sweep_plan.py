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
    c.repeats, c.lr_transfer, c.holdout_widths = None, None, None
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


def _sweep_file(tmp_path, source_run, widths, budgets_holdout_min_steps):
    """A sweep config file over the tiny config, on ``source_run``'s latents."""
    f = tmp_path / "sweep.py"
    f.write_text(
        "from sora_jax import config as c\n"
        "def get_config(arg=None):\n"
        f"    s = c.load_config({str(pathlib.Path('configs/sweep_cpu.py').resolve())!r})\n"
        f"    s.base, s.source_run, s.widths = 'tiny', {source_run!r}, {widths}\n"
        f"    s.budgets, s.holdout_budgets, s.min_steps = {budgets_holdout_min_steps}\n"
        "    s.probe_batches = 3\n"
        "    return s\n")
    return f


@pytest.mark.slow  # the CLI path; plan_points is tested above and the slow end-to-end sweep plans too
def test_plan_command_on_a_run(trained_run, tmp_path):
    sweep_file = _sweep_file(tmp_path, trained_run, "(32, 64)", "(1e11, 2e11), (8e11,), 2")
    wd = tmp_path / "sweep"
    assert cli_run(["sweep", "plan", "--config", str(sweep_file), "--workdir", str(wd)]) == 0
    plan = json.loads((wd / "plan.json").read_text())
    assert len(plan["points"]) + len(plan["skipped"]) == 6 and plan["sweep"]["source_run"] == trained_run
    assert len(plan["points"]) >= 4 and all(s["why"] for s in plan["skipped"])
    assert all(abs(p["flops"] / p["budget"] - 1) <= 0.01 for p in plan["points"])
    # no point has run: fit says so (exit 2) instead of fitting nothing
    assert cli_run(["sweep", "fit", "--config", str(sweep_file), "--workdir", str(wd)]) == 2


def _plan_file(wd, names_widths):
    wd.mkdir(parents=True, exist_ok=True)
    points = [dict(name=n, budget=1e10, holdout=False, params=1000 * w, non_embedding_params=500 * w, flops=1e10,
                   tokens=1e5, steps=3, hidden_size=w, depth=1, num_heads=w // 16, learning_rate=1e-3)
              for n, w in names_widths]
    (wd / "plan.json").write_text(json.dumps({"points": points, "skipped": []}))


def test_run_skips_finished_points_and_records_failures(tmp_path, monkeypatch):
    """The run loop without training (train_dit stubbed): a failing point is recorded and the
    sweep goes on; a second run skips what finished and retries what failed; --point runs one."""
    from sora_jax.sweeps import commands

    source = tmp_path / "source"
    for name in ("data", "vae", "latents"):
        (source / name).mkdir(parents=True)
    sweep = _sweep(source_run=str(source))
    wd = tmp_path / "sweep"
    _plan_file(wd, [("C1e10-N32K", 32), ("C1e10-N48K", 48), ("C1e10-N64K", 64)])
    calls = []

    def fake_train(cfg, workdir, progress):
        calls.append(pathlib.Path(workdir).name)
        if cfg.dit.hidden_size == 48 and calls.count("C1e10-N48K") == 1:
            raise RuntimeError("out of memory")
        assert (pathlib.Path(workdir) / "vae").is_symlink()  # the source run's, shared read-only
        return {"heldout_loss": 1.0 / cfg.dit.hidden_size}

    monkeypatch.setattr(commands, "train_dit", fake_train)
    out = commands.run(sweep, str(wd))
    assert out["finished"] == ["C1e10-N32K", "C1e10-N64K"] and list(out["failed"]) == ["C1e10-N48K"]
    assert "out of memory" in out["failed"]["C1e10-N48K"]
    again = commands.run(sweep, str(wd))
    assert again["skipped_finished"] == ["C1e10-N32K", "C1e10-N64K"] and again["finished"] == ["C1e10-N48K"]
    assert calls == ["C1e10-N32K", "C1e10-N48K", "C1e10-N64K", "C1e10-N48K"]
    rows = [json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()]
    finished = [r for r in rows if r["status"] == "finished"]
    assert sorted(r["name"] for r in finished) == ["C1e10-N32K", "C1e10-N48K", "C1e10-N64K"]
    assert finished[0]["loss"] == 1.0 / 32 and finished[0]["config_sha256"]
    assert [r["attempts"] for r in finished] == [1, 1, 2]  # the failed point finished on its second
    assert [r["status"] for r in rows].count("failed") == 1
    assert commands.run(sweep, str(wd), point="C1e10-N64K")["skipped_finished"] == ["C1e10-N64K"]
    with pytest.raises(Exception, match="no point 'C9'"):
        commands.run(sweep, str(wd), point="C9")


@pytest.mark.slow  # about 4 minutes: six real tiny trainings, a kill, a resume
def test_sweep_runs_end_to_end_killed_and_resumed(trained_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep_file = _sweep_file(tmp_path, trained_run, "(32, 48, 64)", "(3.5e10, 7e10), (), 40")
    wd = tmp_path / "sweep"
    assert cli_run(["sweep", "plan", "--config", str(sweep_file), "--workdir", str(wd)]) == 0
    cmd = [sys.executable, "-m", "sora_jax.cli", "sweep", "run", "--config", str(sweep_file), "--workdir", str(wd),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = wd / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (results.exists() and results.read_text().count("finished") >= 2):
        time.sleep(1)
    os.kill(proc.pid, signal.SIGKILL)  # mid-sweep: two points done, the third interrupted
    proc.wait()
    done_before = [json.loads(x)["name"] for x in results.read_text().splitlines()]
    assert len(done_before) >= 2
    first_ckpt = wd / "points" / done_before[0] / "dit" / "checkpoints"
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in first_ckpt.iterdir())
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["skipped_finished"] == done_before and not summary["failed"]
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == sorted(p["name"] for p in json.loads((wd / "plan.json").read_text())
                                                     ["points"])  # one row per point: none redone
    assert sorted((p.name, p.stat().st_mtime_ns) for p in first_ckpt.iterdir()) == stamp


def test_repeat_and_learning_rate_transfer_points():
    """Repeats copy a grid point with another seed; the transfer grid is width x rate at fixed
    depth and steps, μP with the family's head dimension as the base's (heads of fixed width)."""
    base = config_lib.load_config("tiny")
    probe = [[(64, 8), (48, 8)]]
    lt = ml_collections.ConfigDict(dict(widths=(32, 64), depth=1, steps=7, learning_rates=(1e-3, 2e-3),
                                        parameterizations=("sp", "mup"), mup_base_width=32))
    rep = ml_collections.ConfigDict(dict(points=((2e10, 64),), seeds=(5,)))
    points, _ = plan_points(base, _sweep(lr_transfer=lt, repeats=rep), probe)
    by_name = {p.name: p for p in points}
    grid = [p for p in points if p.kind == "isoflop" and p.budget == 2e10 and p.hidden_size == 64][0]
    again = by_name[f"{grid.name}-s5"]
    assert (again.kind, again.seed, again.steps, again.flops) == ("repeat", 5, grid.steps, grid.flops)
    lr_points = [p for p in points if p.kind == "lr_transfer"]
    assert sorted(p.name for p in lr_points) == sorted(f"LR-{k}-w{w}-lr{r}" for k in ("sp", "mup") for w in (32, 64)
                                                       for r in ("1e-3", "2e-3"))
    assert {(p.depth, p.steps) for p in lr_points} == {(1, 7)}
    assert all(p.flops == pytest.approx(p.budget) for p in lr_points)
    cfg = point_config(base, _sweep(lr_transfer=lt), 64, 7, depth=1, lr=2e-3, parameterization="mup", seed=5)
    assert (cfg.dit.parameterization, cfg.dit.mup_base_width, cfg.dit.mup_base_head_dim) == ("mup", 32, 16)
    assert (cfg.dit.depth, cfg.dit_train.learning_rate, cfg.seed, cfg.dit_train.seed) == (1, 2e-3, 5, 5)
    with pytest.raises(ValueError, match="not an IsoFLOP point"):
        plan_points(base, _sweep(repeats=ml_collections.ConfigDict(dict(points=((2e10, 48),), seeds=(1,)))), probe)


def test_heldout_losses_at_fixed_times(trained_run):
    """The held-out loss at fixed t: same noise, so repeatable; the mean is the training-time
    held-out loss; every token at t = 0.25 scores differently from t = 0.75."""
    from sora_jax.models.factory import build_dit
    from sora_jax.stages.dit import dit_heldout_loss, dit_heldout_losses
    from sora_jax.train.run_folder import paths, read_config, restore

    cfg = read_config(trained_run)
    dit = build_dit(cfg)  # trained: an untrained DiT's zero-initialised output scores every t alike
    restore(dit, paths(trained_run)["dit"], "dit")
    a = dit_heldout_losses(cfg, trained_run, dit, num_batches=1, at_t=(0.25, 0.75))
    assert set(a) == {"mean", "t=0.25", "t=0.75"} and all(np.isfinite(v) for v in a.values())
    assert a["mean"] == dit_heldout_loss(cfg, trained_run, dit, num_batches=1)  # and repeatable
    assert a["t=0.25"] != a["t=0.75"]


def test_sigterm_stops_the_sweep_instead_of_moving_on(tmp_path, monkeypatch):
    """A preempted job (SIGTERM: the trainer saves and raises Preempted) stops the sweep at that
    point, marked interrupted, not failed; the next run resumes it and goes on."""
    from sora_jax.sweeps import commands
    from sora_jax.train.trainer import Preempted

    source = tmp_path / "source"
    for name in ("data", "vae", "latents"):
        (source / name).mkdir(parents=True)
    sweep = _sweep(source_run=str(source))
    wd = tmp_path / "sweep"
    _plan_file(wd, [("C1e10-N32K", 32), ("C1e10-N48K", 48)])
    calls = []

    def fake_train(cfg, workdir, progress):
        calls.append(pathlib.Path(workdir).name)
        if len(calls) == 1:
            raise Preempted("dit", 7)
        return {"heldout_loss": 1.0}

    monkeypatch.setattr(commands, "train_dit", fake_train)
    with pytest.raises(Preempted):
        commands.run(sweep, str(wd))
    assert calls == ["C1e10-N32K"] and not (wd / "results.jsonl").exists()
    assert json.loads((wd / "points" / "C1e10-N32K" / "status.json").read_text())["status"] == "interrupted"
    assert commands.run(sweep, str(wd))["finished"] == ["C1e10-N32K", "C1e10-N48K"]
    rows = [json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()]
    assert [r["attempts"] for r in rows] == [2, 1]
