"""``sora-jax export``: a trained run's weights in the formats serving stacks read.

  safetensors  every model of the run (DiT, autoencoder, and the text encoder when the run holds
               its weights) as safetensors with flat dotted keys, a config.json each, provenance
               in the files' metadata (:mod:`sora_jax.interop.weights_export`);
  diffusers    a Wan-shaped run as a diffusers pipeline folder, which ``import-weights`` and
               diffusers' ``from_pretrained`` read (:mod:`sora_jax.interop.weights_export`);
  stablehlo    the generation as ``jax.export`` programs plus weights, which
               :mod:`sora_jax.serving` runs without this package's model code
               (:mod:`sora_jax.interop.stablehlo_export`).

Every format is written into ``OUT.partial`` and renamed to ``OUT`` at the end, so a failure
leaves no half-written export; an existing ``OUT`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Sequence

import jax
import ml_collections

from sora_jax.errors import StageError
from sora_jax.interop import weights_export
from sora_jax.interop.stablehlo_export import export_stablehlo
from sora_jax.parallel.mesh import create_mesh
from sora_jax.train.host_memory import map_large_allocations

__all__ = ["FORMATS", "export_command", "export_run"]

FORMATS = ("safetensors", "diffusers", "stablehlo")


def export_run(cfg: ml_collections.ConfigDict, workdir: str, fmt: str, out: str, *, dtype: str | None = None,
               step: int | None = None, weights: str = "ema", overwrite: bool = False,
               platforms: Sequence[str] = ("cpu",), solvers: Sequence[str] | None = None,
               shard: bool = False) -> dict[str, Any]:
    """Exports the run folder ``workdir`` as ``fmt`` into the folder ``out``.

    Args:
      cfg: the run's config.
      fmt: one of :data:`FORMATS`.
      dtype: "float32" or "bfloat16" (None: the checkpoint's dtypes).
      step: the DiT checkpoint's step (None: the latest).
      weights: "ema" (the DiT's EMA where the run keeps one) or "raw".
      overwrite: replace an existing ``out``.
      platforms, solvers: stablehlo only (see :func:`export_stablehlo`).
      shard: safetensors / diffusers: restore onto the config's ``mesh`` over this host's devices
        (each tensor straight onto its shards, so no device holds a whole model) and gather one
        tensor at a time to the host. A job of several processes is refused: the export runs
        in one.

    Returns:
      the format's report, with ``format``, ``out`` and ``export_seconds``; also written to
      ``out/export.json``.

    Raises:
      StageError: an unknown format or dtype, an existing ``out`` without ``overwrite``, a missing
        or unreadable checkpoint, or what the format refuses (e.g. ``diffusers`` for a run that is
        not Wan-shaped); nothing is left at ``out`` (nor ``out.partial``) then.
    """
    if fmt not in FORMATS:
        raise StageError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in (None, "float32", "bfloat16"):
        raise StageError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not overwrite:
        raise StageError(f"{out} exists: choose another --out or pass --overwrite")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise StageError(f"{workdir} is not a run folder (no config.json)")
    if jax.process_count() > 1:
        raise StageError("export runs in one process (it gathers each tensor to this host); start it without "
                         "jax.distributed, with --shard to spread the restored model over this host's devices")
    mesh = rules = None
    if shard:
        if fmt == "stablehlo":
            raise StageError("--shard is for the weight formats; a stablehlo export is traced on one device")
        mesh, rules = create_mesh(cfg.mesh, jax.local_devices()), cfg.mesh.rules
    target = out + ".new" if os.path.exists(out) else out  # overwrite: the old export stays until the new one is whole
    t0 = time.perf_counter()
    try:
        report = _write(cfg, workdir, fmt, target, dtype=dtype, step=step, weights=weights, platforms=platforms,
                        solvers=solvers, mesh=mesh, rules=rules)
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, whatever failed below
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise StageError(f"export of {workdir} failed: {type(e).__name__}: {first}") from e
    finally:
        shutil.rmtree(target + ".partial", ignore_errors=True)
    if target != out:
        shutil.rmtree(out)
        os.replace(target, out)
    report = dict(report, format=fmt, out=out, export_seconds=round(time.perf_counter() - t0, 3))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    return report


def _write(cfg, workdir, fmt, out, *, dtype, step, weights, platforms, solvers, mesh, rules) -> dict[str, Any]:
    if fmt == "stablehlo":
        return export_stablehlo(cfg, workdir, out, dtype=dtype, step=step, weights=weights, platforms=platforms,
                                solvers=solvers)
    write = weights_export.export_safetensors if fmt == "safetensors" else weights_export.export_diffusers
    return write(cfg, workdir, out, dtype=dtype, step=step, weights=weights, mesh=mesh, rules=rules)


def export_command(cfg: ml_collections.ConfigDict, workdir: str, fmt: str, out: str, **kw) -> dict[str, Any]:
    """``sora-jax export``: :func:`export_run` in a process that does nothing else, so large
    allocations are mapped and unmapped one by one and a freed tensor goes straight back to the
    OS (:func:`sora_jax.train.host_memory.map_large_allocations`): the peak stays near one model."""
    map_large_allocations()
    return export_run(cfg, workdir, fmt, out, **kw)
