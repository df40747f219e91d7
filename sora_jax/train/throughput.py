"""Step time, tokens/s, MFU and goodput of a training run.

- **MFU** (model FLOPs utilisation; Chowdhery et al. 2022, PaLM, App. B): the model FLOPs of a
  step (3 x forward, remat's recomputation not counted) over step time x devices x the peak
  FLOP/s of one device. The peak comes from, in order: the ``peak_flops_per_device`` config
  value; the data-sheet table of :mod:`sora_jax.parallel.topologies` (dense bf16: TPU v4 275,
  v5e 197, v5p 459, v6e 918; A100 312, H100 989, H200 989 TFLOP/s), matched on the device
  kind; on CPU, the float32 matmul throughput measured when the run starts
  (:func:`measured_matmul_peak`). An unknown accelerator without the config value has no MFU.
- **Goodput** (as in Google's ML Goodput): productive step time over wall time since the
  training call began. Productive: the steady-state time of steps whose update was applied;
  not productive: start-up (restore, compilation: the first step of every invocation),
  checkpoint saves, and steps skipped for a non-finite loss.
"""

from __future__ import annotations

import time

import jax

from sora_jax.parallel.topologies import CHIPS

# device_kind substrings (lower case) -> CHIPS key; the first match wins (v5 lite before v5)
_KINDS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v6 lite", "v6e"), ("v6e", "v6e"),
          ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s (2 n^3 per product) of a jitted float32 ``(n, n) @ (n, n)`` on the default
    device: the CPU's attainable peak, measured rather than looked up."""
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(override: float | None = None, device=None) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where the number comes from (see the module docstring).

    Returns ``(None, reason)`` for an accelerator not in the table when ``override`` is unset.
    """
    if override:
        return float(override), "config peak_flops_per_device"
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak(), "measured f32 2048^3 matmul"
    kind = str(getattr(device, "device_kind", "")).lower()
    for needle, chip in _KINDS:
        if needle in kind:
            return CHIPS[chip].peak_bf16_flops, f"{chip} bf16 data sheet"
    return None, f"device kind {kind!r} not in the peak table; set peak_flops_per_device"


class Throughput:
    """Accumulates step timings between host synchronisations of a training loop.

    The loop calls :meth:`window` at each sync point (after fetching metrics) with the steps
    since the last one, how many were applied (finite), and the seconds spent outside the
    steps (checkpoint saves); the first window of an invocation (it holds the compile) counts
    as start-up, not as productive time.

    Args:
      tokens_per_step: tokens trained per step over all processes (None: no tokens/s).
      flops_per_step: model FLOPs per step over all devices (None: no MFU).
      peak_flops: peak FLOP/s of all devices together (None: no MFU).
      clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, tokens_per_step: float | None = None, flops_per_step: float | None = None,
                 peak_flops: float | None = None, clock=time.perf_counter):
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.productive = 0.0
        self.windows = 0
        self.compile_seconds: float | None = None

    def window(self, steps: int, applied: int, overhead: float = 0.0) -> dict[str, float]:
        """Closes the window ending now; returns its metrics: ``goodput`` and, from the second
        window on, ``step_time`` (s) and where they can be computed ``tokens_per_s`` and ``mfu``;
        the first window gives ``compile_seconds`` instead."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        self.windows += 1
        if self.windows == 1:
            self.compile_seconds = seconds
        step_time = max(seconds - overhead, 1e-9) / max(steps, 1)
        if self.windows > 1:
            self.productive += applied * step_time
        out = {"goodput": self.goodput(now)}
        if self.windows == 1:  # the compile: a start-up time, not a step time
            return dict(out, compile_seconds=seconds)
        out["step_time"] = step_time
        if self.tokens_per_step:
            out["tokens_per_s"] = self.tokens_per_step / step_time
        if self.flops_per_step and self.peak_flops:
            out["mfu"] = self.flops_per_step / step_time / self.peak_flops
        return out

    def goodput(self, now: float | None = None) -> float:
        """Productive step time / wall time since this object was made."""
        wall = (self.clock() if now is None else now) - self.start
        return self.productive / wall if wall > 0 else 0.0
