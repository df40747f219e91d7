"""A training loop that survives: non-finite steps skipped, SIGTERM saves, SIGKILL resumes
bit for bit (and logs every step once), a corrupt latest checkpoint falls back to the one
before."""

import glob
import json
import os
import struct
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.configs.common import train_section
from sora_jax.train.trainer import TrainTask, train
from tests.test_train import Regressor, batch_fn, loss_fn, params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")


def _sgd(cfg):  # a constant rate: runs of different lengths take identical early steps
    return optax.sgd(1e-2), optax.constant_schedule(1e-2)


def _cfg(steps, **kw):
    return train_section(steps=steps, log_every=1, checkpoint_every=kw.pop("checkpoint_every", 100), **kw)


def _poisoned(bad_steps):
    def fn(step):
        b = batch_fn(step)
        if step in bad_steps:
            b["x"] = np.full_like(b["x"], np.nan)
        return b
    return fn


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    clean = Regressor()
    train(TrainTask("reg", clean, loss_fn, batch_fn, optimizer_fn=_sgd), _cfg(2), str(tmp_path / "a"),
          progress=False)
    hit = Regressor()
    summary = train(TrainTask("reg", hit, loss_fn, _poisoned({2}), optimizer_fn=_sgd), _cfg(3),
                    str(tmp_path / "b"), progress=False)
    assert summary["nonfinite_steps"] == 1
    # step 2 changed nothing: the parameters are those after steps 0 and 1
    jax.tree.map(np.testing.assert_array_equal, params(hit), params(clean))
    lines = [json.loads(x) for x in open(tmp_path / "b" / "logs" / "metrics.jsonl")]
    assert [x["reg/nonfinite"] for x in lines] == [0.0, 0.0, 1.0]


def test_a_run_of_nonfinite_steps_stops_training(tmp_path):
    with pytest.raises(FloatingPointError, match="3 steps in a row.*nonfinite_limit = 3"):
        train(TrainTask("reg", Regressor(), loss_fn, _poisoned({1, 2, 3, 4}), optimizer_fn=_sgd),
              _cfg(6, nonfinite_limit=3), str(tmp_path), progress=False)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    straight = Regressor()
    train(TrainTask("reg", straight, loss_fn, batch_fn), _cfg(8, checkpoint_every=3, max_to_keep=3),
          str(tmp_path / "a"), progress=False)
    run = tmp_path / "b"
    train(TrainTask("reg", Regressor(), loss_fn, batch_fn), _cfg(8, checkpoint_every=3, max_to_keep=3),
          str(run), progress=False)
    # damage every file of the final checkpoint's parameters
    for root, _, files in os.walk(run / "checkpoints" / "8" / "model"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    resumed = Regressor()
    summary = train(TrainTask("reg", resumed, loss_fn, batch_fn), _cfg(8, checkpoint_every=3, max_to_keep=3),
                    str(run), progress=False)
    assert summary["resumed_from"] == 6
    assert os.path.isdir(run / "checkpoints" / "8.corrupt")  # kept for inspection
    jax.tree.map(np.testing.assert_array_equal, params(resumed), params(straight))


def _rows(workdir) -> list[tuple[int, float]]:
    """(step, loss) of every row of metrics.jsonl, in file order."""
    path = os.path.join(workdir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except ValueError:  # a row being written right now
            continue
        rows.append((rec["step"], rec["reg/loss"]))
    return rows


def _losses(workdir) -> dict[int, float]:
    """Per-step loss (the last row of a step)."""
    return dict(_rows(workdir))


def _events(path):
    """Event protos of a TensorBoard event file (TFRecord framing; CRCs not checked)."""
    from tensorboardX.proto.event_pb2 import Event

    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            event = Event()
            event.ParseFromString(data)
            yield event


def _tensorboard_view(logdir, tag):
    """{step: [values]} as TensorBoard shows a tag: files in name order, and a SessionLog.START
    at step s discards the earlier files' events at steps >= s (its purge of orphaned steps)."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for e in _events(path):
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                out = {k: v for k, v in out.items() if k < e.step}
            for v in e.summary.value:
                if v.tag == tag:
                    out.setdefault(e.step, []).append(v.simple_value)
    return out


def _start(workdir, steps, sleep):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, WORKER, str(workdir), str(steps), str(sleep)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
    t0 = time.time()
    while max(_losses(workdir), default=0) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout, "the worker made no progress"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    proc = _start(wd, 12, 0.0)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    return _losses(wd)


def test_sigkill_then_resume_gives_bitwise_identical_losses(tmp_path, uninterrupted):
    proc = _start(tmp_path, 12, 0.3)
    _wait_for_step(proc, tmp_path, 5)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_losses(tmp_path))
    assert killed_at < 12
    checkpointed = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    resumed = _start(tmp_path, 12, 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    got = _losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert got == uninterrupted  # float for float, every step, before and after the kill
    # each step logged once, although the killed run logged past its last checkpoint (most
    # runs: the kill lands between checkpoints) and the resumed run logged those steps again
    assert checkpointed <= killed_at
    assert [step for step, _ in _rows(tmp_path)] == list(range(1, 13))
    shown = _tensorboard_view(tmp_path / "logs", "reg/loss")
    assert {k: len(v) for k, v in shown.items()} == {k: 1 for k in range(1, 13)}
    assert {k: v[0] for k, v in shown.items()} == {k: np.float32(v) for k, v in got.items()}


def test_sigterm_saves_and_exits_then_resumes_exactly(tmp_path, uninterrupted):
    proc = _start(tmp_path, 12, 0.3)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()[-3000:]
    stopped = max(_losses(tmp_path))
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert ckpts[-1] == stopped < 12  # saved at the step it stopped, not only at the 2-step cadence
    resumed = _start(tmp_path, 12, 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert _losses(tmp_path) == uninterrupted


def test_unreadable_checkpoints_are_kept_when_none_restores(tmp_path):
    train(TrainTask("reg", Regressor(), loss_fn, batch_fn), _cfg(4, checkpoint_every=2, max_to_keep=3),
          str(tmp_path), progress=False)

    class Wider(Regressor):  # another architecture: no checkpoint of the run fits it
        def __init__(self):
            super().__init__()
            self.l1 = nnx.Linear(4, 32, rngs=nnx.Rngs(0))
            self.l2 = nnx.Linear(32, 1, rngs=nnx.Rngs(1))

    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        train(TrainTask("reg", Wider(), loss_fn, batch_fn), _cfg(6, checkpoint_every=2, max_to_keep=3),
              str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing renamed
