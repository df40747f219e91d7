"""The autoencoder configs: each validates, builds, and maps a clip to its stated latent shape."""

import jax
import jax.numpy as jnp
import pytest

from sora_jax import config as config_lib
from sora_jax.config_validation import validate_config
from sora_jax.models.factory import build_vae

# config file -> (temporal, spatial, latent channels) its name promises
CONFIGS = {
    "configs/vae_4x8x8_c16.py": (4, 8, 16),
    "configs/vae_8x8x8.py": (8, 8, 32),
    "configs/vae_4x16x16.py": (4, 16, 64),
}


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_autoencoder_config_shapes(path):
    td, s, c = CONFIGS[path]
    cfg = config_lib.load_config(path)
    validate_config(cfg)
    vae = build_vae(cfg)
    assert (vae.temporal_downsample, vae.spatial_downsample, vae.latent_channels) == (td, s, c)
    # every variant compresses 48:1 (pixel values per latent value), so they compare fairly
    assert td * s * s * 3 // c == 48
    frames, h, w = 17, 64, 64
    video = jax.ShapeDtypeStruct((1, frames, h, w, 3), jnp.float32)
    mean, logvar = jax.eval_shape(vae.encode, video)  # shapes only: nothing is compiled
    assert mean.shape == logvar.shape == (1, 1 + (frames - 1) // td, h // s, w // s, c)
    assert jax.eval_shape(vae.decode, mean).shape == (1, frames, h, w, 3)
    # the CPU recipe's crops and the evaluation clips fit the model
    t, ch, cw = cfg.vae_train.crop
    assert (t - 1) % td == 0 and ch % s == 0 and cw % s == 0
    assert (cfg.vae_eval.video_frames - 1) % td == 0


def test_gpu_variant_and_bad_arg():
    cfg = config_lib.load_config("configs/vae_4x8x8_c16.py:gpu")
    validate_config(cfg)
    assert cfg.vae_loss.disc_start < cfg.vae_train.steps  # the GAN is on in the long recipe
    with pytest.raises(ValueError, match="unknown arg"):
        config_lib.load_config("configs/vae_4x8x8_c16.py:tpu")


def test_bad_vae_loss_is_a_config_error_before_any_work():
    from sora_jax.config import ConfigError

    cfg = config_lib.load_config("configs/quickstart.py")
    cfg.vae_loss.ssim_weight = -1.0
    with pytest.raises(ConfigError, match="vae_loss.*ssim_weight"):
        validate_config(cfg)
