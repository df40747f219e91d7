"""Multi-host initialisation: find this process's place in the job, then ``jax.distributed``.

A multi-host JAX job is N processes (one per host, or one per GPU) that each call
``jax.distributed.initialize(coordinator_address, num_processes, process_id)`` before any other
JAX work; process 0 runs the coordinator service at ``coordinator_address`` and the others
connect to it. :func:`resolve` works those values out from the command line or the
environment, :func:`initialize` starts ``jax.distributed`` with them.

Where the values come from, first match wins (:func:`resolve`):

1. ``"flags"``: the CLI flags ``--coordinator-address host:port``, ``--num-processes N``,
   ``--process-id I`` (all three, or none).
2. ``"env:SORA_JAX"``: our environment variables, all three or none
   (``launch/local_multiprocess.sh`` sets them)::

     SORA_JAX_COORDINATOR=host:port  SORA_JAX_NUM_PROCESSES=N  SORA_JAX_PROCESS_ID=I

3. ``"slurm"``: a task started by ``srun`` (``SLURM_PROCID`` is set). SLURM's task environment
   (https://slurm.schedmd.com/srun.html#SECTION_OUTPUT-ENVIRONMENT-VARIABLES) gives
   ``SLURM_NTASKS`` (number of processes), ``SLURM_PROCID`` (this process) and
   ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``; the hosts, compressed as in
   ``node[01-04,07],gpu5``); the coordinator is the first host of that list, on port
   ``SORA_JAX_COORDINATOR_PORT`` (default 8476; ``launch/slurm.sbatch`` derives one from the job
   id so that two jobs sharing a node do not collide). Local devices:

   - one task per node (``--ntasks-per-node=1``, the recommended layout, ``SLURM_NTASKS`` equal
     to the node count ``SLURM_STEP_NUM_NODES`` / ``SLURM_JOB_NUM_NODES`` / ``SLURM_NNODES``):
     the process sees every GPU of its node;
   - one task per GPU (more tasks than nodes, ``--ntasks-per-node=<GPUs>``): task
     ``SLURM_LOCALID`` (its index on its node) uses only GPU ``SLURM_LOCALID``, unless SLURM
     already bound one GPU to it (``--gpus-per-task=1``: ``CUDA_VISIBLE_DEVICES`` names a
     single GPU), when it uses that one.

   A shell inside ``salloc`` has ``SLURM_NTASKS`` but no ``SLURM_PROCID``: it is a single
   process. Run ``sora-jax`` under ``srun``, not directly in the batch script (whose lone
   process has ``SLURM_PROCID=0`` too, and would wait for the other tasks until it times out).
4. ``"tpu"``: a Cloud TPU VM or GKE pod; JAX finds everything itself
   (``jax.distributed.initialize()`` without arguments reads the TPU VM metadata server or the
   GKE environment). Detected by any of ``TPU_WORKER_HOSTNAMES``, ``TPU_PROCESS_ADDRESSES``,
   ``TPU_WORKER_ID`` (set by GKE in TPU pods), ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice),
   ``CLOUD_TPU_TASK_ID``, or forced with ``SORA_JAX_DISTRIBUTED=auto``. A TPU VM created with
   ``gcloud compute tpus tpu-vm create`` keeps these values in its metadata server, not in the
   environment: ``launch/tpu_pod.sh`` therefore sets ``SORA_JAX_DISTRIBUTED=auto``.
5. ``"single"``: none of the above (or ``SORA_JAX_DISTRIBUTED=off``): one process, nothing to
   initialise.

``SORA_JAX_LOCAL_DEVICE_IDS=0,1`` (or ``local_device_ids`` in the flags) restricts the devices
this process uses, for any multi-process source. Empty variables count as unset.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

SOURCES = ("flags", "env:SORA_JAX", "slurm", "tpu", "single")
DEFAULT_COORDINATOR_PORT = 8476

ENV_COORDINATOR = "SORA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "SORA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SORA_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SORA_JAX_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "SORA_JAX_COORDINATOR_PORT"
ENV_DISTRIBUTED = "SORA_JAX_DISTRIBUTED"

# set on Cloud TPU VMs / GKE TPU pods (jax._src.clusters.cloud_tpu_cluster reads the same)
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")

FLAG_NAMES = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
              "process_id": "--process-id", "local_device_ids": "local_device_ids"}


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """Where this process sits in a (possibly multi-host) JAX job.

    Attributes:
      coordinator_address: ``"host:port"`` of process 0's coordinator service; None for a
        single process and for ``source="tpu"`` (JAX finds it).
      num_processes: number of processes in the job (1 for a single process); None for
        ``source="tpu"`` until :func:`initialize` fills it in.
      process_id: this process, in ``[0, num_processes)``; None as for ``num_processes``.
      local_device_ids: the local device ids this process may use, or None for all of them.
      source: where the values came from: one of :data:`SOURCES`.
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    source: str

    @property
    def is_multi_process(self) -> bool:
        """True when ``jax.distributed`` must be initialised (more than one process, or TPU/GKE
        where JAX counts the processes itself)."""
        return self.source == "tpu" or (self.num_processes or 1) > 1


SINGLE = DistributedSpec(None, 1, 0, None, "single")

_active: DistributedSpec | None = None


# ----------------------------------------------------------------------------- parsing helpers

def _set(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        out = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def _port(value: Any, name: str) -> int:
    port = _int(value, name, 1)
    if port > 65535:
        raise ValueError(f"{name} must be a port in [1, 65535], got {port}")
    return port


def _address(value: Any, name: str) -> str:
    """``host:port`` (an IPv6 host in brackets: ``[::1]:1234``)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{name} must look like host:port, got {value!r}")
    host, port = value.strip().rsplit(":", 1)
    if not host or host == "[]" or (":" in host and not host.startswith("[")):
        raise ValueError(f"{name} must look like host:port, got {value!r}")
    _port(port, f"{name} (port)")
    return f"{host}:{int(port)}"


def _device_ids(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        items = value.replace(" ", "").split(",")
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ValueError(f"{name} must be a comma-separated list of device ids, got {value!r}")
    if not items or any(v == "" for v in items):
        raise ValueError(f"{name} must be a comma-separated list of device ids, got {value!r}")
    ids = tuple(_int(v, name, 0) for v in items)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} repeats a device id: {value!r}")
    return ids


def _triple(values: Mapping[str, Any], names: Mapping[str, str], source: str,
            local_device_ids: tuple[int, ...] | None) -> DistributedSpec:
    """A spec from coordinator/num_processes/process_id that must all be set; ``names`` gives
    the user-facing name of each key for error messages."""
    missing = [names[k] for k in ("coordinator_address", "num_processes", "process_id")
               if not _set(values.get(k))]
    if missing:
        given = [names[k] for k in ("coordinator_address", "num_processes", "process_id")
                 if _set(values.get(k))]
        raise ValueError(f"{', '.join(given)} given but {', '.join(missing)} missing: a "
                         "multi-process job needs the coordinator address, the number of "
                         "processes and this process's id")
    address = _address(values["coordinator_address"], names["coordinator_address"])
    n = _int(values["num_processes"], names["num_processes"], 1)
    i = _int(values["process_id"], names["process_id"], 0)
    if i >= n:
        raise ValueError(f"{names['process_id']}={i} must be < {names['num_processes']}={n}")
    return DistributedSpec(address, n, i, local_device_ids, source)


# ----------------------------------------------------------------------------- SLURM

def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM host list.

    SLURM compresses host lists (``SLURM_JOB_NODELIST``, ``SLURM_STEP_NODELIST``; see
    ``scontrol show hostnames``) as comma-separated items, each a plain name or a prefix with a
    bracketed list of numbers and zero-padded ranges: ``node[01-04,07],gpu5`` is node01, node02,
    node03, node04, node07, gpu5, whose first host is ``node01``. A name may hold several
    bracket groups (``rack[1-2]-node[3-4]`` -> ``rack1-node3``).

    Raises:
      ValueError: an empty list or unbalanced brackets.
    """
    text = nodelist.strip()
    # the first top-level item: up to the first comma outside brackets
    depth, end = 0, len(text)
    for k, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                break
        elif ch == "," and depth == 0:
            end = k
            break
    if depth != 0:
        raise ValueError(f"SLURM node list has unbalanced brackets: {nodelist!r}")
    item = text[:end]
    if not item:
        raise ValueError(f"SLURM node list is empty: {nodelist!r}")

    def first(match: re.Match) -> str:
        inner = match.group(1).split(",")[0].strip()
        if not inner:
            raise ValueError(f"SLURM node list has an empty bracket: {nodelist!r}")
        return inner.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first, item)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"SLURM node list is malformed: {nodelist!r}")
    return host


def _slurm(env: Mapping[str, str], local_device_ids: tuple[int, ...] | None) -> DistributedSpec:
    if not _set(env.get("SLURM_NTASKS")):
        raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is missing: run sora-jax under srun")
    n = _int(env["SLURM_NTASKS"], "SLURM_NTASKS", 1)
    i = _int(env["SLURM_PROCID"], "SLURM_PROCID", 0)
    if i >= n:
        raise ValueError(f"SLURM_PROCID={i} must be < SLURM_NTASKS={n}")
    if n == 1:
        if local_device_ids is not None:
            raise ValueError(f"{ENV_LOCAL_DEVICE_IDS} is set but SLURM_NTASKS=1 (a single process "
                             "uses every visible device; use CUDA_VISIBLE_DEVICES)")
        return DistributedSpec(None, 1, 0, None, "slurm")
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if _set(env.get(v))), None)
    if nodelist_var is None:
        raise ValueError("SLURM_NTASKS > 1 but SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are "
                         "missing: cannot find the coordinator host")
    try:
        host = first_slurm_host(env[nodelist_var])
    except ValueError as e:
        raise ValueError(f"{nodelist_var}: {e}") from None
    port = (_port(env[ENV_COORDINATOR_PORT], ENV_COORDINATOR_PORT)
            if _set(env.get(ENV_COORDINATOR_PORT)) else DEFAULT_COORDINATOR_PORT)
    if local_device_ids is None:
        nodes_var = next((v for v in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
                          if _set(env.get(v))), None)
        nodes = _int(env[nodes_var], nodes_var, 1) if nodes_var else None
        local = _int(env["SLURM_LOCALID"], "SLURM_LOCALID", 0) if _set(env.get("SLURM_LOCALID")) else None
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if local is not None and (local > 0 or (nodes is not None and n > nodes)) and len(visible) != 1:
            local_device_ids = (local,)  # one task per GPU, each task seeing all of them
    return DistributedSpec(f"{host}:{port}", n, i, local_device_ids, "slurm")


# ----------------------------------------------------------------------------- resolve

def resolve(flags: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> DistributedSpec:
    """This process's :class:`DistributedSpec`, from flags, then the environment (see the module
    docstring for the order and for where each variable comes from). Reads nothing else: a pure
    function of its arguments.

    Args:
      flags: ``{"coordinator_address": "host:port", "num_processes": int | str,
        "process_id": int | str}`` and optionally ``"local_device_ids"`` (``"0,1"`` or a
        sequence of ints); None values count as not given. Other keys are an error.
      environ: the environment (default ``os.environ``).

    Returns:
      The spec; ``source`` says which of :data:`SOURCES` supplied it.

    Raises:
      ValueError: partial or contradictory settings, naming the flag or variable: some but not
        all of coordinator / number of processes / process id; a process id >= the number of
        processes; a non-integer or negative number; an address that is not ``host:port``; a
        malformed SLURM node list; ``SORA_JAX_DISTRIBUTED`` other than ``auto`` / ``off``, or
        set together with ``SORA_JAX_COORDINATOR``...; ``SORA_JAX_LOCAL_DEVICE_IDS`` for a
        single process; unknown flag keys.
    """
    flags = dict(flags or {})
    env = os.environ if environ is None else environ
    unknown = set(flags) - set(FLAG_NAMES)
    if unknown:
        raise ValueError(f"unknown distributed flags {sorted(unknown)}; known: {sorted(FLAG_NAMES)}")

    local_device_ids = None
    if _set(flags.get("local_device_ids")):
        local_device_ids = _device_ids(flags["local_device_ids"], FLAG_NAMES["local_device_ids"])
    elif _set(env.get(ENV_LOCAL_DEVICE_IDS)):
        local_device_ids = _device_ids(env[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS)

    # 1. explicit flags
    if any(_set(flags.get(k)) for k in ("coordinator_address", "num_processes", "process_id")):
        return _triple(flags, FLAG_NAMES, "flags", local_device_ids)

    # 2. our environment variables
    ours = {"coordinator_address": env.get(ENV_COORDINATOR), "num_processes": env.get(ENV_NUM_PROCESSES),
            "process_id": env.get(ENV_PROCESS_ID)}
    mode = (env.get(ENV_DISTRIBUTED) or "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{ENV_DISTRIBUTED} must be 'auto' or 'off', got {env[ENV_DISTRIBUTED]!r}")
    if any(_set(v) for v in ours.values()):
        if mode:
            raise ValueError(f"{ENV_DISTRIBUTED}={mode} contradicts {ENV_COORDINATOR} / "
                             f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}: set one or the other")
        names = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
                 "process_id": ENV_PROCESS_ID}
        return _triple(ours, names, "env:SORA_JAX", local_device_ids)

    if mode == "off":
        if local_device_ids is not None:
            raise ValueError(f"{ENV_LOCAL_DEVICE_IDS} is set but {ENV_DISTRIBUTED}=off (a single "
                             "process uses every visible device; use CUDA_VISIBLE_DEVICES)")
        return SINGLE
    if mode == "auto":
        return DistributedSpec(None, None, None, local_device_ids, "tpu")

    # 3. SLURM (a task of srun)
    if _set(env.get("SLURM_PROCID")):
        return _slurm(env, local_device_ids)

    # 4. Cloud TPU VM / GKE: JAX detects the rest
    if any(_set(env.get(v)) for v in TPU_ENV_VARS):
        return DistributedSpec(None, None, None, local_device_ids, "tpu")

    # 5. one process
    if local_device_ids is not None:
        raise ValueError(f"{ENV_LOCAL_DEVICE_IDS} is set but no multi-process job was found "
                         f"(set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or run "
                         "under srun); a single process uses every visible device")
    return SINGLE


# ----------------------------------------------------------------------------- initialize

def initialize(spec: DistributedSpec) -> DistributedSpec:
    """Starts ``jax.distributed`` for ``spec`` (nothing for a single process); returns the spec
    in force, with ``num_processes`` / ``process_id`` filled in for ``source="tpu"``.

    Must be called before any other JAX computation in the process (anything that creates the
    XLA backend: ``jax.devices()``, ``jnp.zeros``, a jitted call): JAX fixes the process set
    when the backend starts. Idempotent: a second call does nothing and returns the first
    call's spec (a different ``spec`` is logged as ignored). Process 0 logs one line: the spec,
    ``jax.process_count()``, ``jax.device_count()`` and ``jax.local_device_count()``.

    For specs we resolved ourselves (flags / env / SLURM) JAX's own cluster auto-detection is
    turned off (``cluster_detection_method="deactivate"``): under SLURM it would otherwise
    restrict a one-task-per-node process to a single GPU. ``source="tpu"`` calls
    ``jax.distributed.initialize()`` without arguments, so JAX reads the TPU VM metadata or the
    GKE environment itself.

    Raises:
      RuntimeError: the JAX backend was already started (some JAX computation ran first), or
        ``jax.distributed`` failed (e.g. the coordinator could not be reached in time).
    """
    global _active
    if _active is not None:
        if spec != _active and dataclasses.replace(spec, num_processes=_active.num_processes,
                                                   process_id=_active.process_id) != _active:
            logger.warning("distributed already initialised with %s; ignoring %s", _active, spec)
        return _active

    import jax

    if spec.is_multi_process and not jax.distributed.is_initialized():
        try:
            if spec.source == "tpu":
                kwargs = {"local_device_ids": list(spec.local_device_ids)} if spec.local_device_ids else {}
                jax.distributed.initialize(**kwargs)
            else:
                jax.distributed.initialize(
                    coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                    process_id=spec.process_id,
                    local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
                    cluster_detection_method="deactivate")
        except RuntimeError as e:
            raise RuntimeError(f"jax.distributed.initialize failed for {spec}: {e} "
                               "(initialise before any other JAX call)") from e
        if spec.source == "tpu":
            spec = dataclasses.replace(spec, num_processes=jax.process_count(),
                                       process_id=jax.process_index())
    _active = spec
    if jax.process_index() == 0:
        logger.info("distributed: %s source=%s coordinator=%s local_device_ids=%s processes=%d "
                    "devices=%d local_devices=%d",
                    "multi-process" if spec.is_multi_process else "single process", spec.source,
                    spec.coordinator_address, spec.local_device_ids, jax.process_count(),
                    jax.device_count(), jax.local_device_count())
    return spec


def active_spec() -> DistributedSpec | None:
    """The spec :func:`initialize` put in force, or None before it ran."""
    return _active


def is_main_process() -> bool:
    """True on process 0 (``jax.process_index() == 0``): the one process that logs, writes
    metrics and prints results. Every process still takes part in collectives and in Orbax
    checkpoint saves."""
    import jax

    return jax.process_index() == 0


def main_process_first(fn, name: str):
    """Runs ``fn()`` on process 0 alone, then holds every process at a barrier until it is done:
    for work whose files all processes then read (encoding a dataset once, writing a config).

    Returns ``fn()``'s value on process 0 and None on the others. With one process, just
    ``fn()``. If ``fn`` raises on process 0 the others stay at the barrier until the job is
    stopped (the launchers stop every process when one fails).
    """
    import jax

    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"sora_jax:{name}")
    return out
