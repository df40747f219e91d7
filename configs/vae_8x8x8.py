"""Autoencoder 8x8x8, 32 latent channels: 8x in time (frames are 1 + 8k), same 48:1 compression.

Run: ``sora-jax train-vae --config configs/vae_8x8x8.py --workdir runs/vae_8x8x8`` (after
``prepare-data``), then ``sora-jax evaluate-vae --workdir runs/vae_8x8x8``. Same data, losses
and evaluation sets as ``configs/vae_4x8x8_c16.py``; the 17-frame crops give 3 latent frames.
"""

import ml_collections

from sora_jax.configs import quickstart
from sora_jax.configs.vae_4x8x8_c16 import vae_run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = vae_run(quickstart.get_config(), "vae_8x8x8")
    c.vae = dict(kind="causal", in_channels=3, latent_channels=32, base_channels=64,
                 channel_mults=(1, 2, 2, 2), num_res_blocks=2, spatial_downsample=8,
                 temporal_downsample=8, patch_size=4, patch_shortcut=True, logvar_init=-6.0)
    c.vae_train.crop = (17, 64, 64)
    c.vae_train.batch_size = 2
    c.sample.frames = 9  # 1 + 8k
    return c
