"""``train-vae`` and ``evaluate-vae``: the autoencoder of a run folder."""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.data.bundled import load_manifest
from sora_jax.data.pipeline import vae_batch_fn
from sora_jax.data.records import read_dataset
from sora_jax.evaluation.vae_eval import evaluate_codec, reconstruction_scores
from sora_jax.inference.latents import VAECodec, load_codec, set_latent_statistics
from sora_jax.io import write_json
from sora_jax.models.factory import build_vae
from sora_jax.models.vae_gan import VAETrainModel, build_vae_train_model
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.run_folder import datasets, latest_step, paths, save_config
from sora_jax.train.steps import vae_loss_fn, vae_optimizer_fn
from sora_jax.train.trainer import TrainTask, train

log = logging.getLogger("sora_jax")


def _center_crop(video: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    t, h, w = video.shape[:3]
    y, x = (h - height) // 2, (w - width) // 2
    return video[:frames, y : y + height, x : x + width]


def evaluate_vae(cfg: ml_collections.ConfigDict, workdir: str, codec=None,
                 out: str | None = None) -> dict[str, Any]:
    """Reconstruction PSNR / SSIM of the run's autoencoder on named held-out sets.

    The sets (``sora_jax.evaluation.vae_eval``, sizes and counts from ``cfg.vae_eval``) are
    built from the bundled sources that no training set uses: fixed non-overlapping spacetime
    tiles of the clip ``vae_eval.video_source`` (default ``carphone_pristine``) and fixed tiles
    of the downscaled photos ``vae_eval.image_sources`` (default coffee and flower, as 1-frame
    videos). When the run folder holds prepared data, Moving MNIST clips of held-out digit
    instances (``moving_mnist_eval``, centre-cropped to the ``sample`` size, at most
    ``vae_eval.max_digits``) are scored too. No rFVD: it needs pretrained I3D weights, which
    cannot be downloaded here (see the ``vae_eval`` module docstring).

    Args:
      cfg: the run's config.
      workdir: the run folder (its ``vae/`` checkpoint is loaded unless ``codec`` is given).
      codec: a ``VAECodec`` to score instead of the run's checkpoint.
      out: JSON output path (default ``<workdir>/vae/evaluate_vae.json``).

    Returns:
      The dict written to ``out``: ``video_psnr``, ``video_ssim``, ``image_psnr``,
      ``image_ssim`` (means over clips; dB and SSIM in [-1, 1]), ``video_set``, ``image_set``
      (set names), ``video_sources``, ``image_sources``, ``num_videos``, ``num_images``,
      ``video_frames``, ``video_height``, ``video_width``, ``video_scale``, ``image_height``,
      ``image_width``, ``image_scale``, ``vae_kind``, ``checkpoint_step`` (None for a given
      codec); with prepared data also ``digits_psnr``, ``digits_ssim``, ``num_digits``,
      ``digits_set``.

    Raises:
      StageError: no VAE checkpoint.
      ValueError: a set does not fit the sources or the autoencoder.
    """
    step = None
    if codec is None:  # a given codec may be any model: no step to report
        codec = load_codec(cfg, workdir)
        step = latest_step(paths(workdir)["vae"])
    e = cfg.vae_eval
    result: dict[str, Any] = evaluate_codec(codec, e)
    result.update(vae_kind=cfg.vae.kind, checkpoint_step=step)
    if load_manifest(paths(workdir)["data"]) is not None:
        data = read_dataset(datasets(workdir)["moving_mnist_eval"])
        frames, height, width = cfg.sample.frames, cfg.sample.height, cfg.sample.width
        clips = []
        for i in range(len(data)):
            if len(clips) >= e.max_digits:
                break
            video = data[i]["video"]
            if video.shape[0] >= frames and video.shape[1] >= height and video.shape[2] >= width:
                clips.append(_center_crop(video, frames, height, width))
        if clips:
            dp, ds = reconstruction_scores(codec, np.stack(clips), int(e.batch))
            result.update(digits_psnr=float(np.mean(dp)), digits_ssim=float(np.mean(ds)),
                          num_digits=len(clips), digits_set="moving_mnist_eval")
    write_json(out or paths(workdir)["vae_eval"], result)
    return result


def _stats_batches(batch_fn, n: int = 16):
    # steps far beyond any run's length: draws of the training distribution that the
    # training loop itself never fetched
    return (batch_fn(10_000_000 + i)["video"] for i in range(n))


def train_vae(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Trains the autoencoder, stores its latent statistics in the final checkpoint, and runs
    ``evaluate_vae``.

    The statistics (per-channel mean and standard deviation of posterior means over 16 batches
    of training crops, ``sora_jax.inference.latents.set_latent_statistics``) are written into the model
    after the last step and before the final checkpoint is saved, so every checkpoint restore
    brings them back. With ``vae.kind = "identity"`` nothing is trained: the statistics of the
    training pixels are measured and saved as checkpoint step 0 (kept if one exists already).

    Returns:
      The training summary (``sora_jax.train.trainer.train``; for identity ``steps`` 0) with
      ``vae_kind``, ``latent_shift``, ``latent_scale`` (lists of c floats) and ``eval`` (the
      ``evaluate_vae`` result).

    Raises:
      StageError: no prepared data. FloatingPointError: non-finite training loss.
    """
    save_config(cfg, workdir)
    ds = datasets(workdir)
    p = paths(workdir)
    vae = build_vae(cfg)
    batch_fn = vae_batch_fn({"mnist": ds["moving_mnist_train"], "clips": ds["real_clips_train"]},
                            cfg.vae_train, cfg.vae_train.seed)
    meta = {"config": config_lib.to_json(cfg)}
    if cfg.vae.kind == "identity":
        summary = _identity_vae(vae, batch_fn, p["vae"], meta)
    else:
        if getattr(vae, "shortcut", None) is not None and latest_step(p["vae"]) is None:
            # a fresh run starts from the PCA code of training clips (a resumed one restores)
            batches = [batch_fn(30_000_000 + i)["video"] for i in range(64)]
            clips = [b for b in batches if b.shape[1] > 1][:32] or batches[:32]  # images only
            kept = vae.shortcut.init_from_data(np.concatenate(clips))
            log.info("vae: linear patch shortcut initialised by PCA (%.1f%% of block variance)",
                     100 * kept)
        model = build_vae_train_model(vae, cfg.vae_loss, nnx.Rngs(cfg.seed + 2))
        # the trainer calls on_finish after the last step, before the final checkpoint is saved
        task = TrainTask("vae", model, vae_loss_fn(cfg.vae_loss), batch_fn, meta=meta,
                         optimizer_fn=vae_optimizer_fn(cfg.vae_loss),
                         on_finish=lambda m: set_latent_statistics(m.vae, _stats_batches(batch_fn)))
        summary = train(task, cfg.vae_train, p["vae"], progress=progress)
    codec = VAECodec(vae)
    summary.update(vae_kind=cfg.vae.kind, latent_shift=codec.shift.tolist(),
                   latent_scale=codec.scale.tolist())
    # scored as restored from disk: what later stages load, statistics included
    summary["eval"] = evaluate_vae(cfg, workdir)
    log.info("vae held-out: %s", summary["eval"])
    return summary


def _identity_vae(vae: nnx.Module, batch_fn, run_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Pixel mode's train-vae: the statistics of the training pixels, saved as step 0."""
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        reused = ckpt.latest_step() is not None
        if reused:  # a rerun keeps the statistics that later stages were built on
            ckpt.restore(vae, subtree="vae")
        else:
            set_latent_statistics(vae, _stats_batches(batch_fn))
            # the same layout as a trained VAE's checkpoint, so one restore path serves both
            ckpt.save(0, VAETrainModel(vae), None, meta)
    finally:
        ckpt.close()
    return {"steps": 0, "resumed_from": 0, "reused_checkpoint": reused}
