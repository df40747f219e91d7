"""Default-scale run: the 8x8-spatial, 16-channel VAE and a DiT-B-sized denoiser.

Meant for an accelerator (hours on a CPU). Run:
``sora-jax quickstart --config configs/default.py --workdir runs/default``

Differences from the quickstart: 64x64 / 64x96 / 96x64 Moving MNIST with 28-pixel digits and
17-frame clips, real crops at 64x64 / 64x96; VAE 4x8x8 with 16 latent channels (the Wan /
HunyuanVideo / CogVideoX shape); DiT width 768, depth 12, 12 heads over (1, 2, 2) patches.
"""

import ml_collections

from sora_jax.configs import quickstart


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = quickstart.get_config(arg)
    c.name = "default"
    c.data.update(
        mnist_train=20000, mnist_eval=1000, heldout_prompts=200, clips_train=4000, clips_eval=200,
        sizes=((64, 64), (64, 96), (96, 64)), durations=(1, 17), digit_size=28,
        clip_sizes=((64, 64), (64, 96)), clip_durations=(1, 17), num_shards=8,
    )
    c.vae.update(latent_channels=16, base_channels=64, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                 spatial_downsample=8)
    c.vae_train.update(steps=50000, batch_size=16, learning_rate=3e-4, warmup_steps=1000,
                       checkpoint_every=2000, log_every=50)
    c.vae_train.crop = (17, 64, 64)
    c.dit.update(hidden_size=768, depth=12, num_heads=12, attention_backend="auto")
    c.flow.update(base_tokens=256)
    c.dit_train.update(steps=100000, batch_size=32, learning_rate=2e-4, warmup_steps=2000,
                       checkpoint_every=2000, log_every=50, row_length=4096, text_length=512,
                       max_tokens=2048, resolution="uniform", packing_bins=32,
                       max_examples_per_row=64)
    c.sample.update(frames=17, height=64, width=64, steps=50)
    c.evaluate.update(num_samples=200, batch=32)
    return c
