"""Training metrics: TensorBoard event files (via tensorboardX) and a JSON-lines log.

tensorboardX writes TensorBoard's event format without TensorFlow; clu's metric writers import
TensorFlow, which this project does not otherwise need (the same choice maxtext makes).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


class MetricWriter:
    """Writes scalars to ``<logdir>/events.out.tfevents.*`` and ``<logdir>/metrics.jsonl``.

    Only the first JAX process writes, so multi-host runs log once.
    """

    def __init__(self, logdir: str, *, enabled: bool = True):
        self.logdir = logdir
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported late: it is slow to import

            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir)
            self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", buffering=1)

    def write_scalars(self, step: int, scalars: dict[str, Any]):
        """Logs ``{name: scalar}`` at ``step`` (arrays are converted with ``float``)."""
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")

    def flush(self):
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False
