"""Autoencoder 4x8x8, 16 latent channels (the Wan / HunyuanVideo / CogVideoX shape): CPU recipe.

Run (about 55 minutes on a 2-core CPU, 64x64 crops)::

  sora-jax prepare-data --config configs/vae_4x8x8_c16.py --workdir runs/vae_4x8x8_c16
  sora-jax train-vae    --config configs/vae_4x8x8_c16.py --workdir runs/vae_4x8x8_c16
  sora-jax evaluate-vae --workdir runs/vae_4x8x8_c16

Compression 4x8x8x3 / 16 = 48 values per latent value. The convolutional trunk folds 4x4 pixel
blocks into channels first (``patch_size``, as LTX-Video and DC-AE do), so its widest layers run
at 1/16 of the pixels; a learned linear patch shortcut (``patch_shortcut``) gives the encoder and
decoder a linear path from each 4x8x8 pixel block to its latent and back, so training starts from
a PCA-like code and the convolutions learn the non-linear remainder.

The training mix is the bundled real video (bigbuckbunny, bikes), the training photos and a
little Moving MNIST, as 17-frame clips and single images; the evaluation sets (carphone_pristine
17x64x64 clips at native resolution, coffee + flower photo tiles) are never trained on. The
adversarial term is off in the CPU recipe (``vae_loss.gan_weight`` 0: at this budget it would
only cost PSNR and step time); ``configs/vae_4x8x8_c16.py:gpu`` turns it on at step 20000 of a
long run (PatchGAN 3D discriminator, hinge loss, adaptive weight).

The DiT stages also run with this config (Moving MNIST at 32x32 / 32x48, patch (1, 2, 2)).
"""

import ml_collections

from sora_jax.configs import quickstart


def vae_run(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Shared by the autoencoder configs: 64x64 real-video data, losses, evaluation sets."""
    c.name = name
    # Real crops at 64x64, 17 frames (1 + 4k and 1 + 8k), from 1-4x downscaled source frames;
    # the Moving MNIST part stays at the quickstart's sizes for the DiT stages.
    c.data.update(clips_train=1000, clips_eval=16, clip_sizes=((64, 64),), clip_durations=(1, 17),
                  clip_scale_range=(1.0, 4.0))
    c.vae_loss = dict(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, ssim_weight=0.2,
                      gan_weight=0.0, disc_start=0, adaptive_weight=True,
                      max_adaptive_weight=1e4, disc_channels=32, disc_layers=3, disc_lr_mult=1.0)
    c.vae_train.update(steps=2200, batch_size=4, learning_rate=1e-3, warmup_steps=100,
                       checkpoint_every=300, log_every=25)
    c.vae_train.crop = (9, 64, 64)
    c.vae_train.image_prob = 0.2
    c.vae_train.mnist_weight = 0.1
    c.vae_inference.update(chunk=2)  # evaluation and generation decode in time chunks
    c.vae_eval.update(video_frames=17, video_size=(64, 64), video_scale=1.0, max_videos=28,
                      image_size=(64, 64), image_scale=2.0, max_images=32)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None (CPU recipe) or "gpu" (a wider model, 128x128 crops, the GAN on)."""
    c = vae_run(quickstart.get_config(), "vae_4x8x8_c16")
    c.vae = dict(kind="causal", in_channels=3, latent_channels=16, base_channels=64,
                 channel_mults=(1, 2, 2), num_res_blocks=2, spatial_downsample=8,
                 temporal_downsample=4, patch_size=4, patch_shortcut=True, logvar_init=-6.0)
    if arg == "gpu":
        c.name = "vae_4x8x8_c16_gpu"
        c.vae.update(base_channels=128, channel_mults=(1, 2, 4, 4), patch_size=1)
        c.vae_train.update(steps=100_000, batch_size=16, learning_rate=3e-4, warmup_steps=1000,
                           checkpoint_every=2000, log_every=100)
        c.vae_train.crop = (17, 128, 128)
        c.data.update(clips_train=4000, clip_sizes=((128, 128),))
        c.dit_train.update(row_length=1024, max_tokens=1024)  # rows hold a 17x128x128 clip
        c.vae_loss.update(gan_weight=0.1, disc_start=20_000, disc_channels=64)
    elif arg:
        raise ValueError(f"configs/vae_4x8x8_c16.py: unknown arg {arg!r} (use none or 'gpu')")
    return c
