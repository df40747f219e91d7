"""Config pieces shared by every run config (importable as ``configs.common``)."""

import ml_collections


def train_section(**overrides) -> ml_collections.ConfigDict:
    """Optimizer and loop settings read by ``sora_jax.train.trainer.train``."""
    cfg = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=8,
            learning_rate=3e-4,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.0,
            grad_clip=1.0,
            b1=0.9,
            b2=0.99,
            seed=0,
            log_every=10,
            checkpoint_every=500,
            max_to_keep=2,
        )
    )
    cfg.update(overrides)
    return cfg


def packing_section(**overrides) -> dict:
    """NaViT input settings of a DiT ``train`` section (``sora_jax.data.pipeline.packed_dataset``).

    row_length / text_length: latent / text tokens per packed row (L, Lt).
    max_tokens: per-example token budget; larger examples are resampled down, aspect kept.
    resolution: "native" (keep stored size unless over budget) or "uniform" (NaViT's random
      resolution: side scale ~ U(min_scale, 1)).
    token_drop_rate / token_drop_distribution: NaViT token dropping, "fixed" rate or U(0, rate).
    packing_bins: rows filled at once by first-fit packing (more bins, less padding).
    max_examples_per_row: cap on examples per row (0 = none).
    data: training latents, "prefix[:weight],prefix[:weight]" (e.g. images and videos encoded
      apart, mixed by weight); "" = the run's own encoded Moving MNIST latents.
    real_clips: with data "", also the run's real video crops and photos (real_clips_train).
    """
    cfg = dict(row_length=256, text_length=64, max_tokens=256, resolution="native", min_scale=0.5,
               token_drop_rate=0.0, token_drop_distribution="fixed", packing_bins=8,
               max_examples_per_row=8, data="", real_clips=False)
    cfg.update(overrides)
    return cfg
