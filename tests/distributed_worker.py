"""Child process of tests/test_distributed.py, started by launch/local_multiprocess.sh.

Joins the job from the environment (``SORA_JAX_COORDINATOR`` / ``_NUM_PROCESSES`` /
``_PROCESS_ID``), runs two cross-process collectives and, on process 0, writes them to the
JSON file named by argv[1]. With argv[2] == "fail-1", process 1 exits with status 3 instead
at once, with no clean-up (``os._exit``, like a crash), and process 0 sleeps: the launcher must
then stop process 0 and exit with 3. (A Python exception would instead wait in JAX's shutdown
barrier for the other processes, up to ``shutdown_timeout_seconds`` = 300 s.)
"""

import json
import os
import sys
import time


def main(out: str, mode: str = "ok") -> None:
    import logging

    from sora_jax.parallel import distributed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    spec = distributed.resolve()
    active = distributed.initialize(spec)
    again = distributed.initialize(spec)  # idempotent: a second call is a no-op

    if mode == "fail-1" and spec.process_id == 1:
        os._exit(3)
    if mode == "fail-1":
        time.sleep(600)  # would hang the test unless the launcher stops this process

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    # 1. allgather of each process's id
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))

    # 2. a global array, one row per device, each process filling its own rows; then a jitted
    #    sum over it (XLA inserts the cross-process reduction)
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    local = np.full((jax.local_device_count(), 2), jax.process_index() + 1, np.float32)
    x = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    total = np.asarray(multihost_utils.process_allgather(total, tiled=True))

    if distributed.is_main_process():
        with open(out, "w") as f:
            json.dump({"ids": np.asarray(ids).tolist(), "total": total.tolist(),
                       "process_count": jax.process_count(), "device_count": jax.device_count(),
                       "local_device_count": jax.local_device_count(),
                       "source": spec.source, "same_spec": active == again == spec,
                       "main_is_0": jax.process_index() == 0}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
