"""The pipeline's stages, each a function of (config, workdir): what the CLI subcommands run.

A workdir holds everything one run produces::

  config.json          the resolved config
  data/                ArrayRecord datasets + manifest.json          (prepare-data)
  vae/                 checkpoints/ (weights + latent statistics), logs/,
                       evaluate_vae.json                             (train-vae, evaluate-vae)
  latents/             encoded training latents + text_states.npz   (encode, run by train-dit)
  dit/                 checkpoints/, logs/                           (train-dit)
  samples/, eval/      generated videos and prompt-adherence results (generate, evaluate)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax import config as config_lib
from sora_jax.config import ConfigError
from sora_jax.io import to_float

log = logging.getLogger("sora_jax")


class StageError(RuntimeError):
    """A stage cannot run (missing input, impossible request); the message says what to do."""


# ----------------------------------------------------------------------------- paths and models

def paths(workdir: str) -> dict[str, str]:
    """The standard sub-folders and files of a run folder."""
    j = lambda *p: os.path.join(workdir, *p)  # noqa: E731
    return dict(
        config=j("config.json"), data=j("data"), vae=j("vae"), latents=j("latents"), dit=j("dit"),
        vae_eval=j("vae", "evaluate_vae.json"), text_states=j("latents", "text_states.npz"),
        latents_train=j("latents", "latents_train"),
        samples=j("samples"), eval=j("eval"),
    )


def save_config(cfg: ml_collections.ConfigDict, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    with open(paths(workdir)["config"], "w") as f:
        f.write(config_lib.to_json(cfg))


VAE_KINDS = ("causal", "identity")


def vae_kind(cfg: ml_collections.ConfigDict) -> str:
    """``cfg.vae.kind``: "causal" (``CausalVAE``, the default, also for configs written before
    the key existed) or "identity" (``IdentityAutoencoder``: pixel-space mode)."""
    return str(cfg.vae.get("kind", "causal"))


def build_vae(cfg: ml_collections.ConfigDict) -> nnx.Module:
    """The autoencoder of ``cfg.vae``, untrained: ``CausalVAE`` or, for ``vae.kind = "identity"``,
    ``IdentityAutoencoder`` (every other key of the section is passed to the constructor).

    Raises:
      ConfigError: unknown ``vae.kind``. ValueError: the constructor rejects the section.
    """
    kwargs = {k: v for k, v in cfg.vae.to_dict().items() if k != "kind"}
    kind = vae_kind(cfg)
    if kind == "causal":
        from sora_jax.models.vae import CausalVAE

        return CausalVAE(**kwargs, rngs=nnx.Rngs(cfg.seed))
    if kind == "identity":
        from sora_jax.models.pixel import IdentityAutoencoder

        return IdentityAutoencoder(**kwargs)
    raise ConfigError(f"config key 'vae.kind': {kind!r} is not one of {VAE_KINDS}")


def dit_in_dim(cfg: ml_collections.ConfigDict) -> int:
    pt, ph, pw = cfg.dit.patch
    return pt * ph * pw * cfg.vae.latent_channels


def build_dit(cfg: ml_collections.ConfigDict) -> nnx.Module:
    from sora_jax.models.dit import DiT

    return DiT.from_config(cfg.dit, dit_in_dim(cfg), rngs=nnx.Rngs(cfg.seed + 1))


def latent_shape(cfg: ml_collections.ConfigDict, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent (t, h, w, c) of a (frames, height, width) pixel video under ``cfg``.

    Raises:
      StageError: frames is not 1 + 4k (temporal compression), or the size is not a multiple of
        the VAE's spatial compression times the DiT patch.
    """
    v, (pt, ph, pw) = cfg.vae, cfg.dit.patch
    tds, sds = v.temporal_downsample, v.spatial_downsample
    if frames < 1 or (frames - 1) % tds:
        raise StageError(f"impossible frame count {frames}: use 1 + {tds}k frames (1, {1 + tds}, {1 + 2 * tds}, ...)")
    if height <= 0 or width <= 0 or height % (sds * ph) or width % (sds * pw):
        raise StageError(f"impossible size {height}x{width}: height must be a multiple of {sds * ph} "
                         f"and width of {sds * pw}")
    t = 1 + (frames - 1) // tds
    if t % pt:
        raise StageError(f"{frames} frames give {t} latent frames, not divisible by patch {pt}")
    return t, height // sds, width // sds, v.latent_channels


def validate_config(cfg: ml_collections.ConfigDict):
    """Checks the values that every stage relies on, before any work is done.

    Raises:
      ConfigError: naming the key whose value cannot work (durations, sizes, crops, row length).
    """
    def check(key, frames, height, width):
        try:
            return latent_shape(cfg, frames, height, width)
        except StageError as e:
            raise ConfigError(f"config key '{key}': {e}") from None

    _validate_vae(cfg)
    d, s = cfg.data, cfg.sample
    check("sample", s.frames, s.height, s.width)
    t, h, w = cfg.vae_train.crop
    check("vae_train.crop", t, h, w)
    pt, ph, pw = cfg.dit.patch
    longest = 0
    for key, durations, sizes in (("data.durations/data.sizes", d.durations, d.sizes),
                                  ("data.clip_durations/data.clip_sizes", d.clip_durations, d.clip_sizes)):
        for frames in durations:
            for height, width in sizes:
                lt, lh, lw, _ = check(key, frames, height, width)
                longest = max(longest, (lt // pt) * (lh // ph) * (lw // pw))
    for height, width in d.sizes:
        if min(height, width) < d.digit_size:
            raise ConfigError(f"config key 'data.sizes': canvas {height}x{width} is smaller than "
                              f"data.digit_size={d.digit_size}")
    t = cfg.dit_train
    if t.row_length < longest:
        raise ConfigError(f"config key 'dit_train.row_length': {t.row_length} tokens cannot "
                          f"hold the longest training example ({longest} tokens)")
    if not 1 <= t.max_tokens <= t.row_length:
        raise ConfigError(f"config key 'dit_train.max_tokens': {t.max_tokens} must be in "
                          f"[1, row_length={t.row_length}]")
    from sora_jax.data import navit

    if t.resolution not in navit.RESOLUTION_DISTRIBUTIONS:
        raise ConfigError(f"config key 'dit_train.resolution': {t.resolution!r} is not one of "
                          f"{navit.RESOLUTION_DISTRIBUTIONS}")
    if not 0 < t.min_scale <= 1:
        raise ConfigError(f"config key 'dit_train.min_scale': {t.min_scale} is not in (0, 1]")
    if not 0 <= t.token_drop_rate < 1:
        raise ConfigError(f"config key 'dit_train.token_drop_rate': {t.token_drop_rate} is not in [0, 1)")
    if t.token_drop_distribution not in navit.TOKEN_DROP_DISTRIBUTIONS:
        raise ConfigError(f"config key 'dit_train.token_drop_distribution': "
                          f"{t.token_drop_distribution!r} is not one of {navit.TOKEN_DROP_DISTRIBUTIONS}")
    if t.packing_bins < 1 or t.max_examples_per_row < 0:
        raise ConfigError("config keys 'dit_train.packing_bins' (>= 1) / "
                          f"'dit_train.max_examples_per_row' (>= 0, 0 = no cap): got "
                          f"{t.packing_bins} / {t.max_examples_per_row}")
    if cfg.get("conditioning") is not None:
        from sora_jax.diffusion.conditioning import conditioning_settings

        try:
            conditioning_settings(cfg.conditioning)
        except ValueError as e:
            raise ConfigError(f"config section 'conditioning': {e}") from None
    from sora_jax.diffusion.samplers import SOLVERS

    if cfg.sample.get("solver", "euler") not in SOLVERS:
        raise ConfigError(f"config key 'sample.solver': {cfg.sample.solver!r} is not one of {SOLVERS}")
    if not 0 <= cfg.sample.get("strength", 0.6) <= 1:
        raise ConfigError(f"config key 'sample.strength': {cfg.sample.strength} is not in [0, 1]")
    if t.text_length < cfg.text.max_length:
        raise ConfigError(f"config key 'dit_train.text_length': {t.text_length} cannot hold one "
                          f"caption of text.max_length={cfg.text.max_length} tokens")


def _validate_vae(cfg: ml_collections.ConfigDict):
    """The ``vae.kind`` and ``vae_eval`` keys (raises ConfigError naming the key)."""
    v, kind = cfg.vae, vae_kind(cfg)
    if kind not in VAE_KINDS:
        raise ConfigError(f"config key 'vae.kind': {kind!r} is not one of {VAE_KINDS}")
    if kind == "identity":
        for key, want in (("latent_channels", v.in_channels), ("spatial_downsample", 1),
                          ("temporal_downsample", 1), ("patch_size", 1)):
            if v.get(key, want) != want:
                raise ConfigError(f"config key 'vae.{key}': the identity autoencoder needs {want}, "
                                  f"got {v[key]} (pixel patches are set by dit.patch)")
    from sora_jax.train.steps import vae_loss_settings

    try:
        vae_loss_settings(cfg.get("vae_loss"))
    except ValueError as e:
        raise ConfigError(f"config section 'vae_loss': {e}") from None
    inference = cfg.get("vae_inference") or {}
    for key in ("chunk", "tile", "overlap"):
        if int(inference.get(key) or 0) < 0:
            raise ConfigError(f"config key 'vae_inference.{key}': must be >= 0 (0 = off), "
                              f"got {inference[key]}")
    tile, overlap = int(inference.get("tile") or 0), int(inference.get("overlap") or 0)
    if tile and (tile % v.spatial_downsample or overlap % v.spatial_downsample or overlap >= tile):
        raise ConfigError(f"config key 'vae_inference.tile' / 'vae_inference.overlap': {tile} / "
                          f"{overlap} pixels must be multiples of vae.spatial_downsample="
                          f"{v.spatial_downsample}, overlap smaller than tile")
    if "vae_eval" not in cfg:
        return  # a run config written before the section existed; evaluate_vae says so
    from data_pipelines import real_clips, sources

    e = cfg.vae_eval
    tds, sds = v.temporal_downsample, v.spatial_downsample
    if e.video_frames < 1 or (e.video_frames - 1) % tds:
        raise ConfigError(f"config key 'vae_eval.video_frames': {e.video_frames} is not "
                          f"1 + {tds}k frames")
    for key in ("video_size", "image_size"):
        h, w = e[key]
        if h < 1 or w < 1 or h % sds or w % sds:
            raise ConfigError(f"config key 'vae_eval.{key}': {h}x{w} is not a multiple of "
                              f"vae.spatial_downsample={sds}")
    if e.video_source not in sources.VIDEOS or e.video_source in real_clips.TRAIN_VIDEOS:
        raise ConfigError(f"config key 'vae_eval.video_source': {e.video_source!r} is not a "
                          f"held-out bundled video (use {real_clips.HELDOUT_VIDEO!r})")
    bad = [n for n in e.image_sources if n not in sources.PHOTOS or n in real_clips.TRAIN_PHOTOS]
    if bad or not e.image_sources:
        raise ConfigError(f"config key 'vae_eval.image_sources': {bad or 'empty'} are not held-out "
                          f"bundled photos (use some of {list(real_clips.HELDOUT_PHOTOS)})")
    if e.get("max_digits", 0) < 0:
        raise ConfigError(f"config key 'vae_eval.max_digits': must be >= 0, got {e.max_digits}")
    for key in ("max_videos", "max_images", "batch"):
        if e[key] < 1:
            raise ConfigError(f"config key 'vae_eval.{key}': must be >= 1, got {e[key]}")
    for key in ("video_scale", "image_scale"):
        if not e[key] >= 1:
            raise ConfigError(f"config key 'vae_eval.{key}': a downscale factor must be >= 1, "
                              f"got {e[key]}")


def _restore(model: nnx.Module, run_dir: str, what: str, subtree: str | None = None) -> int:
    from sora_jax.train.checkpoint import CheckpointNotFoundError, Checkpointer

    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):  # don't create folders on a typo
        raise StageError(f"no {what} checkpoint in {run_dir}: run `sora-jax train-{what}` first")
    # each process reads the whole model for itself: inference and encoding run per process
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), this_process_only=True)
    try:
        try:
            meta = ckpt.restore(model, subtree=subtree)
        except (ValueError, KeyError) as e:  # a tree that does not match this model
            raise StageError(f"the {what} checkpoint in {run_dir} does not match this config's "
                             f"model (another config, or written by an older sora-jax without "
                             f"latent statistics in the checkpoint: rerun `sora-jax train-{what}` "
                             f"in a new run folder): {str(e)[:300]}") from None
    except CheckpointNotFoundError:
        raise StageError(f"no {what} checkpoint in {run_dir}: run `sora-jax train-{what}` first") from None
    finally:
        ckpt.close()
    return int(meta["step"])


def load_codec(cfg: ml_collections.ConfigDict, workdir: str):
    """The trained autoencoder of a run folder as a ``VAECodec``; its latent statistics come
    back with the checkpoint (the model's ``latent_shift`` / ``latent_scale`` variables).

    Raises:
      StageError: the run folder has no VAE checkpoint.
    """
    from sora_jax.latents import VAECodec

    vae = build_vae(cfg)
    # checkpoints hold a VAETrainModel; inference reads its autoencoder only
    _restore(vae, paths(workdir)["vae"], "vae", subtree="vae")
    inference = cfg.get("vae_inference") or {}
    if vae_kind(cfg) == "identity":  # nothing to chunk or tile
        inference = {}
    return VAECodec(vae, chunk=inference.get("chunk"), tile=inference.get("tile"),
                    overlap=inference.get("overlap"))


def checkpoint_fingerprint(run_dir: str) -> dict[str, Any] | None:
    """What identifies the latest checkpoint of ``run_dir`` (e.g. ``<workdir>/vae``), without
    loading it: ``{"step": int, "sha1": hex}``, the SHA-1 over the relative paths and bytes of
    the files of its saved ``model`` item (weights and latent statistics; a copied run folder
    keeps it, a retrained one changes it). None when there is no checkpoint.
    """
    import hashlib

    step = _latest_step(run_dir)
    if step is None:
        return None
    root = os.path.join(run_dir, "checkpoints", str(step), "model")
    h = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return {"step": int(step), "sha1": h.hexdigest()}


def _datasets(workdir: str) -> dict[str, str]:
    manifest = os.path.join(paths(workdir)["data"], "manifest.json")
    if not os.path.isfile(manifest):
        raise StageError(f"no datasets in {paths(workdir)['data']}: run `sora-jax prepare-data` first")
    with open(manifest) as f:
        names = json.load(f)["datasets"]
    # relative to this data folder, so a moved or copied run folder still finds its data
    return {k: os.path.join(paths(workdir)["data"], os.path.basename(v)) for k, v in names.items()}


# ----------------------------------------------------------------------------------- stages

def prepare_data(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, str]:
    """Builds the offline real-data datasets (Moving MNIST, real clips and photos)."""
    from data_pipelines.build import build_datasets

    d = cfg.data
    extra = {}  # optional keys: older run configs lack them and keep the build defaults
    if "clip_scale_range" in d:
        extra["clip_scale_range"] = tuple(float(v) for v in d.clip_scale_range)
    return build_datasets(
        paths(workdir)["data"], mnist_train=d.mnist_train, mnist_eval=d.mnist_eval,
        heldout_prompts=d.heldout_prompts, clips_train=d.clips_train, clips_eval=d.clips_eval,
        sizes=[tuple(s) for s in d.sizes], durations=list(d.durations), digit_size=d.digit_size,
        two_digit_prob=d.two_digit_prob, clip_sizes=[tuple(s) for s in d.clip_sizes],
        clip_durations=list(d.clip_durations), num_shards=d.num_shards, seed=cfg.seed,
        progress=progress, **extra,
    )


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
      StageError: no VAE checkpoint, or the config has no ``vae_eval`` section.
      ValueError: a set does not fit the sources or the autoencoder.
    """
    from sora_jax.evaluation.vae_eval import evaluate_codec, reconstruction_scores
    from sora_jax.io import write_json

    if "vae_eval" not in cfg:
        raise StageError("the config has no 'vae_eval' section (a run config written before "
                         "evaluate-vae existed): pass --config configs/<name>.py")
    step = None
    if codec is None:  # a given codec may be any model: no step to report
        codec = load_codec(cfg, workdir)
        step = _latest_step(paths(workdir)["vae"])
    e = cfg.vae_eval
    result: dict[str, Any] = evaluate_codec(codec, e)
    result.update(vae_kind=vae_kind(cfg), checkpoint_step=step)
    if os.path.isfile(os.path.join(paths(workdir)["data"], "manifest.json")):
        from data_pipelines.records import read_dataset

        data = read_dataset(_datasets(workdir)["moving_mnist_eval"])
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
    of training crops, ``sora_jax.latents.set_latent_statistics``) are written into the model
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
    from sora_jax.data.pipeline import vae_batch_fn
    from sora_jax.latents import VAECodec, set_latent_statistics

    save_config(cfg, workdir)
    ds = _datasets(workdir)
    p = paths(workdir)
    vae = build_vae(cfg)
    batch_fn = vae_batch_fn({"mnist": ds["moving_mnist_train"], "clips": ds["real_clips_train"]},
                            cfg.vae_train, cfg.vae_train.seed)
    meta = {"config": config_lib.to_json(cfg)}
    if vae_kind(cfg) == "identity":
        summary = _identity_vae(vae, batch_fn, p["vae"], meta)
    else:
        from sora_jax.models.vae_gan import build_vae_train_model
        from sora_jax.train.steps import vae_loss_fn, vae_optimizer_fn
        from sora_jax.train.trainer import TrainTask, train

        if getattr(vae, "shortcut", None) is not None and _latest_step(p["vae"]) is None:
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
    summary.update(vae_kind=vae_kind(cfg), latent_shift=codec.shift.tolist(),
                   latent_scale=codec.scale.tolist())
    # scored as restored from disk: what later stages load, statistics included
    summary["eval"] = evaluate_vae(cfg, workdir)
    log.info("vae held-out: %s", summary["eval"])
    return summary


def _identity_vae(vae: nnx.Module, batch_fn, run_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Pixel mode's train-vae: the statistics of the training pixels, saved as step 0."""
    from sora_jax.latents import set_latent_statistics
    from sora_jax.train.checkpoint import Checkpointer

    from sora_jax.models.vae_gan import VAETrainModel

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


@functools.lru_cache(maxsize=2)
def text_encoder(max_length: int):
    """The frozen MiniLM :class:`TextEncoder` for ``max_length`` tokens, loaded once per process
    (the quickstart needs it in three stages, ``data_pipelines.encode`` in another)."""
    from sora_jax.models.text_encoder import TextEncoder

    return TextEncoder(max_length=max_length)


def encode_latents(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Encodes the DiT's training clips to normalised latents and captions to text states.

    The clips are Moving MNIST's, plus, when ``dit_train.real_clips`` is set, the real video
    crops and photos of ``real_clips_train`` (so that image and video prompts on real media
    land on latents the DiT has seen).

    Writes ``latents/latents_train-*.array_record`` (``latent``, ``caption_id``, ``caption``) and
    ``latents/text_states.npz`` (``captions``, ``states`` (N, Lt, 384), ``masks`` (N, Lt)).
    Idempotent: skipped when both exist and were made from the current VAE checkpoint (step and
    contents, ``checkpoint_fingerprint``), text length and dataset size.
    """
    from data_pipelines.records import read_dataset, write_array_record

    datasets = _datasets(workdir)
    p = paths(workdir)
    os.makedirs(p["latents"], exist_ok=True)
    stamp = os.path.join(p["latents"], "done.json")
    names = ["moving_mnist_train"] + (["real_clips_train"] if cfg.dit_train.get("real_clips") else [])
    sources = [read_dataset(datasets[n]) for n in names]
    # what the encoded files depend on: a change in any of these re-encodes
    key = {"vae_checkpoint": checkpoint_fingerprint(p["vae"]), "text_max_length": cfg.text.max_length,
           "num_examples": sum(len(src) for src in sources), "datasets": names}
    if os.path.isfile(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if all(done.get(k) == v for k, v in key.items()):
            return done
    codec = load_codec(cfg, workdir)
    records = [src[i] for src in sources for i in range(len(src))]
    captions = sorted({str(r["caption"]) for r in records})
    cid = {c: i for i, c in enumerate(captions)}
    states, masks = text_encoder(cfg.text.max_length).encode(captions, pad_to=cfg.text.max_length)
    np.savez(p["text_states"], captions=np.asarray(captions), states=states.astype(np.float32),
             masks=masks.astype(bool))
    by_shape: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        by_shape.setdefault(r["video"].shape, []).append(i)
    latents: list[np.ndarray | None] = [None] * len(records)
    bs = 32
    with tqdm(total=len(records), desc="encode latents", disable=not progress) as bar:
        for shape, idx in sorted(by_shape.items()):
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                x = to_float(np.stack([records[i]["video"] for i in chunk]))
                for i, z in zip(chunk, codec.encode(x)):
                    latents[i] = z
                bar.update(len(chunk))
    write_array_record(
        p["latents_train"],
        ({"latent": latents[i].astype(np.float32), "caption_id": np.int32(cid[str(r["caption"])]),
          "caption": str(r["caption"])} for i, r in enumerate(records)),
        num_shards=cfg.data.num_shards,
    )
    info = dict(key, num_captions=len(captions))
    with open(stamp, "w") as f:
        json.dump(info, f)
    return info


def _latest_step(run_dir: str) -> int | None:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
    return max(steps) if steps else None


def dit_sources(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True):
    """The DiT's training records for this process: (MapDataset, text table or None).

    ``dit_train.data`` empty: the run's own encoded Moving MNIST latents (captions as ids into
    ``text_states.npz``). Otherwise ``"prefix[:weight],..."``: datasets written by
    ``sora-jax encode`` (text states inline), mixed by weight.

    Raises:
      StageError: a listed dataset is missing or empty, a weight is not a positive number, or
        its latents have another channel count than ``vae.latent_channels``.
    """
    from data_pipelines.records import read_dataset
    from sora_jax.data.pipeline import mixed_source
    from sora_jax.parallel.distributed import main_process_first

    pi, pc = jax.process_index(), jax.process_count()
    spec = str(cfg.dit_train.data).strip()
    if not spec:  # encoded once, by process 0; the others wait, then read the files
        main_process_first(lambda: encode_latents(cfg, workdir, progress=progress), "encode_latents")
        p = paths(workdir)
        text = np.load(p["text_states"])
        return (mixed_source([read_dataset(p["latents_train"])], process_index=pi, process_count=pc),
                (text["states"], text["masks"]))
    from data_pipelines.encode import read_encoded

    datasets, weights = [], []
    for item in spec.split(","):
        prefix, _, weight = item.strip().rpartition(":")
        try:
            w = float(weight)
        except ValueError:  # no weight (a ':' may belong to the path, e.g. gs://)
            prefix, w = item.strip(), 1.0
        if w <= 0 or not prefix:
            raise StageError(f"config key 'dit_train.data': bad weight in {item!r} "
                             "(expected prefix[:positive weight])")
        try:
            ds = read_encoded(prefix)
        except FileNotFoundError as e:
            raise StageError(f"config key 'dit_train.data': {e}") from None
        if len(ds) == 0:
            raise StageError(f"config key 'dit_train.data': {prefix} holds no records")
        channels = np.shape(ds[0]["latent"])[-1]
        if channels != cfg.vae.latent_channels:  # latents of another VAE than this config's
            raise StageError(f"config key 'dit_train.data': {prefix} holds {channels}-channel "
                             f"latents but vae.latent_channels is {cfg.vae.latent_channels}; "
                             "train with the config of the VAE run that encoded them")
        datasets.append(ds)
        weights.append(w)
    return mixed_source(datasets, weights, process_index=pi, process_count=pc), None


def train_dit(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Trains the DiT with rectified flow on NaViT-packed batches (encoding latents if needed).

    On several processes every process calls this: process 0 encodes the latents while the
    others wait, then each trains on its own shard of them over the config's ``mesh``.

    Raises:
      StageError: several processes and no ``mesh`` section; see also :func:`dit_sources`.
    """
    from sora_jax.data.pipeline import packed_dataset
    from sora_jax.model_info import model_info
    from sora_jax.parallel.distributed import main_process_first
    from sora_jax.train.steps import dit_loss_fn
    from sora_jax.train.trainer import TrainTask, train

    main_process_first(lambda: save_config(cfg, workdir), "save_config")
    source, text_table = dit_sources(cfg, workdir, progress)
    t = cfg.dit_train
    dataset = packed_dataset(source, t, tuple(cfg.dit.patch), t.seed, text_table=text_table,
                             process_count=jax.process_count())
    mesh, rules = None, None
    if cfg.get("mesh") is not None:
        from sora_jax.parallel.mesh import create_mesh
        from sora_jax.parallel.sharding import create_sharded

        mesh, rules = create_mesh(cfg.mesh), cfg.mesh.rules
        # Over several devices the parameters are made on their shards (a big model never
        # whole on one host); on one device the eager build is kept, as earlier runs made it
        # (the jitted initialisers round a few values differently, by ~1e-8).
        dit = create_sharded(lambda: build_dit(cfg), mesh, rules) if mesh.size > 1 else build_dit(cfg)
    elif jax.process_count() > 1:
        raise StageError("train-dit on several processes needs a 'mesh' config section "
                         "(configs/common.py mesh_section) to shard the batch over them")
    else:
        dit = build_dit(cfg)
    # model FLOPs of a step for MFU: every row position is counted (padding included), and
    # attention over the whole row, as the packed step computes it
    tokens = int(t.batch_size) * int(t.row_length)
    flops = 3.0 * model_info(cfg, seq_len=int(t.row_length))["flops_per_token"] * tokens
    task = TrainTask("dit", dit, dit_loss_fn(cfg.flow, cfg.get("conditioning")), None,
                     meta={"config": config_lib.to_json(cfg)}, dataset=dataset,
                     tokens_per_step=tokens, flops_per_step=flops)
    summary = train(task, cfg.dit_train, paths(workdir)["dit"], progress=progress, mesh=mesh,
                    rules=rules)
    if not str(cfg.dit_train.data).strip():
        summary["heldout_loss"] = dit_heldout_loss(cfg, workdir, dit)
    return summary


def dit_heldout_loss(cfg: ml_collections.ConfigDict, workdir: str, dit: nnx.Module, num_batches: int = 4) -> float:
    """Mean rectified-flow loss on held-out digit instances (``moving_mnist_eval``), fixed noise."""
    from data_pipelines.records import read_dataset
    from sora_jax.data.packing import pack, patchify
    from sora_jax.data.pipeline import PACKED_KEYS
    from sora_jax.diffusion.flow import rectified_flow_loss

    codec = load_codec(cfg, workdir)
    data = read_dataset(_datasets(workdir)["moving_mnist_eval"])
    records = [data[i] for i in range(len(data))]
    states, masks = text_encoder(cfg.text.max_length).encode([str(r["caption"]) for r in records],
                                              pad_to=cfg.text.max_length)
    examples = []
    for r, s, m in zip(records, states, masks):
        x = to_float(r["video"])[None]
        tokens, positions = patchify(codec.encode(x)[0], tuple(cfg.dit.patch))
        examples.append(dict(tokens=tokens, positions=positions, text=s, text_mask=m))
    t = cfg.dit_train
    kwargs = dict(cfg.flow.to_dict(), caption_dropout=0.0)
    graphdef, state = nnx.split(dit)
    loss_jit = jax.jit(lambda st, b, k: rectified_flow_loss(nnx.merge(graphdef, st), b, k, **kwargs)[0])
    losses, k = [], 10  # examples per scored batch, each in its own row
    for b in range(num_batches):
        chunk = examples[b * k : (b + 1) * k]
        if not chunk:
            break
        # one row per example at most: every held-out example is scored, none dropped
        batch, _, dropped = pack(chunk, batch_size=len(chunk), length=t.row_length, text_length=t.text_length)
        assert dropped == 0
        batch = {key: batch[key] for key in PACKED_KEYS}
        losses.append(float(loss_jit(state, batch, jax.random.key(1000 + b))))
    return float(np.mean(losses))


# ------------------------------------------------------------------------------- generation

# Re-exported: generation lives in sora_jax.generate; evaluate() and older callers import it here.
from sora_jax.generate import Generator, Request, write_samples  # noqa: E402,F401


def heldout_prompts(cfg: ml_collections.ConfigDict, workdir: str, limit: int) -> list[str]:
    """Captions of held-out digit/motion combinations on held-out digit instances (single digit)."""
    from data_pipelines.records import read_dataset

    data = read_dataset(_datasets(workdir)["moving_mnist_heldout_prompts"])
    captions = [str(data[i]["caption"]) for i in range(len(data))]
    return captions[:limit]


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, generator: Generator | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Prompt adherence on held-out prompts: digit and direction accuracy of generated samples."""
    from sora_jax.evaluation.digits import evaluate_samples
    from sora_jax.io import write_json

    gen = generator or Generator(cfg, workdir)
    s, e = cfg.sample, cfg.evaluate
    prompts = heldout_prompts(cfg, workdir, e.num_samples)
    if not prompts:
        raise StageError("no held-out prompts to evaluate: data.heldout_prompts and evaluate.num_samples must be > 0")
    videos = []
    for i in tqdm(range(0, len(prompts), e.batch), desc="evaluate", disable=not progress):
        videos += gen(prompts[i : i + e.batch], frames=s.frames, height=s.height, width=s.width,
                      seed=s.seed + i, guidance=s.cfg, steps=s.steps, solver=s.get("solver", "euler"))
    result = evaluate_samples(videos, prompts)
    out = paths(workdir)["eval"]
    info = {"checkpoint_step": gen.dit_step, "seed": s.seed, "cfg": s.cfg, "steps": s.steps}
    result["samples"] = write_samples(out, prompts[:8], videos[:8], info, fps=s.fps)
    write_json(os.path.join(out, "evaluate.json"), result)
    return result


# The quickstart's image and video prompts on bundled real media: (mode, prompt, inputs, options).
# Inputs name bundled sources: "video:<name>:<first frame>:<stride>" or "photo:<name>".
DEMO_MODES = (
    ("t2v", "the digit 3 moves left and the digit 7 moves up", (), {}),
    ("t2i", "the digit 8", (), {}),
    ("i2v", "a clip from bikes", ("photo:motorcycle_left",), {}),
    ("extend-forward", "a clip from big buck bunny", ("video:bigbuckbunny:40:2",), {}),
    ("extend-backward", "a clip from big buck bunny", ("video:bigbuckbunny:90:2",), {}),
    ("connect", "a clip from bikes", ("video:bikes:0:2", "video:bigbuckbunny:20:2"), {}),
    ("loop", "the digit 5 moves up", (), {}),
    ("edit", "the digit 3 moves right", ("video:bikes:100:2",), {"strength": 0.6}),
)


def _demo_input(spec: str, frames: int) -> np.ndarray:
    from data_pipelines import sources

    kind, name, *rest = spec.split(":")
    if kind == "photo":
        return np.asarray(sources.load_photo(name))
    start, stride = (int(v) for v in rest)
    video = sources.load_video(name, max_frames=start + stride * frames)
    return np.asarray(video[start::stride][:frames])


def prompt_modes(cfg: ml_collections.ConfigDict, workdir: str, generator: Generator | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """One sample of every prompt mode (``DEMO_MODES``) on bundled real media, with provenance.

    Writes ``<workdir>/modes/``: ``<mode>.mp4`` (``.png`` for t2i) with a ``.json`` sidecar each,
    ``contact_sheet.png`` (one row per mode) and ``modes.json`` (each mode's measurements:
    ``conditioned_frames_psnr``, ``loop_seam_ratio``, ``input_psnr``).
    """
    from sora_jax.generate import provenance_fields, write_sample
    from sora_jax.io import write_contact_sheet, write_json
    from sora_jax.modes import run_mode
    from sora_jax.prompts import make_extender

    gen = generator or Generator(cfg, workdir)
    s = cfg.sample
    extend = make_extender((cfg.get("prompt") or {}).get("extender", "caption_style"))
    out = os.path.join(workdir, "modes")
    solver, visual = s.get("solver", "euler"), s.get("visual_cfg", 1.0)
    visual = None if visual == 1.0 else visual
    results, videos, labels = {}, [], []
    for mode, prompt, specs, opts in tqdm(DEMO_MODES, desc="modes", disable=not progress):
        inputs = [_demo_input(spec, 2 * s.frames) for spec in specs]
        ext = extend(prompt)
        res = run_mode(gen, mode, ext, frames=s.frames, height=s.height, width=s.width, seed=s.seed,
                       guidance=s.cfg, steps=s.steps, solver=solver, visual_guidance=visual,
                       inputs=inputs, strength=opts.get("strength", s.get("strength", 0.6)))
        fields = provenance_fields(gen, solver=solver, steps=s.steps, guidance=s.cfg,
                                   visual_guidance=visual, inputs=[{"source": sp} for sp in specs])
        results[mode] = write_sample(os.path.join(out, mode), res.video, prompt=prompt,
                                     extended_prompt=ext, seed=s.seed, fields=fields, info=res.info,
                                     fps=s.fps)
        videos.append(res.video)
        labels.append(f"{mode}: {ext}")
    write_contact_sheet(os.path.join(out, "contact_sheet.png"), videos, labels=labels,
                        max_frames=max(len(v) for v in videos), scale=max(1, 64 // max(s.height, s.width)))
    write_json(os.path.join(out, "modes.json"), results)
    return results


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

    from sora_jax.parallel.distributed import main_process_first

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
    from sora_jax.io import write_json

    gen = Generator(cfg, workdir)
    ev = timed("evaluate", evaluate, cfg, workdir, gen, progress)
    modes = timed("modes", prompt_modes, cfg, workdir, gen, progress)
    ve = vae["eval"]
    metrics = {
        "vae_psnr_heldout_video": ve["video_psnr"],
        "vae_ssim_heldout_video": ve["video_ssim"],
        "vae_psnr_heldout_image": ve["image_psnr"],
        "vae_ssim_heldout_image": ve["image_ssim"],
        "vae_psnr_heldout_digits": ve.get("digits_psnr"),
        "vae_ssim_heldout_digits": ve.get("digits_ssim"),
        "vae_eval_sets": {"video": ve["video_set"], "image": ve["image_set"],
                          "digits": ve.get("digits_set")},
        "dit_heldout_loss": dit["heldout_loss"],
        "dit_final_train_loss": dit.get("final_loss"),
        "digit_accuracy": ev["digit_accuracy"],
        "direction_accuracy": ev["direction_accuracy"],
        "num_eval_samples": ev["num_samples"],
        "samples": ev["samples"],
        "modes": {m: {k: v for k, v in r.items() if k in (
            "conditioned_frames_psnr", "decoded_context_psnr", "junction_ratio", "loop_seam_ratio",
            "clip_seam_ratio", "input_psnr", "strength", "frames", "path")} for m, r in modes.items()},
        "stage_seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "config": cfg.name,
    }
    write_json(os.path.join(workdir, "quickstart_metrics.json"), metrics)
    return metrics
