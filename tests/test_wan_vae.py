"""The Wan 2.1 video VAE (``sora_jax.models.wan_vae``): parity with diffusers' ``AutoencoderKLWan``
on a tiny random-weight config, the key map, the feature cache and the latent statistics.

Reference outputs are in ``tests/fixtures/wan/`` (``vae/`` checkpoint in diffusers layout,
``vae_io.npz``), written by ``tests/fixtures/wan/ref_vae.py`` with torch + diffusers; this test
needs neither. diffusers itself encodes frame 0 alone and then chunks of 4 frames, and decodes
one latent frame at a time, both with its feature cache: the reference outputs are those cached
runs, so the whole-video pass and every chunked schedule here are compared with them.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sora_jax.models import weight_map as wm
from sora_jax.models.vae import FeatureCache
from sora_jax.models.vae_streaming import StreamingVAE
from sora_jax.models.wan_vae import (WAN_VAE_IGNORED_KEYS, WanCausalConv3d, WanVAE, WanVAEConfig,
                                     load_wan_vae_state, wan_vae_key_map)

FIX = pathlib.Path(__file__).parent / "fixtures" / "wan"
TOL = 1e-4


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIX / "vae_io.npz"))


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(FIX / "tiny" / "vae" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def cfg():
    return WanVAEConfig.from_json(FIX / "tiny" / "vae" / "config.json")


@pytest.fixture(scope="module")
def wan(cfg, tensors):
    """(model, jitted encode, jitted decode) of the tiny checkpoint."""
    model = load_wan_vae_state(WanVAE(cfg), tensors)
    gd, st = nnx.split(model)
    enc = jax.jit(lambda s, x: nnx.merge(gd, s).encode(x))
    dec = jax.jit(lambda s, z: nnx.merge(gd, s).decode(z))
    return model, (lambda x: enc(st, jnp.asarray(x))), (lambda z: dec(st, jnp.asarray(z)))


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------ config


def test_config_from_json(cfg):
    assert cfg.base_dim == 4 and cfg.z_dim == 4 and cfg.dim_mult == (1, 2, 2, 2)
    assert cfg.temperal_downsample == (False, True, True) and cfg.num_res_blocks == 1
    assert cfg.latents_mean == (0.25, -0.5, 1.0, -0.125) and cfg.latents_std == (1.5, 0.5, 2.0, 0.75)
    assert (cfg.spatial_downsample, cfg.temporal_downsample) == (8, 4)
    full = WanVAEConfig()  # the released Wan 2.1 VAE
    assert (full.base_dim, full.z_dim, full.dim_mult, full.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
    assert len(full.latents_mean) == len(full.latents_std) == 16


@pytest.mark.parametrize("change, match", [
    (dict(is_residual=True), "Wan 2.2"),
    (dict(patch_size=2), "patch_size"),
    (dict(attn_scales=[1.0]), "attn_scales"),
    (dict(latents_std=[1.0, 1.0]), "latents_mean / latents_std"),
    (dict(scale_factor_spatial=16), "scale_factor_spatial"),
    (dict(clip_output=True), "unknown AutoencoderKLWan config keys"),
])
def test_config_rejects_what_is_not_wan21(change, match):
    d = json.loads((FIX / "tiny" / "vae" / "config.json").read_text())
    d.update(change)
    with pytest.raises(ValueError, match=match):
        WanVAEConfig.from_dict(d)


# ------------------------------------------------------------------------------ key map


def test_key_map_is_complete_for_the_fixture(cfg, tensors):
    ours = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(WanVAE(cfg), nnx.Param))}
    ref = {k: v.shape for k, v in tensors.items()}
    assert wm.check_complete(wan_vae_key_map(cfg), ours, ref, ignored=WAN_VAE_IGNORED_KEYS) == []


def test_key_map_matches_the_full_size_wan21_vae():
    """Every key and shape of diffusers' default (released Wan 2.1) AutoencoderKLWan, recorded by
    ref_manifests.py on the meta device, maps onto our full-size model (built abstractly)."""
    manifest = json.loads((FIX / "manifests" / "vae.json").read_text())
    cfg = WanVAEConfig.from_dict(manifest["config"])
    assert cfg == WanVAEConfig()
    model = nnx.eval_shape(lambda: WanVAE(cfg))
    ours = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    ref = {k: tuple(v) for k, v in manifest["shapes"].items()}
    assert wm.check_complete(wan_vae_key_map(cfg), ours, ref, ignored=WAN_VAE_IGNORED_KEYS) == []
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(s)) for s in ref.values())


@pytest.mark.parametrize("tamper, message", [
    ("missing", "missing reference key decoder.up_blocks.1.upsamplers.0.time_conv.weight"),
    ("unexpected", "unexpected reference key encoder.down_blocks.9.conv1.weight"),
    ("shape", "shape mismatch for encoder.mid_block.attentions.0.to_qkv.kernel"),
])
def test_load_reports_a_tampered_checkpoint(cfg, tensors, tamper, message):
    bad = dict(tensors)
    if tamper == "missing":
        del bad["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
    elif tamper == "unexpected":
        bad["encoder.down_blocks.9.conv1.weight"] = np.zeros((4, 4, 3, 3, 3), np.float32)
    else:
        bad["encoder.mid_block.attentions.0.to_qkv.weight"] = np.zeros((24, 8, 1, 1, 2), np.float32)
    model = WanVAE(cfg)
    with pytest.raises(ValueError) as err:
        load_wan_vae_state(model, bad)
    assert message in str(err.value)
    # nothing was written
    assert not np.any(np.asarray(model.encoder.conv_in.kernel[...]))


# ------------------------------------------------------------------------------ parity


def test_encode_matches_diffusers(wan, io):
    _, encode, _ = wan
    mean, logvar = encode(io["video"])
    assert mean.shape == logvar.shape == (1, 3, 2, 3, 4)
    assert mean.dtype == jnp.float32
    assert _err(mean, io["enc_mean"]) < TOL, _err(mean, io["enc_mean"])
    assert _err(logvar, io["enc_logvar"]) < TOL


def test_decode_matches_diffusers(wan, io):
    _, _, decode = wan
    out = decode(io["z"])
    assert out.shape == (1, 9, 16, 24, 3)
    assert _err(out, io["dec_raw"]) < TOL, _err(out, io["dec_raw"])
    # diffusers' decode clamps; ours is the value before the clamp
    assert np.abs(io["dec_raw"]).max() > 1.0
    assert _err(np.clip(out, -1, 1), np.clip(io["dec_raw"], -1, 1)) < TOL


def test_frame_by_frame_cached_decode_matches_diffusers(wan, io):
    """One latent frame at a time through the feature cache, as diffusers decodes: the frames
    concatenate to the torch model's output (each chunk jitted; later chunks share one compile)."""
    model, _, _ = wan
    gd, st = nnx.split(model)

    @jax.jit
    def step(s, z, feats):
        cache = FeatureCache(feats)
        return nnx.merge(gd, s).decode(z, cache), cache.feats

    feats, frames = None, []
    for j in range(io["z"].shape[1]):
        y, feats = step(st, jnp.asarray(io["z"][:, j:j + 1]), feats)
        frames.append(np.asarray(y))
    assert [f.shape[1] for f in frames] == [1, 4, 4]
    assert _err(np.concatenate(frames, axis=1), io["dec_raw"]) < TOL
    # the cache holds a fixed number of frames per conv, whatever the length
    assert max(f.shape[1] for f in feats) == 2


def test_chunked_encode_matches_diffusers_schedule(wan, io):
    """Frame 0 alone, then chunks of 4 frames (diffusers' schedule, via StreamingVAE with
    chunk=1), and a schedule diffusers does not use (frame 0, then 8 frames at once): both give
    the torch model's posterior."""
    model, _, _ = wan
    for chunk in (1, 2):
        mean, logvar = StreamingVAE(model, chunk=chunk).encode(io["video"], return_logvar=True)
        assert _err(mean, io["enc_mean"]) < TOL and _err(logvar, io["enc_logvar"]) < TOL


def test_causal_first_frame_is_an_image(wan, io):
    _, encode, decode = wan
    mean, _ = encode(io["video"][:, :1])
    assert mean.shape == (1, 1, 2, 3, 4)
    assert _err(mean, io["enc_mean"][:, :1]) < TOL
    assert _err(decode(io["z"][:, :1]), io["dec_raw"][:, :1]) < TOL


def test_codec_normalises_with_latents_mean_and_std(wan, io, cfg):
    """VAECodec wraps the model unchanged: (z - latents_mean) / latents_std, as WanPipeline."""
    from sora_jax.inference.latents import VAECodec

    model, _, _ = wan
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    np.testing.assert_array_equal(np.asarray(model.latent_shift[...]), mean)
    np.testing.assert_array_equal(np.asarray(model.latent_scale[...]), std)
    codec = VAECodec(model, chunk=1)
    latents = codec.encode(io["video"])
    assert _err(latents, (io["enc_mean"] - mean) / std) < TOL * 4  # / std (>= 0.5) doubles the error
    video = codec.decode((io["z"] - mean) / std)
    assert _err(video, np.clip(io["dec_raw"], -1, 1)) < TOL


# ------------------------------------------------------------------------------ pieces and errors


def test_taps_and_native_conv3d_agree():
    x = jax.random.normal(jax.random.key(0), (1, 5, 6, 4, 3))
    a = WanCausalConv3d(3, 5, 3, padding=1, impl="taps", rngs=nnx.Rngs(0))
    b = WanCausalConv3d(3, 5, 3, padding=1, impl="conv3d", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=1e-5)
    # causal: output frame f does not change when later frames do
    y = a(x.at[:, 3:].set(0.0))
    np.testing.assert_allclose(np.asarray(y[:, :3]), np.asarray(a(x)[:, :3]), atol=1e-6)


def test_sample_uses_the_posterior_std():
    mean = jnp.zeros((1, 1, 1, 1, 4))
    draws = WanVAE.sample(mean, jnp.full_like(mean, 2 * np.log(3.0)), jax.random.key(0))
    ref = 3.0 * jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(np.asarray(draws), np.asarray(ref), rtol=1e-6)


def test_bad_shapes_raise(wan):
    model, _, _ = wan
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        model.encode(jnp.zeros((1, 6, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiples of spatial_downsample=8"):
        model.encode(jnp.zeros((1, 1, 12, 16, 3)))
    with pytest.raises(ValueError, match="decode expects latents"):
        model.decode(jnp.zeros((1, 1, 2, 2, 3)))
    with pytest.raises(ValueError, match="later chunk"):
        model.encode(jnp.zeros((1, 3, 8, 8, 3)), FeatureCache([jnp.zeros(1)]))
    assert model.latent_shape(9, 16, 24) == (3, 2, 3, 4) and model.video_frames(3) == 9
