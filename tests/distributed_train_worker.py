"""A tiny DiT training run for the multi-process tests (``tests/test_multiprocess_train.py``).

``python tests/distributed_train_worker.py WORKDIR STEPS [SLEEP_S]``, run alone (one process,
its simulated devices from XLA_FLAGS) or by ``launch/local_multiprocess.sh`` (joins the job
from the ``SORA_JAX_*`` variables). Trains with ``sora_jax.train.trainer.train`` on an FSDP
mesh over every device of every process (parameters and optimizer state sharded across the
processes), global batch of 8 packed rows of which each process feeds its own, checkpoint
every 2 steps, metrics every step. Writes ``WORKDIR/pid_<process>`` (for tests that signal
one process) and, on process 0, ``WORKDIR/summary.json``. Sleeps SLEEP_S per batch. Exits
143 when preempted by SIGTERM.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

    import logging

    from sora_jax.parallel import distributed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    distributed.initialize(distributed.resolve())

    import jax
    from flax import nnx

    import ml_collections
    from sora_jax.configs.common import train_section
    from sora_jax.models.dit import DiT
    from sora_jax.parallel.mesh import create_mesh
    from sora_jax.train.steps import dit_loss_fn
    from sora_jax.train.trainer import Preempted, TrainTask, train
    from tests.multidevice_checks import batch

    pi, pc = jax.process_index(), jax.process_count()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"pid_{pi}"), "w") as f:
        f.write(str(os.getpid()))

    def rows(step):  # this process's rows of the global batch of 8
        time.sleep(sleep)
        n = 8 // pc
        return {k: v[pi * n:(pi + 1) * n] for k, v in batch(step).items()}

    model = DiT(in_dim=16, hidden_size=64, depth=2, num_heads=4, text_dim=32, rngs=nnx.Rngs(0))
    flow = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, base_tokens=48, max_shift=3.0,
                                          caption_dropout=0.1, loss_weighting="per_token"))
    cfg = train_section(steps=steps, learning_rate=1e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                        max_to_keep=5)
    mesh = create_mesh(dict(ici=dict(fsdp=-1), dcn=dict(fsdp=-1)))
    task = TrainTask("dit", model, dit_loss_fn(flow), rows, tokens_per_step=8 * 64)
    try:
        summary = train(task, cfg, workdir, progress=False, mesh=mesh)
    except Preempted:
        sys.exit(143)
    if pi == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(dict(summary, process_count=pc, device_count=jax.device_count()), f)


if __name__ == "__main__":
    main()
