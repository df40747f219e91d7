"""The DiT model-size ladder: DiT-S/B/L/XL (Peebles & Xie 2023, Table 1) and Wan-shaped sizes.

Shapes (hidden, depth, heads): S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16;
``wan-1.3b`` 1536/30/12 with MLP 8960, ``wan-14b`` 5120/40/40 with MLP 13824 (Wan 2.1's
transformer shapes, with its shared timestep modulation: ``dit.adaln = "single"``; our text
encoder stays). Patch 1x2x2 over the 16-channel latents of ``configs/vae_4x8x8_c16.py``.

Append ``-class`` (``configs/dit_ladder.py:XL-class``) for the class-conditional variant of
the DiT paper: 1000-class label embedding instead of text cross-attention, fixed sin-cos
positions, no QK-norm, 4-channel 32x32 latents with patch 2; its parameter counts match the
paper's 33M / 130M / 458M / 675M (``tests/test_model_info.py``).

  sora-jax model-info --config configs/dit_ladder.py:XL --json
  sora-jax train-dit  --config configs/dit_ladder.py:B --config.mesh.ici.fsdp=-1 --config.mesh.ici.data=1
"""

import ml_collections

from sora_jax.configs import quickstart

SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "B": dict(hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "L": dict(hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0),
    # Wan 2.1 shares one timestep-modulation MLP across blocks: adaLN-single
    "wan-1.3b": dict(hidden_size=1536, depth=30, num_heads=12, mlp_ratio=8960 / 1536, adaln="single"),
    "wan-14b": dict(hidden_size=5120, depth=40, num_heads=40, mlp_ratio=13824 / 5120, adaln="single"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "B"
    is_class = name.endswith("-class")
    size = name[:-len("-class")] if is_class else name
    if size not in SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose from {sorted(SIZES)} (optionally + '-class')")
    c = quickstart.get_config()
    c.name = f"dit_{name}".replace(".", "_").lower()
    c.dit.update(SIZES[size])
    c.dit.patch = (1, 2, 2)
    c.dit.remat = True  # with scan_layers: the backward keeps each layer's input only
    c.dit.remat_policy = "nothing_saveable"
    c.dit.scan_layers = True
    c.dit.attention_backend = "auto"
    if is_class:
        c.dit.update(num_classes=1000, pos_embed="sincos", qk_norm=False)
        c.vae.latent_channels = 4
        c.model_info = dict(latent=(1, 32, 32))  # 256x256 images in SD's 8x VAE: 256 tokens
    else:
        c.vae.update(latent_channels=16)
        c.model_info = dict(latent=(5, 32, 32))  # 17x256x256 clips in the 4x8x8 VAE: 1280 tokens
    return c
