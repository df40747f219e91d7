"""A small training run for the kill-and-resume tests (``tests/test_resilience.py``).

``python tests/train_worker.py WORKDIR STEPS [SLEEP_S]``: trains the regressor of
``tests/test_train.py`` for STEPS steps (checkpoint every 2, metrics every step), sleeping
SLEEP_S per batch so a test can signal it mid-run. Exits 143 when preempted by SIGTERM.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sora_jax.configs.common import train_section  # noqa: E402
from sora_jax.train.trainer import Preempted, TrainTask, train  # noqa: E402
from tests.test_train import Regressor, batch_fn, loss_fn  # noqa: E402


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

    def slow_batches(step):
        time.sleep(sleep)
        return batch_fn(step)

    cfg = train_section(steps=steps, learning_rate=1e-2, warmup_steps=2, log_every=1, checkpoint_every=2,
                        max_to_keep=3)
    try:
        train(TrainTask("reg", Regressor(), loss_fn, slow_batches), cfg, workdir, progress=False)
    except Preempted:
        sys.exit(143)


if __name__ == "__main__":
    main()
