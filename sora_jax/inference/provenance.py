"""Provenance of generated media: which prompt, seed, sampler and checkpoint made a file.

Every sample is written with its record twice: embedded in the media file (PNG text chunks or
mp4 container tags) and in a sidecar ``.json`` beside it, so the record survives either the
media being copied alone or its metadata being stripped by another tool.

Embedded form: one entry per record key (str values as they are, other values JSON-encoded), plus
``sora_jax_provenance`` holding the whole record as JSON, which `read_provenance` parses.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

import sora_jax
from sora_jax import io

__all__ = [
    "PROVENANCE_KEYS",
    "OPTIONAL_PROVENANCE_KEYS",
    "EMBEDDED_RECORD_KEY",
    "provenance_record",
    "write_outputs",
    "read_provenance",
]

PROVENANCE_KEYS: tuple[str, ...] = (
    "mode",  # what was generated, e.g. "t2v", "i2v", "extend", "loop"
    "prompt",  # as the user typed it
    "extended_prompt",  # what the text encoder saw, after the prompt extender
    "seed",
    "sampler",
    "steps",
    "guidance",
    "checkpoint_sha256",  # of the DiT checkpoint used: sora_jax.train.run_folder.checkpoint_fingerprint
    "created",  # UTC, ISO 8601
)
# Recorded when known; `provenance_record` also accepts keys outside both lists.
OPTIONAL_PROVENANCE_KEYS: tuple[str, ...] = (
    "visual_guidance",
    "model",
    "config_name",
    "checkpoint_step",
    "weights",  # the DiT's weights: "ema" (their moving average) or "raw"
    "frames",
    "height",
    "width",
    "conditioned_frames_psnr",
    "loop_seam_ratio",
    "inputs",  # [{"path": str, "sha256": str}, ...] for image / video inputs
    "sora_jax_version",
)
EMBEDDED_RECORD_KEY = "sora_jax_provenance"

def provenance_record(**fields: Any) -> dict[str, Any]:
    """Validated provenance record.

    Fills ``created`` (now, UTC, ISO 8601 to the second) when absent or None and
    ``sora_jax_version`` from ``sora_jax.__version__`` when absent. numpy / jax scalars and arrays
    become Python numbers and lists, paths become str, so the result is plain JSON data.

    Args:
      **fields: every key of `PROVENANCE_KEYS`, any of `OPTIONAL_PROVENANCE_KEYS`, and any other
        JSON-serialisable key.

    Returns:
      A new dict.

    Raises:
      ValueError: required keys are missing (all of them are named).
      TypeError: a value has no JSON form.
    """
    record = dict(fields)
    if record.get("created") is None:
        now = datetime.datetime.now(datetime.timezone.utc)
        record["created"] = now.isoformat(timespec="seconds")
    if "sora_jax_version" not in record:
        record["sora_jax_version"] = sora_jax.__version__
    missing = [k for k in PROVENANCE_KEYS if k not in record]
    if missing:
        raise ValueError(f"provenance record is missing required keys {missing}")
    return json.loads(json.dumps(record, default=io._json_default))


def _embedded(record: Mapping[str, Any]) -> dict[str, str]:
    """str -> str tags: str values as they are, others JSON, plus the whole record as JSON."""
    tags = {str(k): v if isinstance(v, str) else json.dumps(v, default=io._json_default)
            for k, v in record.items()}
    tags[EMBEDDED_RECORD_KEY] = json.dumps(record, sort_keys=True, default=io._json_default)
    return tags


def write_outputs(
    path_stem: str | os.PathLike,
    video: Any,
    record: Mapping[str, Any],
    fps: float = 8,
    scale: int = 1,
) -> dict[str, str]:
    """Writes a sample with its provenance embedded, plus a sidecar JSON.

    A single frame (T = 1) becomes ``<stem>.png`` with the record in PNG text chunks; a longer
    video becomes ``<stem>.mp4`` with the record in container tags (see module docstring). The
    sidecar ``<stem>.json`` always holds the full record. The suffix is appended to the stem, so
    a stem such as "out/sample.v2" keeps its dot.

    Args:
      path_stem: output path without extension; parent folders are created.
      video: (T, H, W, 3) uint8, or float in [-1, 1].
      record: provenance, usually from `provenance_record`.
      fps: frames per second of the mp4 (ignored for a PNG).
      scale: integer nearest-neighbour upscaling of the media (not of the record).

    Returns:
      {"media": path of the .png / .mp4, "sidecar": path of the .json}.

    Raises:
      ValueError: video of the wrong shape, bad fps or scale.
      TypeError: a record value with no JSON form, or a bad pixel dtype.
    """
    video = io.to_uint8(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must have shape (T, H, W, 3), got {np.shape(video)}")
    stem = pathlib.Path(path_stem)
    tags = _embedded(record)
    if video.shape[0] == 1:
        media = io.write_png(stem.with_name(stem.name + ".png"), video[0], text=tags, scale=scale)
    else:
        media = io.write_mp4(stem.with_name(stem.name + ".mp4"), video, fps=fps, metadata=tags,
                             scale=scale)
    sidecar = io.write_json(stem.with_name(stem.name + ".json"), dict(record))
    return {"media": str(media), "sidecar": str(sidecar)}


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the provenance of a file written by `write_outputs`.

    Args:
      path: a ``.png`` (text chunks), ``.mp4`` (container tags) or ``.json`` (sidecar).

    Returns:
      The record parsed from the ``sora_jax_provenance`` entry when the media has one; otherwise
      all its text entries as str -> str (for a PNG or mp4 written by other tools).

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: another suffix, or an unreadable file.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"no such provenance file: {path}")
        return json.loads(path.read_text(encoding="utf-8"))
    if suffix == ".png":
        tags = io.read_png_text(path)
    elif suffix == ".mp4":
        tags = io.read_metadata(path)
    else:
        raise ValueError(f"cannot read provenance from {path}: expected .png, .mp4 or .json")
    if EMBEDDED_RECORD_KEY in tags:
        return json.loads(tags[EMBEDDED_RECORD_KEY])
    return tags
