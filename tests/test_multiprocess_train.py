"""Training on 2 local processes (``launch/local_multiprocess.sh``, 2 CPU devices each): the
trainer, the sharded checkpoints and preemption across processes, against one process with
the same 4 devices (``tests/distributed_train_worker.py`` is the run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = ["tests/distributed_train_worker.py"]


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, GRACE_SECONDS="2", JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _two_processes(workdir, steps, logdir, sleep=0.0):
    """Starts the worker on 2 processes x 2 devices; returns the launcher's Popen."""
    return subprocess.Popen(
        ["/bin/bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "--", sys.executable, *WORKER,
         str(workdir), str(steps), str(sleep)],
        cwd=REPO, env=_env(LOGDIR=str(logdir), DEVICES_PER_PROCESS="2"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _one_process(workdir, steps):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, *WORKER, str(workdir), str(steps)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(workdir):
    return [json.loads(line)["dit/loss"] for line in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _finish(proc, logdir, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    logs = "".join(p.read_text()[-2000:] for p in sorted(Path(logdir).glob("*.log")))
    return proc.returncode, out + logs


def test_two_processes_train_and_checkpoint_like_one(tmp_path):
    _one_process(tmp_path / "one", 4)
    rc, out = _finish(_two_processes(tmp_path / "two", 4, tmp_path / "logs"), tmp_path / "logs")
    assert rc == 0, out
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["process_count"], summary["device_count"], summary["steps"]) == (2, 4, 4)
    # same global batch, FSDP over the same 4 devices: equal up to the order of reductions
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert summary["tokens_per_s"] > 0 and 0 < summary["goodput"] < 1
    for step in (2, 4):  # each process wrote its own shards of the parameters and optimizer state
        for item in ("model", "optimizer"):
            folder = tmp_path / "two" / "checkpoints" / str(step) / item
            assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in folder.iterdir()}
    # one logger: only process 0 writes metrics
    assert len(_losses(tmp_path / "two")) == 4


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_one_step_and_they_resume_exactly(tmp_path):
    """A preemption notice reaching one host: both save the same step and exit 143; the rerun
    resumes there, and so does one process on the same 4 devices from the 2 processes' files;
    every per-step loss equals an uninterrupted run's."""
    _one_process(tmp_path / "ref", 8)
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = _two_processes(run, 8, logs, sleep=0.5)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "2").is_dir():
        assert time.time() < deadline and proc.poll() is None, _finish(proc, logs)[1]
        time.sleep(0.2)
    os.kill(int((run / "pid_1").read_text()), signal.SIGTERM)
    rc, out = _finish(proc, logs)
    assert rc == 143, out
    saved = [[line for line in (logs / f"proc_{i}.log").read_text().splitlines() if "SIGTERM: saved step" in line]
             for i in range(2)]
    assert len(saved[0]) == 1 and saved[0] == saved[1], out  # the same step on both
    stopped = int(saved[0][0].rsplit("step ", 1)[1].split(",")[0])
    assert 2 <= stopped < 8
    elastic = tmp_path / "elastic"
    subprocess.run(["cp", "-r", str(run), str(elastic)], check=True)
    rc, out = _finish(_two_processes(run, 8, tmp_path / "logs2"), tmp_path / "logs2")
    assert rc == 0, out
    _one_process(elastic, 8)
    reference = _losses(tmp_path / "ref")
    for folder in (run, elastic):
        assert json.loads((folder / "summary.json").read_text())["resumed_from"] == stopped
        losses = _losses(folder)
        assert len(losses) == 8 and losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_quickstart_runs_on_two_processes(tmp_path):
    """The CLI's quickstart (tiny config) on 2 processes x 1 device: process 0 prepares the data,
    trains the VAE and samples while process 1 waits; both train the DiT on their own rows."""
    env = _env(LOGDIR=str(tmp_path / "logs"), DEVICES_PER_PROCESS="1", SORA_JAX=f"{sys.executable} -m sora_jax.cli")
    r = subprocess.run(["/bin/bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "quickstart", "--config",
                        "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = [(tmp_path / "logs" / f"proc_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stderr + logs[0][-3000:] + logs[1][-3000:]
    metrics = json.loads((tmp_path / "run" / "quickstart_metrics.json").read_text())
    assert metrics["num_eval_samples"] > 0 and metrics["dit_heldout_loss"] > 0
    assert '"digit_accuracy"' in logs[0] and '"digit_accuracy"' not in logs[1]  # process 0 reports
    dit = tmp_path / "run" / "dit" / "checkpoints"
    last = max(int(p.name) for p in dit.iterdir() if p.name.isdigit())
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (dit / str(last) / "model").iterdir()}


@pytest.mark.slow
def test_resume_on_a_mesh_is_bitwise_exact(tmp_path):
    """One process, FSDP over 4 devices: preempted after its second checkpoint and rerun, the
    per-step losses equal an uninterrupted run's bit for bit."""
    _one_process(tmp_path / "ref", 8)
    run = tmp_path / "run"
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    log = tmp_path / "run.log"
    with open(log, "w") as f:  # a file, not a pipe: the worker's logs must never block it
        proc = subprocess.Popen([sys.executable, *WORKER, str(run), "8", "0.5"], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "2").is_dir():
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    _one_process(run, 8)
    assert 2 <= json.loads((run / "summary.json").read_text())["resumed_from"] < 8
    assert _losses(run) == _losses(tmp_path / "ref")  # exact
