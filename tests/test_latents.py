"""Latent statistics: applied and inverted exactly, measured on raw latents, saved with the checkpoint."""

import os

import numpy as np
import pytest
from flax import nnx

from sora_jax.models.vae_gan import VAETrainModel
from sora_jax.inference.latents import VAECodec, latent_statistics, set_latent_statistics
from sora_jax.models.vae import CausalVAE

SMALL = dict(latent_channels=4, base_channels=8, channel_mults=(1, 1), spatial_downsample=2,
             temporal_downsample=2)


@pytest.fixture(scope="module")
def vae():
    return CausalVAE(**SMALL, rngs=nnx.Rngs(0))


def _videos(seed, n=2):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (2, 5, 8, 8, 3)).astype(np.float32) for _ in range(n)]


def _with_stats(model, shift, scale):
    model.latent_shift[...] = np.asarray(shift, np.float32)
    model.latent_scale[...] = np.asarray(scale, np.float32)


def test_normalise_then_denormalise_returns_the_input(vae):
    shift = np.array([0.5, -1.25, 3.0, 0.0], np.float32)
    _with_stats(vae, shift, [0.25, 2.0, 0.3, 7.0])
    codec = VAECodec(vae)
    z = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 4)).astype(np.float32) * 3
    # exact up to float32 rounding of the subtraction, division, product and sum: a few ulps
    ulps = 4 * np.finfo(np.float32).eps * (np.abs(z) + np.abs(shift))
    assert np.all(np.abs(codec.denormalize(codec.normalize(z)) - z) <= ulps)
    assert np.all(np.abs(codec.normalize(codec.denormalize(z)) - z) <= 4 * ulps)
    assert codec.normalize(z).dtype == codec.denormalize(z).dtype == np.float32
    # without a shift and with power-of-two scales no rounding is left: bit-exact
    _with_stats(vae, np.zeros(4), [0.25, 2.0, 0.5, 8.0])
    np.testing.assert_array_equal(codec.denormalize(codec.normalize(z)), z)
    np.testing.assert_array_equal(codec.normalize(codec.denormalize(z)), z)


def test_encode_is_the_normalised_raw_posterior_mean(vae):
    shift, scale = np.array([0.1, -0.2, 0.3, 0.0], np.float32), np.array([1.5, 0.5, 2.0, 1.0], np.float32)
    _with_stats(vae, shift, scale)
    codec = VAECodec(vae)
    x = _videos(1, 1)[0]
    mean = np.asarray(vae.encode(x)[0])
    np.testing.assert_allclose(codec.encode_raw(x), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(codec.encode(x), (codec.encode_raw(x) - shift) / scale, rtol=1e-6)
    z = codec.encode(x)
    np.testing.assert_allclose(codec.decode(z), np.clip(np.asarray(vae.decode(z * scale + shift)), -1, 1),
                               rtol=1e-4, atol=1e-5)
    # the codec reads the model's variables on every call: later writes take effect
    _with_stats(vae, np.zeros(4), np.ones(4))
    np.testing.assert_allclose(codec.encode(x), codec.encode_raw(x), rtol=1e-6)


def test_statistics_are_measured_on_raw_latents_and_standardise_them(vae):
    _with_stats(vae, [9.0, 9.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0])  # must not leak into the measure
    videos = _videos(2)
    shift, scale = set_latent_statistics(vae, videos)
    codec = VAECodec(vae)
    raw = np.concatenate([codec.encode_raw(v) for v in videos]).reshape(-1, 4)
    np.testing.assert_allclose(shift, raw.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scale, raw.std(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(codec.shift, shift)
    np.testing.assert_array_equal(codec.scale, scale)
    z = np.concatenate([codec.encode(v) for v in videos]).reshape(-1, 4)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="no videos"):
        latent_statistics(codec, [])


def test_statistics_survive_a_checkpoint_save_and_restore(tmp_path):
    from sora_jax import config as config_lib
    from sora_jax.inference.latents import load_codec
    from sora_jax.models.factory import build_vae
    from sora_jax.train.run_folder import paths, save_config
    from sora_jax.train.checkpoint import Checkpointer

    cfg = config_lib.load_config("configs/tiny.py")
    wd = str(tmp_path / "run")
    save_config(cfg, wd)
    vae = build_vae(cfg)
    c = cfg.vae.latent_channels
    shift = np.linspace(-1, 1, c).astype(np.float32)
    scale = np.linspace(0.5, 2, c).astype(np.float32)
    _with_stats(vae, shift, scale)
    ck = Checkpointer(os.path.join(paths(wd)["vae"], "checkpoints"), async_save=False)
    ck.save(7, VAETrainModel(vae), None, {})
    ck.close()
    fresh = build_vae(cfg)  # defaults: shift 0, scale 1
    assert not np.array_equal(np.asarray(fresh.latent_shift[...]), shift)
    codec = load_codec(cfg, wd)
    np.testing.assert_array_equal(codec.shift, shift)
    np.testing.assert_array_equal(codec.scale, scale)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(codec.encode(x), VAECodec(vae).encode(x), rtol=1e-6, atol=1e-6)
    assert not os.path.exists(os.path.join(paths(wd)["vae"], "latent_stats.json"))


def test_codec_streams_in_time_chunks_and_tiles_like_the_whole_pass():
    """``VAECodec(chunk=, tile=)`` (what ``vae_inference`` selects) runs StreamingVAE: the time
    chunks give the whole pass's latents and video within float tolerance."""
    from sora_jax.models.vae import CausalVAE

    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 2), spatial_downsample=4,
                    temporal_downsample=4, rngs=nnx.Rngs(0))
    whole, chunked = VAECodec(vae), VAECodec(vae, chunk=1)
    tiled = VAECodec(vae, chunk=1, tile=16, overlap=8)
    assert whole.streaming is None and chunked.streaming is not None
    x = np.random.default_rng(0).uniform(-1, 1, (1, 13, 24, 24, 3)).astype(np.float32)
    z = whole.encode(x)
    np.testing.assert_allclose(chunked.encode(x), z, atol=1e-4)
    np.testing.assert_allclose(chunked.decode(z), whole.decode(z), atol=1e-4)
    assert tiled.decode(z).shape == x.shape
