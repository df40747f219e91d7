"""Rectified flow (targets, timestep sampling, shift, loss) and the Euler / CFG sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.data.packing import pack, patchify
from sora_jax.diffusion import samplers
from sora_jax.diffusion.flow import (drop_captions, interpolate, rectified_flow_loss,
                                     sample_timesteps, segment_token_counts, shift_time,
                                     time_shift_for_tokens, velocity_target)
from sora_jax.diffusion.samplers import sample
from sora_jax.models.dit import DiT

TEXT_DIM = 16


def test_interpolation_endpoints_and_velocity():
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
    t = np.array([[0.0, 1.0, 0.3], [0.5, 0.0, 1.0]], np.float32)
    xt = np.asarray(interpolate(x0, noise, t))
    np.testing.assert_array_equal(xt[0, 0], x0[0, 0])
    np.testing.assert_array_equal(xt[0, 1], noise[0, 1])
    np.testing.assert_allclose(xt[0, 2], 0.7 * x0[0, 2] + 0.3 * noise[0, 2], rtol=1e-6)
    # v = d x_t / dt, exactly, since the path is linear.
    dx = np.asarray(interpolate(x0, noise, t + 0.25)) - xt
    np.testing.assert_allclose(dx / 0.25, velocity_target(x0, noise), rtol=1e-5, atol=1e-5)


def test_shift():
    t = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(shift_time(t, 1.0), t, atol=1e-7)
    for s in (0.5, 2.0, 3.0):
        ts = np.asarray(shift_time(t, s))
        assert ts[0] == 0.0 and abs(ts[-1] - 1.0) < 1e-6 and np.all(np.diff(ts) > 0)
    assert np.all(np.asarray(shift_time(t[1:-1], 3.0)) > np.asarray(t[1:-1]))  # more noise
    np.testing.assert_allclose(time_shift_for_tokens(jnp.array([16.0, 256.0, 1024.0, 1e6]),
                                                     256, 3.0), [1.0, 1.0, 2.0, 3.0])


def test_sample_timesteps_per_segment_logit_normal_and_shift():
    seg = np.zeros((8, 256), np.int32)
    seg[:, :200] = np.arange(1, 201)  # 200 one-token segments per row
    key = jax.random.key(0)
    t = np.asarray(sample_timesteps(key, seg, use_shift=False))
    draws = t[:, :200].ravel()
    assert abs(draws.mean() - 0.5) < 0.01 and 0.15 < draws.std() < 0.25
    assert np.all(t[:, 200:] == 0)
    # Long segments: one t per segment, shifted by that segment's token count.
    seg2 = np.zeros((2, 64), np.int32)
    seg2[0, :48], seg2[0, 48:60] = 1, 2
    seg2[1, :4], seg2[1, 4:] = 1, 2
    kw = dict(base_tokens=4.0, max_shift=3.0)
    t0 = np.asarray(sample_timesteps(key, seg2, use_shift=False, **kw))
    t1 = np.asarray(sample_timesteps(key, seg2, use_shift=True, **kw))
    for row in range(2):
        for s in (1, 2):
            sel = seg2[row] == s
            assert np.unique(t0[row, sel]).size == 1 and np.unique(t1[row, sel]).size == 1
    assert t0[0, 0] != t0[0, 48] and np.all(t1[0, 60:] == 0)
    n = np.asarray(segment_token_counts(seg2))
    np.testing.assert_array_equal(n[0, [0, 50, 61]], [48, 12, 0])
    expected = shift_time(t0, time_shift_for_tokens(n, 4.0, 3.0))
    np.testing.assert_allclose(t1, np.where(seg2 != 0, expected, 0), rtol=1e-6)
    assert t1[0, 0] > t0[0, 0] and t1[1, 0] == pytest.approx(t0[1, 0])  # 48 tokens: shift 3


def test_drop_captions():
    ts = jnp.array([[1, 1, 2, 2, 3, 0]], jnp.int32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(drop_captions(key, ts, 0.0, 8), ts)
    np.testing.assert_array_equal(drop_captions(key, ts, 1.0, 8), 0 * ts)
    big = jnp.tile(jnp.repeat(jnp.arange(1, 9), 4)[None], (64, 1)).astype(jnp.int32)
    d = np.asarray(drop_captions(key, big, 0.3, 8)).reshape(64, 8, 4)
    kept = d[..., 0] != 0
    assert np.all((d != 0) == kept[..., None])  # whole segments dropped together
    assert 0.2 < 1 - kept.mean() < 0.4


def _small_batch(seed=0, mean=(0.0, 0.0), std=1.0):
    rng = np.random.default_rng(seed)
    exs = []
    for shape, m in (((1, 4, 4, 2), 3), ((2, 4, 4, 2), 2), ((1, 2, 4, 2), 4)):
        latent = np.asarray(mean, np.float32) + std * rng.normal(size=shape)
        tokens, positions = patchify(latent.astype(np.float32), (1, 2, 2))
        exs.append({"tokens": tokens, "positions": positions,
                    "text": rng.normal(size=(m, TEXT_DIM)).astype(np.float32),
                    "text_mask": np.ones(m, bool)})
    batch, _, dropped = pack(exs, batch_size=2, length=12, text_length=6)
    assert dropped == 0
    return batch


def test_loss_oracle_and_weighting():
    batch = _small_batch()
    batch["loss_mask"][0, 1] = 0.0
    x0, seg = batch["tokens"], batch["segment_ids"]
    offsets = np.array([0.0, 1.0, 3.0, 5.0], np.float32)  # per segment id

    def oracle(xt, segment_ids, positions, t, text, text_segment_ids):
        # The exact velocity given the (known) clean data, plus a per-segment offset.
        return ((xt - x0) / jnp.maximum(t, 1e-6)[..., None]
                + jnp.asarray(offsets)[segment_ids][..., None])

    loss_fn = jax.jit(lambda b, k, weighting: rectified_flow_loss(
        oracle, b, k, loss_weighting=weighting), static_argnums=2)
    key = jax.random.key(3)
    w = batch["loss_mask"] * (seg != 0)
    loss_tok, aux = loss_fn(batch, key, "per_token")
    per_tok = (w * offsets[seg] ** 2).sum() / w.sum()
    np.testing.assert_allclose(loss_tok, per_tok, rtol=1e-3)
    assert aux["num_tokens"] == w.sum() and 0 < aux["mean_t"] < 1
    loss_ex, _ = loss_fn(batch, key, "per_example")
    # Row 0 holds segments 1 and 2, row 1 segment 1: three examples.
    np.testing.assert_allclose(loss_ex, (1.0 + 9.0 + 1.0) / 3.0, rtol=1e-3)
    with pytest.raises(ValueError):
        rectified_flow_loss(oracle, batch, key, loss_weighting="mean")


def test_loss_falls_when_overfitting_one_batch():
    # Latents with a per-channel mean, like real VAE latents: learnable structure.
    batch = {k: jnp.asarray(v) for k, v in _small_batch(1, (2.0, -1.5), 0.5).items()}
    model = DiT(in_dim=8, hidden_size=64, depth=2, num_heads=4, text_dim=TEXT_DIM,
                rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch, key):
        grad_fn = nnx.value_and_grad(lambda m: rectified_flow_loss(m, batch, key)[0])
        loss, grads = grad_fn(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def eval_loss(model, batch):  # fixed noise and times: measures fit, not luck
        return rectified_flow_loss(model, batch, jax.random.key(123), caption_dropout=0.0)[0]

    initial = float(eval_loss(model, batch))
    for i in range(100):
        step(model, opt, batch, jax.random.key(i))
    final = float(eval_loss(model, batch))
    assert np.isfinite(final) and final < 0.5 * initial, (initial, final)


# ----------------------------------------------------------------------------- sampler

A, B_ = 2.0, -1.0  # conditional / unconditional point masses


def point_mass_field(xt, segment_ids, positions, t, text, text_segment_ids):
    """Exact velocity of a flow whose data is a point mass: at A if the row has text, else
    at B_. Counts its traces."""
    point_mass_field.traces += 1
    has_text = jnp.any(text_segment_ids != 0, axis=1)[:, None, None]
    return (xt - jnp.where(has_text, A, B_)) / t[..., None]


point_mass_field.traces = 0


def _sampler_inputs(b=2, l=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x=rng.normal(size=(b, l, d)).astype(np.float32),
                segment_ids=np.ones((b, l), np.int32), positions=np.zeros((b, l, 3), np.int32),
                text=np.zeros((b, 2, TEXT_DIM), np.float32),
                text_segment_ids=np.ones((b, 2), np.int32))


def test_euler_lands_on_point_mass_with_guidance_without_retracing():
    inp = _sampler_inputs()
    before = point_mass_field.traces
    # Without guidance: lands exactly on A, for any step count and shift.
    for steps, shift in ((1, 1.0), (7, 3.0)):
        x = sample(point_mass_field, guidance_scale=None, num_steps=steps,
                         shift=jnp.float32(shift), **inp)
        np.testing.assert_allclose(x, A, atol=1e-5)
    # Guided field is the field of the point mass B + w (A - B): exact landing again.
    traces = point_mass_field.traces
    for w in (1.0, 0.0, 3.0, -0.5):
        x = sample(point_mass_field, guidance_scale=jnp.float32(w), num_steps=4, **inp)
        np.testing.assert_allclose(x, B_ + w * (A - B_), atol=1e-5)
    assert point_mass_field.traces == traces + 1  # new scales never retrace
    # Per-row scales.
    x = sample(point_mass_field, guidance_scale=jnp.array([1.0, 2.0]), num_steps=4, **inp)
    np.testing.assert_allclose(x[0], A, atol=1e-5)
    np.testing.assert_allclose(x[1], B_ + 2.0 * (A - B_), atol=1e-5)
    assert point_mass_field.traces - before <= 4


def test_euler_frozen_tokens_keep_their_value():
    inp = _sampler_inputs()
    cond = np.zeros((2, 5), bool)
    cond[:, 0] = True  # token 0 is a clean conditioning token at t = 0

    def field(xt, segment_ids, positions, t, text, text_segment_ids, cond_mask=None):
        return (xt - A) / jnp.maximum(t, 1e-3)[..., None]

    x = np.asarray(sample(field, guidance_scale=None, num_steps=3,
                          cond_mask=cond, **inp))
    np.testing.assert_array_equal(x[:, 0], inp["x"][:, 0])
    np.testing.assert_allclose(x[:, 1:], A, atol=1e-5)


def test_euler_with_dit_no_retrace_and_unit_guidance_is_conditional():
    model = DiT(in_dim=3, hidden_size=16, depth=1, num_heads=2, text_dim=TEXT_DIM,
                rngs=nnx.Rngs(0))
    # Non-zero output layers, so that guidance has something to mix.
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(
        lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), state))
    inp = _sampler_inputs(seed=1)
    inp["text"] = rng.normal(size=inp["text"].shape).astype(np.float32)
    inp["positions"] = np.stack([np.zeros(5), np.arange(5), np.zeros(5)], -1)[None].repeat(
        2, 0).astype(np.int32)
    n0 = samplers.TRACE_COUNT
    x1 = sample(model, guidance_scale=jnp.float32(1.0), num_steps=3, **inp)
    x4 = sample(model, guidance_scale=jnp.float32(4.0), num_steps=3, **inp)
    assert samplers.TRACE_COUNT == n0 + 1
    xc = sample(model, guidance_scale=None, num_steps=3, **inp)
    np.testing.assert_allclose(x1, xc, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(x4) - np.asarray(xc)).max() > 1e-2
