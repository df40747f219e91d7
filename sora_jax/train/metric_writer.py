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


def _truncate_after(path: str, step: int):
    """Drops the rows of a ``metrics.jsonl`` logged after ``step`` (atomic rewrite)."""
    if not os.path.isfile(path):
        return

    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a row cut short by the crash
            return False

    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if logged_by_then(line)]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class MetricWriter:
    """Writes scalars to ``<logdir>/events.out.tfevents.*`` and ``<logdir>/metrics.jsonl``.

    Only the first JAX process writes, so multi-host runs log once.

    A run resumed from a checkpoint at ``resume_step`` logs each step once: rows of
    ``metrics.jsonl`` after it (logged by the run that died before its next checkpoint) are
    dropped, and the new TensorBoard event file starts with TensorBoard's purge marker (a
    ``SessionLog.START`` at ``resume_step + 1``), so TensorBoard discards the older files'
    events from that step on.

    Args:
      logdir: folder of the event files and ``metrics.jsonl`` (created).
      enabled: False: write nothing (processes other than 0).
      resume_step: the step the run restored (0: a fresh run).
    """

    def __init__(self, logdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.logdir = logdir
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported late: it is slow to import

            os.makedirs(logdir, exist_ok=True)
            path = os.path.join(logdir, "metrics.jsonl")
            _truncate_after(path, resume_step)
            # The suffix orders event files of one second by their restored step (TensorBoard
            # reads them in name order, and purges by that order).
            self._tb = SummaryWriter(logdir, purge_step=resume_step + 1,
                                     filename_suffix=f".{resume_step:010d}")
            self._jsonl = open(path, "a", buffering=1)

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
