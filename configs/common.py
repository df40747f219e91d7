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
