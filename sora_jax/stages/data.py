"""``prepare-data``: the offline real-data datasets of a run folder."""

from __future__ import annotations

import ml_collections

from sora_jax.data.bundled import build_datasets
from sora_jax.train.run_folder import paths


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, str]:
    """Builds the bundled real-data datasets (Moving MNIST, real clips and photos) into
    ``<workdir>/data`` from ``cfg.data`` (:func:`sora_jax.data.bundled.build_datasets`; a
    second call with the same settings returns at once).

    Returns:
      dataset name -> record prefix.
    """
    d = cfg.data
    return build_datasets(
        paths(workdir)["data"], mnist_train=d.mnist_train, mnist_eval=d.mnist_eval,
        heldout_prompts=d.heldout_prompts, clips_train=d.clips_train, clips_eval=d.clips_eval,
        sizes=[tuple(s) for s in d.sizes], durations=list(d.durations), digit_size=d.digit_size,
        two_digit_prob=d.two_digit_prob, clip_sizes=[tuple(s) for s in d.clip_sizes],
        clip_durations=list(d.clip_durations), speed_range=tuple(d.speed_range),
        mnist_fps=d.mnist_fps, photo_fraction=d.photo_fraction,
        clip_scale_range=tuple(float(v) for v in d.clip_scale_range), num_shards=d.num_shards,
        seed=cfg.seed, progress=progress,
    )
