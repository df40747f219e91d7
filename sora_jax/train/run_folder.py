"""The run folder: where a run keeps its config, data, checkpoints and outputs, and how a model
is restored from it.

A run folder (``--workdir``) holds::

  config.json          the resolved config
  data/                ArrayRecord datasets + manifest.json          (prepare-data)
  vae/                 checkpoints/ (weights + latent statistics), logs/,
                       evaluate_vae.json                             (train-vae, evaluate-vae)
  latents/             encoded training latents + text_states.npz   (encoded by train-dit)
  dit/                 checkpoints/, logs/                           (train-dit)
  samples/, eval/, modes/   generated videos and prompt-adherence results

A training run's own folder (``<workdir>/vae``, ``<workdir>/dit``; ``run_dir`` below) holds
``checkpoints/<step>/`` written by :class:`sora_jax.train.checkpoint.Checkpointer`. Steps are
listed with Orbax's own step listing, so unfinished saves and quarantined ``<step>.corrupt``
folders are never taken for checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.data.bundled import load_manifest
from sora_jax.errors import ConfigError, StageError
from sora_jax.io import folder_sha256
from sora_jax.train.checkpoint import CheckpointNotFoundError, Checkpointer

__all__ = ["checkpoint_fingerprint", "datasets", "has_ema", "latest_step", "paths", "read_config",
           "restore", "save_config"]


def paths(workdir: str) -> dict[str, str]:
    """The standard sub-folders and files of a run folder."""
    j = lambda *p: os.path.join(workdir, *p)  # noqa: E731
    return dict(
        config=j("config.json"), data=j("data"), vae=j("vae"), latents=j("latents"), dit=j("dit"),
        vae_eval=j("vae", "evaluate_vae.json"), text_states=j("latents", "text_states.npz"),
        latents_train=j("latents", "latents_train"),
        samples=j("samples"), eval=j("eval"), modes=j("modes"),
        text_encoder=j("text_encoder"),  # an imported text encoder (umT5): checkpoints/, tokenizer/
    )


def save_config(cfg: ml_collections.ConfigDict, workdir: str):
    """Writes ``cfg`` as the run's ``config.json`` (later commands on the folder reuse it)."""
    os.makedirs(workdir, exist_ok=True)
    with open(paths(workdir)["config"], "w") as f:
        f.write(config_lib.to_json(cfg))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's saved ``config.json``.

    Raises:
      FileNotFoundError: the folder has none (not a sora-jax run folder).
      ConfigError: the file cannot be parsed.
    """
    path = paths(workdir)["config"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {workdir}: is it a sora-jax run folder?")
    try:
        with open(path) as f:
            return config_lib.from_json(f.read())
    except ValueError as e:
        raise ConfigError(f"unreadable run config {path}: {e}") from None


def _checkpoints(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_step(run_dir: str) -> int | None:
    """The newest finished checkpoint step of a training run folder, or None (Orbax's step
    listing: temporary folders of unfinished saves and ``<step>.corrupt`` are not steps)."""
    steps = ocp.utils.checkpoint_steps(_checkpoints(run_dir))
    return max(steps) if steps else None


def checkpoint_fingerprint(run_dir: str, step: int | None = None, item: str = "model") -> dict[str, Any] | None:
    """What identifies a checkpoint's weights, without loading them: ``{"step": int,
    "sha256": hex}``, the :func:`sora_jax.io.folder_sha256` of its saved ``model`` item
    (weights and latent statistics; not the optimizer, iterator state or metadata), or of
    another ``item`` (``"ema"``: the averaged weights). A copied run folder keeps it; a
    retrained or edited one changes it.

    Args:
      run_dir: a training run folder, e.g. ``<workdir>/vae``.
      step: the checkpoint; None: the latest.
      item: the checkpoint item hashed.

    Returns:
      The fingerprint, or None when ``step`` is None and there is no checkpoint.

    Raises:
      FileNotFoundError: ``step`` is given and has no finished checkpoint.
    """
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            return None
    elif int(step) not in ocp.utils.checkpoint_steps(_checkpoints(run_dir)):
        raise FileNotFoundError(f"no checkpoint for step {step} in {_checkpoints(run_dir)}")
    folder = os.path.join(_checkpoints(run_dir), str(int(step)), item)
    return {"step": int(step), "sha256": folder_sha256(folder)}


def has_ema(run_dir: str) -> bool:
    """Whether the latest checkpoint of a training run folder holds an EMA of its parameters."""
    step = latest_step(run_dir)
    return step is not None and os.path.isdir(os.path.join(_checkpoints(run_dir), str(step), "ema"))


# what Orbax's readers (TensorStore, OCDBT) say about files that are truncated or damaged; the
# errors have no common type, and a ValueError may also mean another model's tree
_READ_ERROR_WORDS = ("byte range", "tensorstore", "data_loss", "out_of_range", "checksum", "corrupt",
                     "error while reading")


def _is_read_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in _READ_ERROR_WORDS)


def _unreadable(what: str, run_dir: str, e: BaseException) -> str:
    # TensorStore's message is its first sentence; the rest is a multi-line dump of its spec
    first = str(e).strip().splitlines()[0].split(" See full")[0][:200] if str(e).strip() else ""
    return f"the {what} checkpoint in {run_dir} cannot be read (corrupt or partly copied?): {type(e).__name__}: {first}"


def restore(model: nnx.Module, run_dir: str, what: str, subtree: str | None = None,
            item: str = "model", step: int | None = None) -> int:
    """Restores the latest checkpoint of a training run folder into ``model`` in place, on this
    process alone (inference and encoding run per process), and returns its step.

    Args:
      model: a freshly built model of the run's config (:mod:`sora_jax.models.factory`).
      run_dir: e.g. ``<workdir>/dit``.
      what: "vae" or "dit", for messages (``sora-jax train-<what>``).
      subtree: restore from that top-level entry of the saved item (``"vae"`` of a saved
        ``VAETrainModel``, whose discriminator inference never reads).
      item: the checkpoint item: ``"model"`` (the trained parameters) or ``"ema"`` (with
        ``subtree="weights"``: their EMA, :mod:`sora_jax.train.ema`).
      step: the checkpoint's step; None: the latest.

    Raises:
      StageError: no checkpoint, one whose tree does not match ``model`` (another config), or one
        whose files cannot be read (corrupt).
    """
    if not os.path.isdir(_checkpoints(run_dir)):  # don't create folders on a typo
        raise StageError(f"no {what} checkpoint in {run_dir}: run `sora-jax train-{what}` first")
    ckpt = Checkpointer(_checkpoints(run_dir), this_process_only=True)
    try:
        meta = ckpt.restore(model, step=step, subtree=subtree, item=item)
    except CheckpointNotFoundError:
        if step is not None:
            raise StageError(f"no {what} checkpoint for step {step} in {run_dir} (steps there: "
                             f"{sorted(ckpt.manager.all_steps())})") from None
        raise StageError(f"no {what} checkpoint in {run_dir}: run `sora-jax train-{what}` first") from None
    except (ValueError, KeyError) as e:
        if not _is_read_error(e):  # a tree that does not match this model
            raise StageError(f"the {what} checkpoint in {run_dir} does not match this config's "
                             f"model (trained with another config? rerun `sora-jax train-{what}` "
                             f"in a new run folder): {str(e)[:300]}") from None
        raise StageError(_unreadable(what, run_dir, e)) from None
    except Exception as e:  # noqa: BLE001 - TensorStore / OCDBT read errors have no common type
        raise StageError(_unreadable(what, run_dir, e)) from None
    finally:
        ckpt.close()
    return int(meta["step"])


def datasets(workdir: str) -> dict[str, str]:
    """Name -> record prefix of the datasets ``prepare-data`` built in the run's ``data/``.

    Raises:
      StageError: no prepared data.
    """
    data = paths(workdir)["data"]
    manifest = load_manifest(data)
    if manifest is None:
        raise StageError(f"no datasets in {data}: run `sora-jax prepare-data` first")
    names = manifest["datasets"]
    # relative to this data folder, so a moved or copied run folder still finds its data
    return {k: os.path.join(data, os.path.basename(v)) for k, v in names.items()}
