"""Pixel-space quickstart: no VAE, the DiT denoises (1, 8, 8) patches of RGB pixels.

Run: ``sora-jax quickstart --config configs/pixel.py --workdir runs/pixel``
(``--config configs/pixel.py:tiny``: the same change on ``configs/tiny.py``, seconds per stage,
for tests and smoke runs).

The seed's VAE-free alternative (DESIGN.md): ``vae.kind = "identity"`` selects
``sora_jax.models.pixel.IdentityAutoencoder``, whose "latents" are the pixels standardised per
RGB channel. ``train-vae`` trains nothing: it measures the per-channel mean and standard
deviation of the training pixels and saves them as checkpoint step 0, so ``train-dit``,
``generate``, ``evaluate``, ``evaluate-vae`` and ``encode`` run unchanged (``evaluate-vae``
then measures the identity round trip: float rounding only).

Same data, text encoder and DiT width / depth as ``configs/quickstart.py``; what changes is the
token grid. Without the VAE's 4x temporal and 4x4 spatial compression, a 9x32x32 clip is
9 x 4 x 4 = 144 tokens of 8 x 8 x 3 = 192 pixel values (the quickstart: 3 x 4 x 4 = 48 latent
tokens), and a 9x48x32 clip 216 tokens. Hence rows of 512 tokens (a 216-token clip plus smaller
examples), 128 text tokens per row (8 captions of 16), and the timestep shift's base at 144
tokens. Temporal patches must stay 1: a 1-frame image has one frame to patch.

Cost: a DiT step on 2 rows of 512 pixel tokens took 3.1x the quickstart's step on 2 rows of 256
latent tokens (``benchmarks/step_time.py`` on the project's shared 2-core CPU: 1.08 s vs
0.35 s), so 1500 DiT steps here cost about the quickstart's 4500: equal compute, not equal
steps. Sample quality of this config has not been measured yet.
"""

import ml_collections

from sora_jax.configs import quickstart, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "tiny"):
        raise ValueError(f"configs/pixel.py takes no argument or 'tiny', got {arg!r}")
    c = tiny.get_config() if arg == "tiny" else quickstart.get_config()
    c.name = "pixel_tiny" if arg == "tiny" else "pixel"
    c.vae = ml_collections.ConfigDict(dict(
        kind="identity", in_channels=3, latent_channels=3, spatial_downsample=1,
        temporal_downsample=1, patch_size=1,
    ))
    c.dit.patch = (1, 8, 8)
    c.flow.base_tokens = 144
    c.dit_train.update(row_length=512, text_length=128, max_tokens=512)
    if arg != "tiny":
        c.dit_train.update(steps=1500, checkpoint_every=500)
    return c
