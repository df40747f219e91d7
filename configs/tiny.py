"""Tiny everything: seconds per stage on a CPU. Used by the tests and for smoke runs.

Run: ``sora-jax quickstart --config configs/tiny.py --workdir /tmp/sora_tiny``
"""

import ml_collections

from sora_jax.configs import quickstart


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = quickstart.get_config(arg)
    c.name = "tiny"
    c.data.update(mnist_train=48, mnist_eval=8, heldout_prompts=4, clips_train=16, clips_eval=4)
    c.vae.update(base_channels=8, channel_mults=(1, 1), latent_channels=4)
    c.vae_train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=1)
    c.dit.update(hidden_size=32, depth=1, num_heads=2)
    c.dit_train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=1,
                       packing_bins=2)
    c.vae_eval.update(max_videos=3, max_images=3, max_digits=4, batch=2)
    c.sample.update(steps=2)
    c.evaluate.update(num_samples=2, seeds=2, batch=2, loop_samples=2)
    return c
