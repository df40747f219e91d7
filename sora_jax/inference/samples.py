"""Samples on disk: what ``sora-jax generate`` does with a request, and how samples are written.

:func:`generate_samples` takes the prompts, mode and input files of one ``generate`` call and
the run's config (whose ``sample`` section holds the sampler settings, command-line flags
already applied), checks everything before loading a model, runs the mode, and writes each
sample with its provenance (:mod:`sora_jax.inference.provenance`), a contact sheet and
``samples.json``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from sora_jax.errors import StageError
from sora_jax.inference.generate import Generator, Request
from sora_jax.inference.modes import MODES, NUM_INPUTS, run_mode
from sora_jax.inference.prompts import make_extender, make_filter
from sora_jax.inference.provenance import provenance_record, write_outputs
from sora_jax.io import file_sha256, read_media, write_contact_sheet, write_json, write_mp4
from sora_jax.models.factory import latent_shape

__all__ = ["generate_samples", "provenance_fields", "write_sample", "write_samples"]


def _check_prompts(prompts: Sequence[str], what: str):
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise StageError(f"{what} {p!r} is empty: give a text prompt")


def generate_samples(cfg: ml_collections.ConfigDict, workdir: str, prompts: Sequence[str], *,
                     mode: str = "t2v", inputs: Sequence[str] = (),
                     shapes: Sequence[tuple[int, int, int]] | None = None,
                     out: str | None = None) -> dict[str, Any]:
    """One sample per prompt from a trained run folder, written with provenance.

    Sampler settings come from ``cfg.sample`` (frames, height, width, seed, guidance,
    visual_guidance, strength, steps, solver, fps) and the prompt filter and extender from
    ``cfg.prompt``. Everything is checked before a model is loaded or a file written.

    Args:
      cfg: the run's config (validated).
      workdir: run folder with ``vae/`` and ``dit/`` checkpoints.
      prompts: text prompts, one sample each (not empty).
      mode: one of :data:`sora_jax.inference.modes.MODES`.
      inputs: image / video files: one for i2v / extend-* / edit, two (A, B) for connect.
      shapes: t2v only: (frames, height, width) per prompt, packed into one sampler call.
      out: output folder (default ``<workdir>/samples``).

    Returns:
      ``{"samples": [samples.json entries], "contact_sheet": path}``.

    Raises:
      StageError: an empty prompt, an unknown mode, the wrong number of inputs, shapes with a
        mode other than t2v, an impossible shape, a bad extender, or a missing checkpoint.
      PromptRefused: a prompt (or its extension) matches the prompt filter.
      FileNotFoundError / ValueError: an input file cannot be read.
    """
    s = cfg.sample
    _check_prompts(prompts, "prompt")
    if mode not in MODES:
        raise StageError(f"--mode must be one of {MODES}, got {mode!r}")
    if len(inputs) != NUM_INPUTS[mode]:
        raise StageError(f"--mode {mode} takes {NUM_INPUTS[mode]} --input file(s), got {len(inputs)}")
    if shapes is not None and mode != "t2v":
        raise StageError("--shape is for --mode t2v; use --frames/--height/--width")
    prompt_filter = make_filter(cfg.prompt.filter)
    try:
        extender = make_extender(cfg.prompt.extender)
    except ValueError as e:
        raise StageError(f"--extender: {e}") from None
    for p in prompts:  # refuse before loading anything
        prompt_filter.check(p)
    extended = [extender(p) for p in prompts]
    _check_prompts(extended, "the extended prompt of")
    for p in extended:  # an extender (e.g. a user's LLM) may add words of its own
        prompt_filter.check(p)
    if shapes is None:
        shapes = [(s.frames, s.height, s.width)] * len(prompts)
    if len(shapes) != len(prompts):
        raise StageError(f"give one shape or one per prompt ({len(prompts)}), got {len(shapes)}")
    if mode == "t2i":
        shapes = [(1, h, w) for _, h, w in shapes]
    for sh in shapes:
        latent_shape(cfg, *sh)  # fail before loading anything
    media = [read_media(p) for p in inputs]
    visual = None if s.visual_guidance == 1.0 else s.visual_guidance  # 1: no extra model pass
    gen = Generator(cfg, workdir)
    kw = dict(seed=s.seed, guidance=s.guidance, steps=s.steps, solver=s.solver)
    if mode in ("t2v", "t2i"):  # one packed sampler call for every prompt and shape
        videos = gen.generate([Request(p, *sh) for p, sh in zip(extended, shapes)], **kw)
        infos = [{"mode": mode, "frames": int(v.shape[0])} for v in videos]
    else:
        results = [run_mode(gen, mode, p, frames=s.frames, height=s.height, width=s.width,
                            visual_guidance=visual, inputs=media, strength=s.strength, **kw)
                   for p in extended]
        videos, infos = [r.video for r in results], [r.info for r in results]
    fields = provenance_fields(gen, solver=s.solver, steps=s.steps, guidance=s.guidance,
                               visual_guidance=visual,
                               inputs=[{"path": os.path.abspath(p), "sha256": file_sha256(p)}
                                       for p in inputs])
    out = out or os.path.join(workdir, "samples")
    samples = [write_sample(os.path.join(out, f"sample_{i:02d}"), video, prompt=prompt,
                            extended_prompt=ext, seed=s.seed, fields=fields, info=info, fps=s.fps)
               for i, (prompt, ext, video, info) in enumerate(zip(prompts, extended, videos, infos))]
    scale = max(1, 128 // max(videos[0].shape[1:3]))
    sheet = os.path.join(out, "contact_sheet.png")
    write_contact_sheet(sheet, videos, labels=extended, scale=max(1, scale // 2))
    summary = {"mode": mode, "seed": s.seed, "guidance": s.guidance, "visual_guidance": visual,
               "steps": s.steps, "sampler": s.solver, "checkpoint_step": gen.dit_step,
               "workdir": os.path.abspath(workdir), "config": cfg.to_dict(), "samples": samples}
    write_json(os.path.join(out, "samples.json"), summary)
    return {"samples": samples, "contact_sheet": sheet}


def provenance_fields(gen: Generator, *, solver: str, steps: int, guidance: float | None,
                      visual_guidance: float | None, inputs: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Provenance shared by every sample of one generation call (sampler settings, the model,
    the SHA-256 of the DiT and VAE checkpoints; see :mod:`sora_jax.inference.provenance`).

    ``inputs``: ``[{"path", "sha256"}, ...]`` of the image / video files used as prompts, or
    ``[{"source": name}]`` for bundled media.
    """
    return {
        "sampler": solver, "steps": int(steps), "guidance": guidance, "visual_guidance": visual_guidance,
        **gen.checkpoint_hashes(),
        "checkpoint_step": gen.dit_step, "weights": gen.weights, "config_name": gen.cfg.name,
        "model": {"dit": gen.cfg.dit.to_dict(), "vae": gen.cfg.vae.to_dict()},
        "inputs": list(inputs or []),
    }


def write_sample(path_stem: str, video: np.ndarray, *, prompt: str, extended_prompt: str, seed: int,
                 fields: dict[str, Any], info: dict[str, Any], fps: int = 8) -> dict[str, Any]:
    """Writes one sample (``.mp4``, or ``.png`` for one frame) with its provenance embedded and a
    sidecar ``.json``; returns the samples.json entry (paths, prompts, shape and ``info``)."""
    record = provenance_record(prompt=prompt, extended_prompt=extended_prompt, seed=int(seed),
                               height=int(video.shape[1]), width=int(video.shape[2]),
                               **fields, **info)
    scale = max(1, 128 // max(video.shape[1:3]))
    files = write_outputs(path_stem, video, record, fps=fps, scale=scale)
    return {"prompt": prompt, "extended_prompt": extended_prompt, "path": files["media"],
            "sidecar": files["sidecar"], "shape": list(video.shape[:3]), **info}


def write_samples(out_dir: str, prompts: list[str], videos: list[np.ndarray], info: dict[str, Any],
                  fps: int = 8) -> list[dict[str, str]]:
    """Writes ``sample_XX.mp4`` per video, ``contact_sheet.png`` and ``samples.json``."""
    os.makedirs(out_dir, exist_ok=True)
    samples = []
    scale = max(1, 128 // max(videos[0].shape[1:3]))
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = os.path.join(out_dir, f"sample_{i:02d}.mp4")
        write_mp4(path, video, fps=fps, scale=scale,
                  metadata={"prompt": prompt, **{k: str(v) for k, v in info.items()}})
        samples.append({"prompt": prompt, "path": path, "shape": list(video.shape[:3])})
    write_contact_sheet(os.path.join(out_dir, "contact_sheet.png"), videos, labels=list(prompts),
                        scale=max(1, scale // 2))
    write_json(os.path.join(out_dir, "samples.json"), dict(info, samples=samples))
    return samples
