"""``quickstart``: every stage in order, and the metrics file that reports them."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ml_collections

from sora_jax.inference.generate import Generator
from sora_jax.io import write_json
from sora_jax.parallel.distributed import main_process_first
from sora_jax.stages.data import prepare_data
from sora_jax.stages.dit import train_dit
from sora_jax.stages.sampling import evaluate, prompt_modes
from sora_jax.stages.vae import train_vae
from sora_jax.train.run_folder import save_config

log = logging.getLogger("sora_jax")


def quickstart(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any] | None:
    """Every stage in order; writes ``<workdir>/quickstart_metrics.json`` and returns its metrics
    (None on processes other than 0 of a multi-process job).
    """

    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.time()
        log.info("== stage %s ==", name)
        out = fn(*args, **kwargs)
        timings[name] = round(time.time() - t0, 1)
        log.info("== stage %s done in %.1f s ==", name, timings[name])
        return out

    # Several processes: the DiT trains on all of them; the other stages run on process 0
    # while the rest wait (they write files every process then reads), and it alone reports.
    def first_stages():
        save_config(cfg, workdir)
        timed("prepare_data", prepare_data, cfg, workdir, progress)
        return timed("train_vae", train_vae, cfg, workdir, progress)

    vae = main_process_first(first_stages, "quickstart_vae")
    dit = timed("train_dit", train_dit, cfg, workdir, progress)
    return main_process_first(lambda: _quickstart_report(cfg, workdir, progress, timed, timings, vae, dit),
                              "quickstart_report")


def _quickstart_report(cfg, workdir, progress, timed, timings, vae, dit) -> dict[str, Any]:
    """The quickstart's sampling stages and its metrics file (on one process)."""
    gen = Generator(cfg, workdir)
    ev = timed("evaluate", evaluate, cfg, workdir, gen, progress)
    modes = timed("modes", prompt_modes, cfg, workdir, gen, progress)
    ve = vae["eval"]
    metrics = {
        "vae_psnr_heldout_video": ve["video_psnr"],
        "vae_ssim_heldout_video": ve["video_ssim"],
        "vae_psnr_heldout_image": ve["image_psnr"],
        "vae_ssim_heldout_image": ve["image_ssim"],
        "vae_psnr_heldout_digits": ve.get("digits_psnr"),  # absent without digit clips
        "vae_ssim_heldout_digits": ve.get("digits_ssim"),
        "vae_eval_sets": {"video": ve["video_set"], "image": ve["image_set"],
                          "digits": ve.get("digits_set")},
        "dit_heldout_loss": dit["heldout_loss"],
        "dit_heldout_loss_raw": dit.get("heldout_loss_raw"),
        "dit_final_train_loss": dit["final_loss"],
        **{k: v for k, v in ev.items() if k.endswith(("accuracy", "accuracy_se"))},
        "eval_weights": ev["weights"],
        "num_eval_samples": ev["num_samples"],
        "samples": ev["samples"],
        "modes": {m: {k: v for k, v in r.items() if k in (
            "conditioned_frames_psnr", "decoded_context_psnr", "junction_ratio", "loop_seam_ratio",
            "loop_seam_ratio_mean", "loop_seam_ratio_se", "loop_seam_samples", "clip_seam_ratio",
            "input_psnr", "strength", "frames", "path")} for m, r in modes.items()},
        "stage_seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "config": cfg.name,
    }
    write_json(os.path.join(workdir, "quickstart_metrics.json"), metrics)
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """The quickstart's one-line result: prompt adherence (EMA weights, +- standard error), the
    autoencoder's held-out PSNR, the loop seam (mean +- standard error over the loops of
    :func:`~sora_jax.stages.sampling.loop_seams`) and the time."""
    acc = " ".join(f"{name} {metrics[k]:.3f}+-{metrics[k + '_se']:.3f}" for name, k in (
        ("digit", "digit_accuracy"), ("direction", "direction_accuracy"), ("joint", "joint_accuracy")))
    loop = metrics["modes"].get("loop", {})
    seam = "-" if "loop_seam_ratio_mean" not in loop else (
        f"{loop['loop_seam_ratio_mean']:.3f}+-{loop['loop_seam_ratio_se']:.3f} "
        f"({loop['loop_seam_samples']} loops)")
    return (f"quickstart: {acc} ({metrics['num_eval_samples']} samples, {metrics['eval_weights']} "
            f"weights) | VAE PSNR video {metrics['vae_psnr_heldout_video']:.2f} dB, image "
            f"{metrics['vae_psnr_heldout_image']:.2f} dB | loop seam ratio {seam} | "
            f"{metrics['total_seconds']:.0f} s")
