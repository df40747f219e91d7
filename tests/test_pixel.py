"""Pixel mode: the identity autoencoder round-trips exactly and the whole pipeline runs on it."""

import json
import os

import numpy as np
import pytest

from sora_jax.cli import run
from sora_jax.models.pixel import IdentityAutoencoder

PIXEL_TINY = ["--config", "configs/pixel.py:tiny", "--no-progress"]


def test_identity_round_trip_is_exact():
    model = IdentityAutoencoder(in_channels=3, latent_channels=3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 8, 16, 3)).astype(np.float32)
    mean, logvar = model.encode(x)
    np.testing.assert_array_equal(mean, x)
    np.testing.assert_array_equal(model.decode(mean), x)
    assert logvar.shape == x.shape and float(logvar.max()) <= -30.0  # a point mass
    recon, _, _ = model(x, key=np.zeros((2,), np.uint32))  # a key does not make it sample
    np.testing.assert_array_equal(recon, x)
    assert model.latent_shape(5, 8, 16) == (5, 8, 16, 3) and model.video_frames(7) == 7
    assert (model.latent_channels, model.spatial_downsample, model.temporal_downsample,
            model.patch_size) == (3, 1, 1, 1)


def test_identity_codec_round_trip_through_the_statistics():
    from sora_jax.io import to_float
    from sora_jax.inference.latents import VAECodec, set_latent_statistics

    model = IdentityAutoencoder()
    rng = np.random.default_rng(1)
    videos = [to_float(rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    shift, scale = set_latent_statistics(model, videos)
    pixels = np.concatenate(videos).reshape(-1, 3)
    np.testing.assert_allclose(shift, pixels.mean(0), atol=1e-6)  # per-channel pixel statistics
    np.testing.assert_allclose(scale, pixels.std(0), atol=1e-6)
    codec = VAECodec(model)
    np.testing.assert_allclose(codec.encode(videos[0]), (videos[0] - shift) / scale, rtol=1e-6)
    np.testing.assert_allclose(codec.reconstruct(videos[0]), videos[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(latent_channels=4), "latent_channels"),
    (dict(spatial_downsample=2), "spatial_downsample must be 1"),
    (dict(temporal_downsample=4), "temporal_downsample must be 1"),
    (dict(patch_size=2), "patch_size must be 1"),
    (dict(in_channels=0), "in_channels"),
])
def test_identity_rejects_sizes_it_cannot_have(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IdentityAutoencoder(**kwargs)
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        IdentityAutoencoder().encode(np.zeros((1, 2, 4, 4, 1), np.float32))


def test_pixel_configs_validate_and_select_the_identity():
    from sora_jax import config as config_lib
    from sora_jax.config import ConfigError
    from sora_jax.config_validation import validate_config
    from sora_jax.models.factory import build_vae, dit_in_dim, latent_shape

    for spec in ("configs/pixel.py", "configs/pixel.py:tiny"):
        cfg = config_lib.load_config(spec)
        validate_config(cfg)
        assert isinstance(build_vae(cfg), IdentityAutoencoder)
        assert dit_in_dim(cfg) == 8 * 8 * 3
    cfg = config_lib.load_config("configs/pixel.py")
    # the quickstart's longest clip, 9 x 48 x 32 pixels, is 216 tokens of (1, 8, 8) patches
    t, h, w, _ = latent_shape(cfg, 9, 48, 32)
    assert (t * h * w) // 64 == 216 <= cfg.dit_train.row_length
    bad = config_lib.apply_overrides(cfg, ["vae.temporal_downsample=4"])
    with pytest.raises(ConfigError, match="vae.temporal_downsample"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="vae.kind"):
        validate_config(config_lib.apply_overrides(cfg, ["vae.kind=pixels"]))


def test_pixel_mode_end_to_end(tmp_path, capsys):
    """prepare-data -> train-vae (statistics only) -> train-dit on pixel patches -> generate."""
    wd = str(tmp_path / "pixel_run")
    assert run(["prepare-data", *PIXEL_TINY, "--workdir", wd]) == 0
    capsys.readouterr()
    assert run(["train-vae", *PIXEL_TINY, "--workdir", wd]) == 0
    vae = json.loads(capsys.readouterr().out)
    assert vae["vae_kind"] == "identity" and vae["steps"] == 0
    assert len(vae["latent_shift"]) == 3 and all(0 < s < 1 for s in vae["latent_scale"])
    ev = vae["eval"]
    assert ev["video_psnr"] > 100 and ev["image_ssim"] > 0.9999  # float rounding only
    assert os.path.isdir(os.path.join(wd, "vae", "checkpoints", "0"))
    assert run(["train-vae", *PIXEL_TINY, "--workdir", wd]) == 0  # a rerun keeps step 0
    assert json.loads(capsys.readouterr().out)["latent_shift"] == vae["latent_shift"]

    assert run(["train-dit", *PIXEL_TINY, "--workdir", wd]) == 0
    dit = json.loads(capsys.readouterr().out)
    assert np.isfinite(dit["final_loss"]) and np.isfinite(dit["heldout_loss"])
    assert dit["train_step_compiles"] == 1
    from sora_jax.data.records import read_dataset

    latents = read_dataset(os.path.join(wd, "latents", "latents_train"))
    assert latents[0]["latent"].shape[-1] == 3  # the DiT trained on standardised pixels

    out = str(tmp_path / "samples")
    assert run(["generate", "--workdir", wd, "--prompt", "the digit 3 moves right", "--shape",
                "9x32x48", "--steps", "2", "--out", out, "--no-progress"]) == 0
    info = json.load(open(os.path.join(out, "samples.json")))
    assert info["samples"][0]["shape"] == [9, 32, 48]
    assert os.path.getsize(info["samples"][0]["path"]) > 0
