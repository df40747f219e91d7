"""Wan 2.1's transformer as our DiT: parity with diffusers' ``WanTransformer3DModel`` on a tiny
random-weight config (reference outputs in ``tests/fixtures/wan/``, written by
``tests/fixtures/wan/ref_transformer.py`` with torch + diffusers; this test needs neither)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sora_jax.data.packing import patchify, unpatchify
from sora_jax.models import weight_map as wm
from sora_jax.models.dit import DiT
from sora_jax.models.layers import apply_rope, rope_cos_sin, timestep_embedding
from sora_jax.models.wan_dit import (dit_fields, rope_pair_permutation, wan_rope_axes_dims,
                                     wan_transformer_key_map)

FIX = pathlib.Path(__file__).parent / "fixtures" / "wan"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIX / "transformer_io.npz"))


@pytest.fixture(scope="module")
def wan():
    config = json.loads((FIX / "tiny" / "transformer" / "config.json").read_text())
    fields = dit_fields(config)
    d = dict(fields["dit"])
    patch = d.pop("patch")
    assert d.pop("in_channels") is None  # text-to-video: reads what it predicts
    model = DiT(in_dim=fields["latent_channels"] * int(np.prod(patch)), rngs=nnx.Rngs(0), dtype=jnp.float32, **d)
    tensors = load_file(str(FIX / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = wm.load(model, wan_transformer_key_map(fields["dit"]), tensors, what="tiny Wan transformer")
    return model, patch, fields, tensors


def _run(model, patch, x, t, text):
    """diffusers' call convention ((B, C, T, H, W) latents, t in [0, 1000]) through our DiT."""
    outs = []
    for b in range(x.shape[0]):
        latent = np.transpose(x[b], (1, 2, 3, 0))  # (T, H, W, C)
        tokens, pos = patchify(latent, patch)
        n = tokens.shape[0]
        v = model(jnp.asarray(tokens[None]), jnp.ones((1, n), jnp.int32), jnp.asarray(pos[None]),
                  jnp.full((1, n), t[b] / 1000.0, jnp.float32), jnp.asarray(text[b][None]),
                  jnp.ones((1, text.shape[1]), jnp.int32))
        grid = [s // p for s, p in zip(latent.shape[:3], patch)]
        out = unpatchify(np.asarray(v[0]), grid, patch, latent.shape[-1])
        outs.append(np.transpose(out, (3, 0, 1, 2)))
    return np.stack(outs)


def test_whole_transformer_matches_diffusers(wan, ref):
    model, patch, _, _ = wan
    for case in ("1", "2"):
        ours = _run(model, patch, ref["x" + case], ref["t" + case], ref["text" + case])
        err = np.abs(ours - ref["out" + case]).max()
        assert err < 2e-5, (case, err)


def test_time_embedding_and_projection(wan, ref):
    model, _, _, _ = wan
    t = jnp.asarray(ref["t1"] / 1000.0)
    temb = model.t_embed(t)
    np.testing.assert_allclose(np.asarray(temb), ref["temb1"], atol=1e-5, rtol=1e-5)
    # time_proj(SiLU(temb)): adaLN-single's shared modulation
    np.testing.assert_allclose(np.asarray(model.t_modulation(jax.nn.silu(temb))), ref["time_proj1"],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.text_embed(jnp.asarray(ref["text1"]))), ref["text_states1"],
                               atol=1e-5, rtol=1e-5)
    # the sinusoid itself: diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0) is [cos, sin]
    emb = np.asarray(timestep_embedding(t, 256))
    half = np.exp(-np.log(10000.0) * np.arange(128) / 128) * ref["t1"][:, None]
    # float32 arguments near 700 rad carry ~6e-5 of rounding (t / 1000 * 1000), hence 1e-4
    np.testing.assert_allclose(emb, np.concatenate([np.cos(half), np.sin(half)], -1), atol=1e-4)


def test_rope_equals_interleaved_after_permutation(ref):
    # diffusers' tables for the (3, 2, 3) grid of case 1, head_dim 12: interleaved cos / sin
    cos_ref, sin_ref = ref["rope_cos"], ref["rope_sin"]
    _, pos = patchify(np.zeros((3, 4, 6, 1), np.float32), (1, 2, 2))
    axes = wan_rope_axes_dims(12)
    assert axes == (4, 4, 4) and wan_rope_axes_dims(128) == (44, 42, 42)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, len(pos), 1, 12)).astype(np.float32)
    # Wan's rotation of interleaved pairs, written from its definition
    x1, x2 = q[..., 0::2], q[..., 1::2]
    c, s = cos_ref[None, :, None, 0::2], sin_ref[None, :, None, 1::2]
    wan_rot = np.empty_like(q)
    wan_rot[..., 0::2], wan_rot[..., 1::2] = x1 * c - x2 * s, x1 * s + x2 * c
    perm = rope_pair_permutation(1, 12)
    cos, sin = rope_cos_sin(jnp.asarray(pos[None]), axes)
    ours = np.asarray(apply_rope(jnp.asarray(q[..., perm]), cos, sin))
    np.testing.assert_allclose(ours, wan_rot[..., perm], atol=1e-6)


def test_one_block_matches_diffusers(wan, ref):
    model, patch, _, _ = wan
    x = ref["block0_in"]  # (1, L, D)
    n = x.shape[1]
    _, pos = patchify(np.zeros((3, 4, 6, 1), np.float32), patch)
    axes = model.rope_axes_dims
    cos, sin = rope_cos_sin(jnp.asarray(pos[None]), axes)
    tproj = jnp.asarray(ref["block0_temb"]).reshape(1, 1, -1) * jnp.ones((1, n, 1))
    out = model.blocks[0](jnp.asarray(x), tproj, cos, sin, jnp.ones((1, n), jnp.int32),
                          jnp.asarray(ref["block0_text"]), jnp.ones((1, ref["block0_text"].shape[1]), jnp.int32))
    err = np.abs(np.asarray(out) - ref["block0_out"]).max()
    assert err < 5e-6, err


def test_key_map_reports_every_problem(wan):
    model, _, fields, tensors = wan
    targets = wan_transformer_key_map(fields["dit"])
    shapes = wm.param_shapes(model)
    ref_shapes = {k: v.shape for k, v in tensors.items()}
    assert wm.check_complete(targets, shapes, ref_shapes) == []
    broken = dict(ref_shapes)
    del broken["blocks.1.attn2.to_k.weight"]
    broken["blocks.0.extra.weight"] = (3, 3)
    broken["proj_out.weight"] = (5, 24)
    problems = "\n".join(wm.check_complete(targets, shapes, broken))
    assert "missing reference key blocks.1.attn2.to_k.weight" in problems
    assert "unexpected reference key blocks.0.extra.weight" in problems
    assert "shape mismatch for final.linear.kernel" in problems
    bad = {k: v for k, v in tensors.items() if k != "proj_out.bias"}
    with pytest.raises(ValueError, match="proj_out.bias"):
        wm.load(model, targets, bad)


def test_config_translation_refuses_what_our_dit_cannot_express():
    config = json.loads((FIX / "tiny" / "transformer" / "config.json").read_text())
    f = dit_fields(config)["dit"]
    assert f["rope_axes_dims"] == (4, 4, 4) and f["mlp_ratio"] * f["hidden_size"] == 40
    assert (f["in_channels"], f["image_dim"], f["image_pos_len"]) == (None, None, None)
    with pytest.raises(ValueError, match="image_dim"):  # the image branch needs both halves
        dit_fields(dict(config, added_kv_proj_dim=24))
    with pytest.raises(ValueError, match="added_kv_proj_dim 16 != model width 24"):
        dit_fields(dict(config, image_dim=8, added_kv_proj_dim=16))
    with pytest.raises(ValueError, match="in_channels 2 < out_channels 4"):
        dit_fields(dict(config, in_channels=2, out_channels=4))
    with pytest.raises(ValueError, match="qk_norm"):
        dit_fields(dict(config, qk_norm="rms_norm"))
    with pytest.raises(ValueError, match="dit.adaln"):
        wan_transformer_key_map(dict(f, adaln="per_block"))


def _load_variant(name):
    config = json.loads((FIX / name / "transformer" / "config.json").read_text())
    fields = dit_fields(config)
    d = dict(fields["dit"])
    patch, in_channels = d.pop("patch"), d.pop("in_channels")
    out_dim = fields["latent_channels"] * int(np.prod(patch))
    model = DiT(in_dim=in_channels * int(np.prod(patch)), out_dim=out_dim, rngs=nnx.Rngs(0), dtype=jnp.float32, **d)
    tensors = load_file(str(FIX / name / "transformer" / "diffusion_pytorch_model.safetensors"))
    return wm.load(model, wan_transformer_key_map(fields["dit"]), tensors, what=f"tiny Wan {name} transformer"), patch


def run_i2v(model, patch, ref, name, sign=1.0):
    """diffusers' I2V call (8-channel latents, t in [0, 1000], 512 text tokens, CLIP states) through
    our DiT; returns the (1, 4, T, H, W) velocity. ``sign`` scales the image states."""
    x, image, text = ref[f"{name}_x"], sign * ref[f"{name}_image"], ref[f"{name}_text"]
    latent = np.transpose(x[0], (1, 2, 3, 0))  # (T, H, W, 8)
    tokens, pos = patchify(latent, patch)
    n, li = tokens.shape[0], image.shape[1]
    v = model(jnp.asarray(tokens[None]), jnp.ones((1, n), jnp.int32), jnp.asarray(pos[None]),
              jnp.full((1, n), ref[f"{name}_t"][0] / 1000.0, jnp.float32), jnp.asarray(text),
              jnp.ones((1, text.shape[1]), jnp.int32), image=jnp.asarray(image),
              image_segment_ids=jnp.ones((1, li), jnp.int32))
    assert v.shape == (1, n, 4 * int(np.prod(patch)))  # predicts the 4 latent channels, not the 8 it reads
    grid = [s // p for s, p in zip(latent.shape[:3], patch)]
    return np.transpose(unpatchify(np.asarray(v[0]), grid, patch, 4), (3, 0, 1, 2))[None]


@pytest.mark.parametrize("name", ["i2v", "flf2v"])
def test_image_to_video_transformer_matches_diffusers(name):
    """Wan 2.1 I2V's extras (8 input channels for 4 out; CLIP states through the image embedder and
    the added K/V of every cross-attention; FLF2V's image positions) against diffusers."""
    ref = dict(np.load(FIX / "transformer_i2v_io.npz"))
    model, patch = _load_variant(name)
    ours = run_i2v(model, patch, ref, name)
    err = np.abs(ours - ref[f"{name}_out"]).max()
    assert err < 2e-5, err
    # the image branch is live: other image states change the output
    assert np.abs(run_i2v(model, patch, ref, name, sign=-1.0) - ours).max() > 1e-3


def test_image_context_needs_image_states():
    model, patch = _load_variant("i2v")
    with pytest.raises(ValueError, match="needs image and image_segment_ids"):
        model(jnp.zeros((1, 4, 32)), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4, 3), jnp.int32),
              jnp.zeros((1, 4)), jnp.zeros((1, 3, 32)), jnp.ones((1, 3), jnp.int32))
