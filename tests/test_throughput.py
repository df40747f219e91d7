"""Step time, tokens/s, MFU and goodput (sora_jax/train/throughput.py) and their place in the
training loop's metrics."""

import json
import types

import pytest

from sora_jax.train import throughput
from sora_jax.train.throughput import Throughput, peak_flops_per_device
from sora_jax.train.trainer import TrainTask, train
from tests.test_train import Regressor, batch_fn, cfg, loss_fn


def _device(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5p", 459), ("TPU v6 lite", 918)])
def test_peak_comes_from_the_data_sheet_by_device_kind(kind, tflops):
    peak, source = peak_flops_per_device(device=_device("gpu" if "NVIDIA" in kind else "tpu", kind))
    assert peak == tflops * 1e12 and "data sheet" in source


def test_peak_override_wins_and_unknown_accelerators_have_none():
    assert peak_flops_per_device(123e12, _device("gpu", "NVIDIA H100"))[0] == 123e12
    peak, why = peak_flops_per_device(device=_device("gpu", "Some New Chip"))
    assert peak is None and "peak_flops_per_device" in why


def test_cpu_peak_is_a_measured_matmul(monkeypatch):
    monkeypatch.setattr(throughput, "measured_matmul_peak", lambda: 5e10)
    assert peak_flops_per_device(device=_device("cpu", "cpu")) == (5e10, "measured f32 2048^3 matmul")


def test_windows_give_step_time_rates_and_goodput():
    clock = iter([100.0, 110.0, 115.0, 125.0])  # start, 1st window, 2nd, goodput() at the end
    t = Throughput(tokens_per_step=1000, flops_per_step=2e12, peak_flops=4e12, clock=lambda: next(clock))
    first = t.window(steps=1, applied=1)
    assert first == {"goodput": 0.0, "compile_seconds": 10.0}  # the compile is start-up time
    # 5 s for 4 steps of which 1 skipped, 1 s of it a checkpoint save: 1 s per step
    second = t.window(steps=4, applied=3, overhead=1.0)
    assert second["step_time"] == pytest.approx(1.0)
    assert second["tokens_per_s"] == pytest.approx(1000.0)
    assert second["mfu"] == pytest.approx(0.5)  # 2 TFLOP per 1 s step on 4 TFLOP/s
    assert second["goodput"] == pytest.approx(3.0 / 15.0)  # 3 applied steps x 1 s over 15 s
    assert t.goodput() == pytest.approx(3.0 / 25.0)
    assert t.compile_seconds == 10.0


def test_training_logs_step_time_tokens_mfu_and_goodput(tmp_path):
    task = TrainTask("reg", Regressor(), loss_fn, batch_fn, tokens_per_step=32, flops_per_step=6e6)
    summary = train(task, cfg(6, peak_flops_per_device=1e9), str(tmp_path), progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
    assert "reg/compile_seconds" in lines[0] and "reg/step_time" not in lines[0]
    for line in lines[1:]:
        st = line["reg/step_time"]
        assert st > 0 and line["reg/tokens_per_s"] == pytest.approx(32 / st)
        assert line["reg/mfu"] == pytest.approx(6e6 / st / 1e9)  # one device here
        assert 0 < line["reg/goodput"] < 1
    assert summary["compile_seconds"] > summary["step_time"] > 0
    assert summary["mfu"] == pytest.approx(lines[-1]["reg/mfu"])
