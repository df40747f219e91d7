"""The one training loop, shared by the VAE and the DiT.

A :class:`TrainTask` says what is trained (a model, a loss, its batches); ``train`` does the
rest: optax optimizer, jitted step, resume from the latest Orbax checkpoint, TensorBoard and
JSON metrics, tqdm progress. Random keys are functions of the step number, and batches are
either functions of the step (``batch_fn``) or come from a Grain iterator whose state is saved
in every checkpoint (``dataset``), so a resumed run sees exactly the data and noise it would
have seen without the interruption.

The step is compiled once per distinct batch shape; ``train`` counts the traces of its step
function and reports them as ``train_step_compiles`` (packed batches have one shape, so 1).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.models.mup import scale_by_multipliers
from sora_jax.parallel.axes import DEFAULT_RULES
from sora_jax.parallel.mesh import describe
from sora_jax.parallel.sharding import (activate, place, place_objects, shard_batch,
                                        state_shardings)
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.ema import EMA
from sora_jax.train.host_memory import release_free_host_memory
from sora_jax.train.metric_writer import MetricWriter
from sora_jax.train.throughput import Throughput, peak_flops_per_device

log = logging.getLogger("sora_jax.train")

Batch = dict[str, np.ndarray]
LossFn = Callable[[nnx.Module, Batch, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
OptimizerFn = Callable[[ml_collections.ConfigDict], tuple[optax.GradientTransformation, optax.Schedule]]


@dataclasses.dataclass
class TrainTask:
    """What one training run optimises.

    Attributes:
      name: run name used in logs ("vae", "dit").
      model: the NNX module to train (updated in place).
      loss_fn: ``(model, batch, key, step) -> (scalar loss, {name: scalar})``, traced under
        ``jax.jit``; ``step`` is the int32 scalar array of the step being taken (0-based), for
        losses whose terms switch on or change with training time.
      batch_fn: ``step -> batch`` (dict of numpy arrays), deterministic in ``step``; or None
        when ``dataset`` is given.
      meta: JSON-serialisable facts stored with every checkpoint (e.g. the config).
      dataset: an iterable (e.g. ``grain.IterDataset``) whose iterator has ``get_state()`` and
        ``set_state(state)`` (JSON-serialisable state); used instead of ``batch_fn``.
      optimizer_fn: ``train config -> (optax transformation, learning-rate schedule)`` over the
        model's ``nnx.Param`` tree; None: ``make_optimizer``. Lets a task give parts of its
        model their own transformations (e.g. a GAN discriminator with its own clipping).
      on_finish: called once with ``model`` after the last step has run in this invocation, once
        the trained state is in the model and before the final checkpoint is written, so what
        it stores in the model's variables (e.g. latent statistics) is saved with it. Not
        called when a run resumes at its final step and so trains nothing.
      tokens_per_step: tokens in one global batch (all processes), for the ``tokens_per_s``
        metric; None: not reported.
      flops_per_step: model FLOPs of one step over the global batch (3 x forward), for the
        ``mfu`` metric (:mod:`sora_jax.train.throughput`); None: not reported.
      ema: set by ``train`` when its config enables an EMA (``ema.profile`` not "none"): the
        :class:`sora_jax.train.ema.EMA` of ``model``, as trained (``ema.weights`` is a model).
    """

    name: str
    model: nnx.Module
    loss_fn: LossFn
    batch_fn: Callable[[int], Batch] | None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: Any = None
    optimizer_fn: OptimizerFn | None = None
    on_finish: Callable[[nnx.Module], None] | None = None
    tokens_per_step: float | None = None
    flops_per_step: float | None = None
    ema: Any = None


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint at ``step``; rerun to resume."""

    def __init__(self, name: str, step: int):
        super().__init__(f"{name}: stopped by SIGTERM at step {step}; checkpoint saved, rerun "
                         "the same command to resume")
        self.step = step


class _Preemption:
    """Whether to stop after a step because a preemption notice (SIGTERM) arrived.

    In a ``jax.distributed`` job JAX's preemption notifier catches SIGTERM on any process and
    its sync manager agrees on one step at which every process sees the notice (Orbax's
    ``CheckpointManager.reached_preemption``): no per-step host synchronisation, and every
    process stops at the same step. A Python handler would replace JAX's, so none is installed
    there. A single process sets a flag from its own SIGTERM handler (main thread only;
    elsewhere inert).
    """

    def __init__(self, ckpt: Checkpointer):
        self.ckpt, self.event, self.previous = ckpt, threading.Event(), None
        self.synced = jax.distributed.is_initialized()

    def __enter__(self):
        if not self.synced and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def reached(self, step: int) -> bool:
        """True once at the step where the run stops (call after every step, in order)."""
        return self.ckpt.reached_preemption(step) if self.synced else self.event.is_set()


class _TraceWindow:
    """A ``jax.profiler`` trace of steps [start, start + steps) into ``logdir`` (TensorBoard's
    profile plugin reads ``logdir/plugins/profile``); steps == 0: no trace. Every step is a
    ``StepTraceAnnotation`` in it."""

    def __init__(self, logdir: str, start: int, steps: int):
        self.logdir, self.start, self.stop, self.active = logdir, start, start + steps, False
        self.enabled = steps > 0

    def before(self, i: int):
        if self.enabled and i == self.start:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, i: int, out):
        if self.active and i + 1 >= self.stop:
            jax.block_until_ready(out)  # the traced steps' device work, not only their dispatch
            self.close()

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.start, self.stop - 1, self.logdir)


def _restore_latest(ckpt: Checkpointer, task: "TrainTask", optimizer, ema=None) -> tuple[int, Any]:
    """Restores the newest readable checkpoint; unreadable newer ones are quarantined.

    Newer checkpoints are renamed ``<step>.corrupt`` only once an older one has restored:
    when none can be read (e.g. the model config changed), nothing is moved and the error of
    the newest is raised, so fixing the cause and rerunning loses nothing.

    Returns (step, data iterator state), or (0, None) when there is no checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none of them can be read.
    """
    steps, failed = ckpt.all_steps(), []
    for step in steps:
        try:
            meta = ckpt.restore(task.model, optimizer, step=step, ema=ema)
            data_state = ckpt.restore_data_state(step)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the one before
            failed.append((step, e))
            continue
        for bad, e in failed:
            moved = ckpt.quarantine(bad)
            log.warning("%s: checkpoint %d is unreadable (%s: %s); moved to %s", task.name, bad,
                        type(e).__name__, str(e)[:200], moved)
        log.info("%s: resumed from step %d (%s)", task.name, int(meta["step"]), ckpt.directory)
        if meta.get("optimizer_restored") is False:
            log.warning("%s: checkpoint %d holds no optimizer state (imported weights?): training "
                        "continues from its weights with a fresh optimizer", task.name, int(meta["step"]))
        if meta.get("ema_restored") is False:
            log.warning("%s: checkpoint %d holds no EMA of the weights (written without one); the "
                        "average starts from its weights", task.name, int(meta["step"]))
        return int(meta["step"]), data_state
    if failed:
        step, e = failed[0]
        raise RuntimeError(f"{task.name}: none of the checkpoints {steps} in {ckpt.directory} can "
                           f"be read; the newest ({step}) fails with {type(e).__name__}: {e}") from e
    return 0, None


class _Batches:
    """One interface over both batch sources: ``next() -> (batch, state after it)``."""

    def __init__(self, task: TrainTask, start: int, state: dict[str, Any] | None):
        if (task.batch_fn is None) == (task.dataset is None):
            raise ValueError(f"{task.name}: give exactly one of batch_fn and dataset")
        self.batch_fn, self.step = task.batch_fn, start
        self.iterator = None
        if task.dataset is not None:
            self.iterator = iter(task.dataset)
            if state is not None:
                self.iterator.set_state(state)
            elif start > 0:
                raise ValueError(f"{task.name}: checkpoint at step {start} holds no data "
                                 "iterator state; cannot resume the input pipeline exactly")

    def close(self):
        """Stops the input pipeline's worker processes, if it has any."""
        if self.iterator is not None and hasattr(self.iterator, "close"):
            self.iterator.close()

    def next(self) -> tuple[Batch, dict[str, Any] | None]:
        if self.iterator is None:
            batch = self.batch_fn(self.step)
            self.step += 1
            return batch, None
        return next(self.iterator), self.iterator.get_state()


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up then cosine decay to ``learning_rate * min_lr_ratio`` at ``steps``, from a
    ``train`` config (``learning_rate``, ``warmup_steps``, ``steps``, ``min_lr_ratio``)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=max(1, min(cfg.warmup_steps, cfg.steps - 1)),
        decay_steps=max(2, cfg.steps),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def clipped_adamw(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip``) then AdamW (``b1``, ``b2``, ``weight_decay``) at
    ``schedule``; the norm is over whatever tree the transformation is applied to."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )


def make_optimizer(cfg: ml_collections.ConfigDict,
                   lr_multipliers: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, cosine decay and global-norm clipping, from a ``train`` config.

    Fields: ``learning_rate``, ``warmup_steps``, ``steps``, ``weight_decay``, ``grad_clip``,
    ``b1``, ``b2``, ``min_lr_ratio``. Returns the transformation and its learning-rate schedule.

    ``lr_multipliers``: None, or a tree of per-parameter learning-rate multipliers (Python floats)
    with the structure of the model's ``nnx.Param`` state, e.g. μP's
    (:func:`sora_jax.models.mup.lr_multipliers`): each AdamW update, decoupled weight decay
    included, is multiplied by its parameter's multiplier (clipping still sees the raw gradients).
    None: the plain transformation, unchanged.
    """
    schedule = make_schedule(cfg)
    tx = clipped_adamw(cfg, schedule)
    if lr_multipliers is not None:
        tx = optax.chain(tx, scale_by_multipliers(lr_multipliers))
    return tx, schedule


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` behind ``optax.apply_if_finite``: a step whose gradients are not all finite
    applies a zero update and leaves ``tx``'s state (its step count included) unchanged; the
    wrapper's state counts such steps (``last_finite``, ``notfinite_count``,
    ``total_notfinite``). It never gives in and applies one (``max_consecutive_errors`` is
    the int32 maximum): the loop stops the run at ``train.nonfinite_limit`` instead.

    A non-finite loss whose gradients are finite (a term with no gradient) is not skipped;
    any term that reaches the parameters makes their gradients non-finite with it.
    """
    return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)


class TrainStep:
    """The jitted optimizer step: ``step(batch, i) -> metrics``, updating its state in place.

    Holds the split (model, optimizer) state between calls (donated to each call, so updates
    happen in place on device); ``sync()`` writes it back into the NNX objects (before a
    checkpoint or at the end). The random key of step i is ``fold_in(key(seed), i)``, so it
    depends on the step number only. ``compiles`` counts traces of the step function: XLA
    compiles it once per distinct batch shape / dtype signature.

    The ``nonfinite`` metric is 1 on a step whose gradients were not all finite: with an
    optimizer wrapped by :func:`skip_nonfinite` (as ``train`` wraps every one) that step left
    the parameters and optimizer state unchanged; with any other optimizer it is only reported.

    Args:
      model: the module to train.
      optimizer: ``nnx.Optimizer`` over ``model``.
      loss_fn: ``(model, batch, key, step) -> (scalar loss, {name: scalar})``; ``step`` is the
        int32 scalar array ``i``.
      schedule: learning-rate schedule (reported as the ``learning_rate`` metric).
      seed: base of the per-step keys.
      mesh: optional device mesh (:func:`sora_jax.parallel.mesh.create_mesh`). With it, the
        model and optimizer state are placed by their logical axis names and ``rules``
        (:func:`sora_jax.parallel.sharding.state_shardings`), each batch is assembled from
        this process's rows into a global array sharded over the batch axes
        (:func:`sora_jax.parallel.sharding.shard_batch`), and activations follow the
        model's ``constrain`` calls. Without it, everything lives on the default device.
      rules: logical-axis rules for ``mesh`` (default :data:`sora_jax.parallel.axes.DEFAULT_RULES`).
      ema: optional :class:`sora_jax.train.ema.EMA` of ``model``, updated after every applied
        optimizer step (not after a skipped non-finite one); part of the donated state, and
        sharded like the parameters on a mesh.
    """

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn,
                 schedule: optax.Schedule, seed: int, mesh=None, rules=None, ema: EMA | None = None):
        self._objects = (model, optimizer) if ema is None else (model, optimizer, ema)
        graphdef, self.state = nnx.split(self._objects)
        base_key = jax.random.key(seed)
        self.compiles = 0
        self._compiled = {}  # batch signature -> jax.stages.Compiled
        self.mesh, self.rules = mesh, (DEFAULT_RULES if rules is None else rules)

        def step_fn(state, batch, step):
            self.compiles += 1  # runs only while tracing: one count per compilation
            model, opt, *averaged = nnx.merge(graphdef, state)
            key = jax.random.fold_in(base_key, step)
            (loss, aux), grads = nnx.value_and_grad(
                lambda m: loss_fn(m, batch, key, step), has_aux=True
            )(model)
            grad_norm = optax.tree.norm(grads)
            opt.update(model, grads)
            if isinstance(opt.opt_state, optax.ApplyIfFiniteState):
                # skip_nonfinite's optimizer applied a zero update and kept its state
                finite = opt.opt_state.last_finite[...]
            else:
                finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            for ema in averaged:
                ema.update(model, finite)
            aux = dict(aux, loss=loss, grad_norm=grad_norm, learning_rate=schedule(step),
                       nonfinite=1.0 - finite.astype(jnp.float32))
            return nnx.state((model, opt, *averaged)), aux

        if mesh is None:
            self._jit = jax.jit(step_fn, donate_argnums=(0,))
        else:
            shardings = state_shardings(self.state, mesh, self.rules)
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.state)):
                # abstract objects (nnx.eval_shape): only for lower(), e.g. ahead-of-time compiles
                self.state = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)
            else:
                self.state = place(self.state, shardings)
            self._jit = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(shardings, None))

    def lower(self, batch: Batch):
        """``jax.jit(...).lower`` of the step for ``batch`` (arrays or ShapeDtypeStructs with
        shardings): ``.compile()`` it for ``memory_analysis()`` / ``cost_analysis()``."""
        step = jax.ShapeDtypeStruct((), jnp.int32)
        if self.mesh is None:
            return self._jit.lower(self.state, batch, step)
        with activate(self.mesh, self.rules):
            return self._jit.lower(self.state, batch, step)

    def _executable(self, batch):
        """The compiled step for this batch's shapes and dtypes, compiled on first sight.

        Compiled ahead of time (:meth:`lower`) rather than by the first jitted call, so the
        memory the compiler freed goes back to the OS before the step first runs
        (:mod:`sora_jax.train.host_memory`; the same program either way).
        """
        key = tuple((jax.tree_util.keystr(path), np.shape(x), str(getattr(x, "dtype", type(x))))
                    for path, x in jax.tree_util.tree_leaves_with_path(batch))
        if key not in self._compiled:
            self._compiled[key] = self.lower(batch).compile()
            release_free_host_memory()
        return self._compiled[key]

    def __call__(self, batch: Batch, i: int) -> dict[str, jax.Array]:
        if self.mesh is not None:  # this process's rows -> the global batch
            batch = shard_batch(batch, self.mesh, self.rules)
        self.state, aux = self._executable(batch)(self.state, batch, jnp.asarray(i, jnp.int32))
        return aux

    def sync(self):
        """Writes the current state back into the model and optimizer objects."""
        nnx.update(self._objects, self.state)


def train(
    task: TrainTask,
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    mesh=None,
    rules=None,
) -> dict[str, Any]:
    """Trains ``task.model`` for ``cfg.steps`` steps, resuming from ``workdir/checkpoints``.

    Args:
      task: model, loss and data.
      cfg: a ``train`` config section (``configs/common.py``'s ``train_section``): steps,
        learning_rate, warmup_steps, weight_decay, grad_clip, b1, b2, min_lr_ratio, seed,
        log_every, checkpoint_every, max_to_keep, nonfinite_limit, peak_flops_per_device,
        profile_start_step / profile_steps (a ``jax.profiler`` trace of those steps into
        ``logs/``; 0 steps: none), compilation_cache_dir (JAX's persistent compilation
        cache; "": off) and ema (profile, decay, sigma_rel: an EMA of the parameters,
        :mod:`sora_jax.train.ema`, saved in every checkpoint as its ``ema`` item and left in
        ``task.ema``; profile "none": none).
      workdir: run folder; checkpoints go to ``checkpoints/``, metrics to ``logs/``.
      progress: show a tqdm bar.
      mesh, rules: optional device mesh and logical-axis rules (see :class:`TrainStep`); each
        process's batches hold its own rows of the global batch.

    Returns:
      Summary dict: ``steps``, ``resumed_from``, ``final_loss``, ``final_metrics``, ``seconds``
      ``steps_per_s`` (of this invocation), ``train_step_compiles`` (traces of the step
      function in this invocation: 1 when every batch had the same shapes), ``compile_seconds``
      (the invocation's first step), ``goodput`` and the last window's ``step_time`` and, where
      the task gives them, ``tokens_per_s`` and ``mfu`` (see :mod:`sora_jax.train.throughput`;
      also logged at every ``log_every`` as ``<name>/step_time`` etc.).

    Robustness: a step whose gradients are not all finite leaves the parameters and optimizer
    state unchanged (:func:`skip_nonfinite`; counted as the ``nonfinite`` metric and
    ``nonfinite_steps``); ``cfg.nonfinite_limit`` of them in a row (0 = never) stop the run.
    SIGTERM (a preemption notice) makes the loop save a checkpoint after the current step and
    raise :class:`Preempted`. On start, the newest readable checkpoint is restored; unreadable
    newer ones are renamed ``<step>.corrupt``, and the metrics a crashed run logged after the
    restored step are cut from ``logs/`` (``metrics.jsonl`` rewritten, TensorBoard told to
    purge them), so every step is logged once.

    Several processes (``jax.distributed``) with a ``mesh``: every process runs this with the
    same task and config and its own rows of each batch; the state is placed on ``mesh``
    before the restore, every process writes its shards of each checkpoint, SIGTERM on any
    process stops all of them at the same step (JAX's preemption sync point, with no per-step
    host synchronisation), and only process 0 logs metrics and shows progress. Without a
    ``mesh`` the run is process-local: call it on one process only
    (:func:`sora_jax.parallel.distributed.main_process_first`).

    Raises:
      ValueError: the task has neither or both of ``batch_fn`` and ``dataset``, or a
        checkpoint to resume from lacks the iterator state a ``dataset`` task needs.
      FloatingPointError: ``nonfinite_limit`` non-finite steps in a row.
      Preempted: SIGTERM arrived; the checkpoint of the last completed step is on disk.
      RuntimeError: checkpoints exist but none can be read.
    """
    main_process = jax.process_index() == 0
    if cfg.compilation_cache_dir:  # process-wide; the first directory set in a process stays
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(cfg.compilation_cache_dir))
    tx, schedule = (task.optimizer_fn or make_optimizer)(cfg)
    optimizer = nnx.Optimizer(task.model, skip_nonfinite(tx), wrt=nnx.Param)
    ema = EMA(task.model, cfg.ema) if cfg.ema.profile != "none" else None
    task.ema = ema
    peak = None
    if task.flops_per_step:
        peak, peak_source = peak_flops_per_device(cfg.peak_flops_per_device)
        log.info("%s: peak %s FLOP/s per device (%s)", task.name,
                 "unknown" if peak is None else f"{peak:.3g}", peak_source)
    throughput = Throughput(task.tokens_per_step, task.flops_per_step,
                            None if peak is None else peak * jax.device_count())
    if mesh is not None:
        # on the mesh before restoring, so the checkpoint restores straight into the shardings
        # (each host reads its own shards) and every process's arrays are global ones
        rules = DEFAULT_RULES if rules is None else rules
        place_objects(tuple(o for o in (task.model, optimizer, ema) if o is not None), mesh, rules)
    # Several processes with a mesh train one model together; without one, the state is this
    # process's own and so are its checkpoints (the others must not call train meanwhile).
    collective = mesh is not None and jax.process_count() > 1
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                        this_process_only=not collective)
    try:
        start, data_state = _restore_latest(ckpt, task, optimizer, ema)
    except BaseException:
        ckpt.close()
        raise
    # metrics logged after the restored step by a run that died are cut from the logs
    writer = MetricWriter(os.path.join(workdir, "logs"), enabled=main_process, resume_step=start)

    step = TrainStep(task.model, optimizer, task.loss_fn, schedule, cfg.seed, mesh=mesh, rules=rules,
                     ema=ema)
    if mesh is not None:
        log.info("%s: mesh %s", task.name, describe(mesh))
    summary: dict[str, Any] = {"resumed_from": start, "steps": cfg.steps}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    batches = _Batches(task, start, data_state)
    pending = pool.submit(batches.next) if start < cfg.steps else None
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.name}",
               disable=not progress or not main_process, dynamic_ncols=True)
    t0, last_aux, window = time.time(), None, []
    timed = {"steps": 0, "overhead": 0.0}  # since the last throughput window
    rates: dict[str, float] = {}

    sync_model = step.sync
    limit = cfg.nonfinite_limit
    nonfinite_run = nonfinite_total = 0
    trace = _TraceWindow(os.path.join(workdir, "logs"), cfg.profile_start_step, cfg.profile_steps)
    try:
        with _Preemption(ckpt) as preemption:
            for i in range(start, cfg.steps):
                batch, data_state = pending.result()
                if i + 1 < cfg.steps:  # prepare the next batch while this step runs
                    pending = pool.submit(batches.next)
                trace.before(i)
                with jax.profiler.StepTraceAnnotation(task.name, step_num=i):
                    window.append(step(batch, i))
                trace.after(i, window[-1])
                done = i + 1
                stop = preemption.reached(i)
                timed["steps"] += 1
                if i == start or done % cfg.log_every == 0 or done == cfg.steps or stop:
                    # a sync point: the first step alone (it holds the compile), then each log
                    host = jax.device_get(window)
                    applied = sum(1 for a in host[len(host) - timed["steps"]:] if not a["nonfinite"])
                    rates = throughput.window(timed["steps"], applied, timed["overhead"])
                    timed.update(steps=0, overhead=0.0)
                if done % cfg.log_every == 0 or done == cfg.steps or stop:
                    for a in host:  # consecutive skipped (non-finite) steps, across windows
                        nonfinite_run = nonfinite_run + 1 if a["nonfinite"] else 0
                        nonfinite_total += int(a["nonfinite"])
                        if limit and nonfinite_run >= limit:
                            raise FloatingPointError(
                                f"{task.name}: {nonfinite_run} steps in a row with a non-finite loss "
                                f"or gradient (up to step {done}; train.nonfinite_limit = {limit}); "
                                f"the last checkpoint holds the state before them")
                    finite = [a for a in host if not a["nonfinite"]] or host
                    mean = {k: float(np.mean([a[k] for a in finite])) for k in host[-1]}
                    mean["nonfinite"] = float(sum(a["nonfinite"] for a in host))
                    mean.update(rates)
                    writer.write_scalars(done, {f"{task.name}/{k}": v for k, v in mean.items()})
                    bar.set_postfix(loss=f"{mean['loss']:.4f}")
                    last_aux, window = mean, []
                bar.update(1)
                if stop and done < cfg.steps:
                    sync_model()
                    ckpt.save(done, task.model, optimizer, task.meta, data_state, ema=ema)
                    ckpt.wait()
                    log.warning("%s: SIGTERM: saved step %d, stopping", task.name, done)
                    raise Preempted(task.name, done)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    t_save = time.perf_counter()
                    sync_model()
                    if done == cfg.steps and task.on_finish is not None:
                        # Not guarded by an earlier save: a rerun resuming at the final step
                        # would skip on_finish and keep a checkpoint without what it stores.
                        task.on_finish(task.model)
                    ckpt.save(done, task.model, optimizer, task.meta, data_state, ema=ema)
                    # the logs hold every step a resume keeps, even if the process is killed
                    writer.flush()
                    timed["overhead"] += time.perf_counter() - t_save
        # No sync after the loop: the last step already synced, and a second sync would undo
        # what on_finish stored in the model.
    finally:
        trace.close()
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        batches.close()
        ckpt.close()
        writer.close()
    seconds = time.time() - t0
    ran = cfg.steps - start
    summary.update(
        seconds=seconds,
        steps_per_s=ran / seconds if ran else 0.0,
        final_metrics=last_aux or {},
        final_loss=(last_aux or {}).get("loss"),
        train_step_compiles=step.compiles,
        nonfinite_steps=nonfinite_total,
        compile_seconds=throughput.compile_seconds,
        goodput=throughput.goodput(),
        **{k: v for k, v in rates.items() if k not in ("goodput", "compile_seconds")},
    )
    log.info("%s: %d train-step compilation(s) in this run", task.name, step.compiles)
    return summary
