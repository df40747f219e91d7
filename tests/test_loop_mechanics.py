"""The training loop's mechanics handed to libraries: metrics logged once across a resume
(tensorboardX's purge step), a jax.profiler trace window, JAX's persistent compilation cache."""

import glob
import gzip
import json
import os
import subprocess
import sys

import numpy as np

from sora_jax.configs.common import train_section
from sora_jax.train.metric_writer import MetricWriter
from sora_jax.train.trainer import TrainTask, train
from tests.test_resilience import _tensorboard_view
from tests.test_train import Regressor, batch_fn, loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl_steps(logdir):
    return [json.loads(line)["step"] for line in open(os.path.join(logdir, "metrics.jsonl"))]


def test_a_resumed_writer_cuts_the_steps_after_its_checkpoint(tmp_path):
    first = MetricWriter(str(tmp_path), resume_step=0)
    for step in range(1, 7):
        first.write_scalars(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a row the crash cut short
    # the files of two writers must sort in the order they were made, even within a second
    resumed = MetricWriter(str(tmp_path), resume_step=4)
    assert _jsonl_steps(tmp_path) == [1, 2, 3, 4]
    for step in range(5, 8):
        resumed.write_scalars(step, {"loss": 10.0 * step})
    resumed.close()
    assert _jsonl_steps(tmp_path) == list(range(1, 8))
    shown = _tensorboard_view(tmp_path, "loss")
    assert shown == {1: [1.0], 2: [2.0], 3: [3.0], 4: [4.0], 5: [50.0], 6: [60.0], 7: [70.0]}
    # without the purge marker TensorBoard would show steps 5 and 6 twice
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2


def test_profile_window_traces_the_configured_steps(tmp_path):
    cfg = train_section(steps=5, learning_rate=1e-2, warmup_steps=1, log_every=1, checkpoint_every=5,
                        profile_start_step=2, profile_steps=2)
    train(TrainTask("reg", Regressor(), loss_fn, batch_fn), cfg, str(tmp_path), progress=False)
    traces = glob.glob(str(tmp_path / "logs" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
    assert len(traces) == 1
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    steps = sorted({int(e["args"]["step_num"]) for e in events
                    if e.get("name") == "reg" and "step_num" in e.get("args", {})})
    assert steps == [2, 3]  # StepTraceAnnotation of the traced steps, and only those


def test_no_trace_when_profile_steps_is_zero(tmp_path):
    cfg = train_section(steps=2, learning_rate=1e-2, warmup_steps=1, log_every=1, checkpoint_every=2,
                        profile_start_step=0, profile_steps=0)
    train(TrainTask("reg", Regressor(), loss_fn, batch_fn), cfg, str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "logs" / "plugins")


_CACHE_RUN = """
import sys, time
sys.path.insert(0, {root!r})
from sora_jax.configs.common import train_section
from sora_jax.train.trainer import TrainTask, train
from tests.test_train import Regressor, batch_fn, loss_fn
cfg = train_section(steps=2, learning_rate=1e-2, warmup_steps=1, log_every=1, checkpoint_every=2,
                    compilation_cache_dir={cache!r})
summary = train(TrainTask("reg", Regressor(), loss_fn, batch_fn), cfg, sys.argv[1], progress=False)
print(summary["final_loss"])
"""


def test_compilation_cache_dir_fills_and_serves_a_second_process(tmp_path):
    """Subprocesses: the cache is process-wide and would leak into the other tests."""
    cache = str(tmp_path / "cache")
    script = tmp_path / "run.py"
    script.write_text(_CACHE_RUN.format(root=ROOT, cache=cache))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    losses = []
    for run in ("a", "b"):
        out = subprocess.run([sys.executable, str(script), str(tmp_path / run)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        losses.append(float(out.stdout.strip().splitlines()[-1]))
        if run == "a":
            entries = sorted(os.listdir(cache))
            assert entries  # the train step (and the small programs around it) were stored
    assert sorted(os.listdir(cache)) == entries  # the second run compiled nothing new
    np.testing.assert_equal(losses[0], losses[1])
