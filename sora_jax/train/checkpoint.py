"""Orbax checkpoints of a model and its optimizer, resumable from the latest step.

Layout under ``<workdir>/checkpoints/<step>/``: ``model`` (parameters), ``optimizer`` (optax state
and step counter), ``meta`` (JSON: step, run name, config), for runs with an EMA of their
parameters ``ema`` (``weights``: the averaged model, same tree as ``model``; ``count``: updates
applied) and, for iterator-fed runs, ``data`` (the Grain iterator state after the last consumed
batch, written by Grain's own Orbax handler as one ``process_<i>-of-<n>.json`` per process:
every host resumes its own shard's position). Inference restores ``model`` or ``ema.weights``
alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointNotFoundError(FileNotFoundError):
    """Raised when a run directory holds no checkpoint to restore."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _check_shapes(target, restored, what: str):
    """Orbax restores a saved array whatever the target's shape: refuse one of another shape
    (a checkpoint of another model size whose tree has the same names)."""
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(restored)):
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(f"{what} {jax.tree_util.keystr(path)}: the checkpoint holds shape "
                             f"{tuple(got.shape)}, the model {tuple(want.shape)}")


class _IteratorState:
    """One process's recorded iterator state, in the shape Grain's Orbax handler saves.

    The trainer prepares batches one step ahead, so the live iterator is past the step being
    checkpointed; this carries the state recorded right after that step's batch instead.
    """

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state)

    def start_prefetch(self):  # part of the interface Grain's restore calls
        pass


class Checkpointer:
    """Saves and restores ``(model, optimizer)`` pairs with an Orbax ``CheckpointManager``.

    Args:
      directory: folder for the step sub-folders (created if missing).
      max_to_keep: how many of the newest checkpoints survive.
      async_save: write in a background thread (Orbax's default); ``wait()`` joins it.
      this_process_only: used by this process alone, with no barrier with the others of a
        multi-process job (e.g. one process restoring a VAE to encode a dataset for all);
        restores then go to this process's devices. By default every process of the job
        takes part in each call, as training's sharded saves and restores need.
      compress: Orbax's zstd compression of the ``model`` item. False: stored as raw bytes; a
        save then needs about no memory beyond the arrays (compressing buffers the whole
        item once more: +0.9x of a 420 MB tree measured), which is what ``import-weights``
        of a model that nearly fills the host needs. Restores read either.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 this_process_only: bool = False, compress: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        multiprocessing, alone = ocp.options.MultiprocessingOptions(), False
        if this_process_only and jax.process_count() > 1:
            pi, alone = jax.process_index(), True
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=pi, active_processes={pi}, barrier_sync_key_prefix=f"process{pi}")
        options = ocp.CheckpointManagerOptions(
            # Orbax creates the folder with a barrier of all processes; made above instead
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not alone,
            multiprocessing_options=multiprocessing,
        )
        handlers = None if compress else {
            "model": ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=multiprocessing),
            "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._alone, self._compress = alone, compress

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Complete steps, newest first (Orbax skips the temporary folders of unfinished saves)."""
        return sorted(self.manager.all_steps(), reverse=True)

    def quarantine(self, step: int) -> str:
        """Renames an unreadable step's folder to ``<step>.corrupt`` (kept for inspection, ignored
        from then on, and out of the way of a new save of that step); returns the new path."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt"
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.corrupt{n}"
        if self._alone or jax.process_index() == 0:
            os.rename(src, dst)
        if not self._alone and jax.process_count() > 1:  # the others look only once it is moved
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sora_jax:quarantine:{step}")
        self.manager.reload()
        return dst

    def has_item(self, step: int, item: str) -> bool:
        """Whether checkpoint ``step`` holds ``item`` (e.g. ``"ema"``: runs without an EMA, and
        those written before there was one, have none)."""
        return os.path.isdir(os.path.join(self.directory, str(int(step)), item))

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None, meta: dict[str, Any],
             data_state: dict[str, Any] | None = None, ema: nnx.Module | None = None):
        """Writes model parameters, optimizer state, JSON metadata, the input iterator's
        state (``data_state``: JSON-serialisable, e.g. ``grain.DatasetIterator.get_state()``)
        and the parameters' EMA (``ema``: :class:`sora_jax.train.ema.EMA`)."""
        # Orbax refuses device arrays of one process in a multi-process job: hand it host copies
        values = jax.device_get if self._alone else (lambda tree: tree)
        items = {
            "model": (ocp.args.StandardSave if self._compress else ocp.args.PyTreeSave)(
                values(nnx.to_pure_dict(nnx.state(model)))),
            "meta": ocp.args.JsonSave(dict(meta, step=int(step))),
        }
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(values(nnx.to_pure_dict(nnx.state(optimizer))))
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(values(nnx.to_pure_dict(nnx.state(ema))))
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_state))
        self.manager.save(int(step), args=ocp.args.Composite(**items))

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, step: int | None = None,
                *, subtree: str | None = None, item: str = "model", ema: nnx.Module | None = None) -> dict:
        """Restores in place into ``model`` (and ``optimizer``, ``ema``) and returns the saved
        metadata.

        ``subtree``: restore ``model`` from that top-level entry of the saved ``item`` only
        (e.g. ``"vae"`` of a saved ``VAETrainModel``: inference reads the autoencoder and never
        the discriminator it was trained with; ``item="ema", subtree="weights"``: the averaged
        parameters); the optimizer cannot be restored that way.

        ``ema`` (:class:`sora_jax.train.ema.EMA`): restored from the ``ema`` item; a checkpoint
        without one (written before the run had an EMA) starts it from the restored
        parameters with its count at 0, and ``meta["ema_restored"]`` is False. A checkpoint
        without optimizer state (imported weights) leaves ``optimizer`` as it is, and
        ``meta["optimizer_restored"]`` is False.

        Raises:
          CheckpointNotFoundError: no checkpoint exists under the directory (or not ``step``).
          ValueError: ``subtree`` together with ``optimizer``, or a saved array whose shape is
            not the model's (Orbax itself would restore it as saved).
        """
        if subtree is not None:
            if optimizer is not None or ema is not None:
                raise ValueError("restore(subtree=...) restores a model only, not an optimizer")
            return self._restore_subtree(model, subtree, step, item)
        if item != "model":
            raise ValueError(f"restore(item={item!r}) needs a subtree (e.g. 'weights')")
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointNotFoundError(
                f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}"
            )
        model_state = nnx.state(model)
        items = {
            "model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_state))),
            "meta": ocp.args.JsonRestore(),
        }
        # imported weights (sora_jax.interop) come without optimizer state: fine-tuning starts a
        # fresh optimizer from them
        with_optimizer = optimizer is not None and self.has_item(step, "optimizer")
        if with_optimizer:
            opt_state = nnx.state(optimizer)
            items["optimizer"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state)))
        with_ema = ema is not None and self.has_item(step, "ema")
        if with_ema:
            ema_state = nnx.state(ema)
            items["ema"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(ema_state)))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _check_shapes(items["model"].item, restored["model"], "model")
        if with_optimizer:
            _check_shapes(items["optimizer"].item, restored["optimizer"], "optimizer")
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.update(model, model_state)
        if with_optimizer:
            nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
            nnx.update(optimizer, opt_state)
        meta = dict(restored["meta"])
        if optimizer is not None:
            meta["optimizer_restored"] = with_optimizer
        if with_ema:
            _check_shapes(items["ema"].item, restored["ema"], "ema")
            nnx.replace_by_pure_dict(ema_state, restored["ema"])
            nnx.update(ema, ema_state)
        elif ema is not None:  # an older checkpoint: the average starts here
            nnx.update(ema.weights, jax.tree.map(lambda x: x.copy(), nnx.state(model, nnx.Param)))
            ema.count[...] = jax.numpy.zeros_like(ema.count[...])
        if ema is not None:
            meta["ema_restored"] = with_ema
        return meta

    def _restore_subtree(self, model: nnx.Module, subtree: str, step: int | None, item: str) -> dict:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointNotFoundError(
                f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}"
            )
        if not self.has_item(step, item):
            raise CheckpointNotFoundError(f"checkpoint {step} in {self.directory} holds no {item!r} item")
        model_state = nnx.state(model)
        target = {subtree: _abstract(nnx.to_pure_dict(model_state))}
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True),
            "meta": ocp.args.JsonRestore()}))
        _check_shapes(target[subtree], restored[item][subtree], f"{item}[{subtree!r}]")
        nnx.replace_by_pure_dict(model_state, restored[item][subtree])
        nnx.update(model, model_state)
        return dict(restored["meta"])

    def restore_data_state(self, step: int | None = None) -> dict[str, Any] | None:
        """The input iterator state saved with ``step`` (default latest), or None if none was."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = os.path.join(self.directory, str(step), "data")
        if not os.path.isdir(path):
            return None
        restored = self.manager.restore(
            step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(_IteratorState())))
        return dict(restored["data"].state)

    def reached_preemption(self, step: int) -> bool:
        """True once, at the step every process of a ``jax.distributed`` job agrees to stop at
        after a preemption notice (SIGTERM) reached any of them (Orbax's
        ``CheckpointManager.reached_preemption``, on JAX's preemption sync manager); False
        outside such a job."""
        return bool(self.manager.reached_preemption(int(step)))

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
