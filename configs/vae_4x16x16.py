"""High-compression autoencoder 4x16x16 with 64 latent channels (DC-AE / LTX-Video style).

Run: ``sora-jax train-vae --config configs/vae_4x16x16.py --workdir runs/vae_4x16x16`` (after
``prepare-data``), then ``sora-jax evaluate-vae --workdir runs/vae_4x16x16``. Same 48:1
compression as ``configs/vae_4x8x8_c16.py`` but 4x fewer latent positions, so the DiT sees 4x
fewer tokens per video: the trade DC-AE and LTX-Video make. The DiT patch is (1, 1, 1).
"""

import ml_collections

from sora_jax.configs import quickstart
from sora_jax.configs.vae_4x8x8_c16 import vae_run


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = vae_run(quickstart.get_config(), "vae_4x16x16")
    c.vae = dict(kind="causal", in_channels=3, latent_channels=64, base_channels=64,
                 channel_mults=(1, 2, 4), num_res_blocks=2, spatial_downsample=16,
                 temporal_downsample=4, patch_size=4, patch_shortcut=True, logvar_init=-6.0)
    c.dit.patch = (1, 1, 1)
    return c
