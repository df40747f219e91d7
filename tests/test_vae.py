"""Tests for the causal spacetime VAE and its loss (CPU, small, deterministic).

XLA:CPU compiles dominate the run time, so one small model is built once per module and every
numerical test reuses the same two jitted programs (full autoencoder at T = 9 and T = 1);
other configurations are checked by shape only, through ``jax.eval_shape`` (nothing compiled).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.models.vae import CausalConv3d, CausalVAE
from sora_jax.models.vae_loss import kl_divergence, vae_loss

SMALL = dict(
    base_channels=16, channel_mults=(1, 2), spatial_downsample=4, latent_channels=4
)
B = 2


@pytest.fixture(scope="module")
def model():
    return CausalVAE(**SMALL, rngs=nnx.Rngs(0))


@nnx.jit
def _autoencode(m, x):
    # Mean path (no key): deterministic.
    return m(x)


@pytest.fixture(scope="module")
def video():
    return jax.random.uniform(jax.random.key(1), (B, 9, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def base_out(model, video):
    return jax.device_get(_autoencode(model, video))


def _abstract_call(x_shape, **cfg):
    """(recon, mean, logvar) shapes of CausalVAE(**cfg)(x) without compiling anything."""
    gd, st = nnx.split(nnx.eval_shape(lambda: CausalVAE(**cfg, rngs=nnx.Rngs(0))))
    return jax.eval_shape(
        lambda st, x: nnx.merge(gd, st)(x), st, jax.ShapeDtypeStruct(x_shape, jnp.float32)
    )


# ---------------------------------------------------------------- shapes


def test_shapes_video_and_image(model, video, base_out):
    recon, mean, logvar = base_out
    assert mean.shape == logvar.shape == (B, 3, 8, 8, 4)
    assert recon.shape == video.shape
    assert recon.dtype == np.float32
    assert np.all(np.isfinite(recon))
    assert np.all(logvar >= -30.0) and np.all(logvar <= 20.0)
    assert model.latent_shape(9, 32, 32) == (3, 8, 8, 4)
    assert model.latent_shape(1, 32, 32) == (1, 8, 8, 4)
    assert model.video_frames(3) == 9 and model.video_frames(1) == 1

    recon1, mean1, _ = _autoencode(model, video[:, :1])
    assert mean1.shape == (B, 1, 8, 8, 4)
    assert recon1.shape == (B, 1, 32, 32, 3)


def test_shapes_spatial8_and_other_configs():
    recon, mean, logvar = _abstract_call(
        (B, 5, 32, 48, 3),
        base_channels=8, channel_mults=(1, 2, 2), spatial_downsample=8, latent_channels=8,
    )
    assert mean.shape == logvar.shape == (B, 2, 4, 6, 8)
    assert recon.shape == (B, 5, 32, 48, 3)
    # Default config (4x8x8, 16 ch), temporal 2 and 1, spatial 16, mid attention.
    cases = [
        (dict(), (1, 17, 64, 64, 3), (1, 5, 8, 8, 16)),
        (dict(temporal_downsample=2), (1, 9, 32, 32, 3), (1, 5, 4, 4, 16)),
        (dict(temporal_downsample=1, channel_mults=(1, 1, 1)), (1, 3, 32, 32, 3), (1, 3, 4, 4, 16)),
        (dict(spatial_downsample=16, mid_attention=True), (1, 5, 64, 32, 3), (1, 2, 4, 2, 16)),
    ]
    for cfg, x_shape, z_shape in cases:
        cfg = dict(base_channels=8, **cfg)
        recon, mean, _ = _abstract_call(x_shape, **cfg)
        assert mean.shape == z_shape, cfg
        assert recon.shape == x_shape, cfg
        m = nnx.eval_shape(lambda: CausalVAE(**cfg, rngs=nnx.Rngs(0)))
        assert m.latent_shape(*x_shape[1:4]) == z_shape[1:]
        assert m.video_frames(z_shape[1]) == x_shape[1]


def test_remat_and_bf16_trace():
    """Gradients trace through nnx.remat; bf16 compute gives bf16 outputs (shapes only)."""
    cfg = dict(base_channels=8, channel_mults=(1, 2), spatial_downsample=4, latent_channels=4)
    x = jax.ShapeDtypeStruct((1, 5, 16, 16, 3), jnp.float32)
    gd, st = nnx.split(
        nnx.eval_shape(lambda: CausalVAE(**cfg, remat=True, num_res_blocks=2, rngs=nnx.Rngs(0)))
    )

    def loss(st, x):
        recon, mean, logvar = nnx.merge(gd, st)(x)
        return vae_loss(recon, x, mean, logvar)[0]

    grads = jax.eval_shape(jax.grad(loss), st, x)
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, st)
    recon, mean, _ = _abstract_call(x.shape, dtype=jnp.bfloat16, **cfg)
    assert recon.dtype == mean.dtype == jnp.bfloat16


# ---------------------------------------------------------------- causality


def test_first_frame_coded_alone(model, video, base_out):
    recon, mean, logvar = base_out
    recon1, mean1, logvar1 = jax.device_get(_autoencode(model, video[:, :1]))
    np.testing.assert_allclose(mean1, mean[:, :1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logvar1, logvar[:, :1], atol=1e-5, rtol=0)
    # The decoder is causal too, so the image round trip equals frame 0 of the video's.
    np.testing.assert_allclose(recon1, recon[:, :1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("ks", [(1, 4), (5, 8)])
def test_causality(model, video, base_out, ks):
    recon, mean, _ = base_out
    # Batch element i perturbs frame ks[i]; elements are independent (per-sample, per-frame norm).
    pert = video
    for i, k in enumerate(ks):
        pert = pert.at[i, k].set(-video[i, k])
    recon_p, mean_p, _ = jax.device_get(_autoencode(model, pert))
    for i, k in enumerate(ks):
        g = math.ceil(k / 4)  # latent group of frame k: frames 4g-3 .. 4g
        # Latents before k's group see only earlier frames: bit-identical.
        np.testing.assert_array_equal(mean_p[i, :g], mean[i, :g])
        assert not np.allclose(mean_p[i, g], mean[i, g]), "perturbation should reach latent g"
        # Output frames 0 .. 4(g-1) decode from latents < g only.
        first_of_group = 4 * (g - 1) + 1
        np.testing.assert_array_equal(recon_p[i, :first_of_group], recon[i, :first_of_group])
        assert not np.allclose(recon_p[i, first_of_group:], recon[i, first_of_group:])


def test_causal_conv_impls_agree_and_stride():
    conv = CausalConv3d(3, 5, 3, (2, 2, 2), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(2), (1, 5, 8, 8, 3))
    y_taps = conv(x)
    conv.impl = "conv3d"
    y_3d = conv(x)
    assert y_taps.shape == (1, 3, 4, 4, 5)  # 1 + 2m -> 1 + m frames
    np.testing.assert_allclose(y_taps, y_3d, atol=1e-5)
    # Output 0 sees input 0 alone; output 1 sees inputs <= 2.
    y_p = conv(x.at[:, 3].add(1.0))
    np.testing.assert_allclose(y_p[:, :2], y_3d[:, :2], atol=1e-6)
    assert not np.allclose(y_p[:, 2], y_3d[:, 2])


# ---------------------------------------------------------------- loss


def test_kl_zero_and_closed_form():
    z = jnp.zeros((2, 3, 4, 4, 5))
    assert float(kl_divergence(z, z)) == 0.0
    mean = jnp.array([1.0, 0.0, -2.0])
    logvar = jnp.array([0.0, math.log(2.0), math.log(0.5)])
    # KL(N(mu, s2) || N(0, 1)) = 0.5 (mu^2 + s2 - 1 - ln s2), per element, averaged.
    per = [0.5, 0.5 * (1.0 - math.log(2.0)), 0.5 * (4.0 + 0.5 - 1.0 - math.log(0.5))]
    np.testing.assert_allclose(float(kl_divergence(mean, logvar)), np.mean(per), rtol=1e-6)


def test_vae_loss_terms():
    target = jnp.array([[0.0, 0.5, -1.0, 1.0]])
    recon = jnp.array([[0.5, 0.5, -1.5, 0.0]])
    mean = jnp.array([1.0, 0.0])
    logvar = jnp.zeros(2)
    loss, m = vae_loss(recon, target, mean, logvar, l1_weight=2.0, l2_weight=3.0, kl_weight=0.1)
    l1, l2, kl = 2.0 / 4, (0.25 + 0.25 + 1.0) / 4, 0.25
    np.testing.assert_allclose(float(m["l1"]), l1, rtol=1e-6)
    np.testing.assert_allclose(float(m["l2"]), l2, rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 2 * l1 + 3 * l2 + 0.1 * kl, rtol=1e-6)
    # PSNR on [0, 1] pixels, recon clipped: errors 0.25, 0, 0 (clipped), 0.5 -> mse 0.078125.
    np.testing.assert_allclose(float(m["psnr"]), -10 * math.log10(0.078125), rtol=1e-5)
    _, same = vae_loss(target, target, jnp.zeros(2), jnp.zeros(2))
    assert float(same["psnr"]) == 100.0  # capped: an exact match has no finite PSNR
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(recon, target[:, :3], mean, logvar)
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(recon, target, mean, logvar[:1])


def test_overfit_one_batch(model):
    m = nnx.clone(model)
    # A smooth moving pattern is compressible 30x (the latent is 2x4x4x4 for 5x16x16x3 pixels)
    # and so learnable in a few steps; white noise would not be.
    grids = (jnp.arange(n, dtype=jnp.float32) for n in (5, 16, 16, 3))
    t, h, w, c = jnp.meshgrid(*grids, indexing="ij")
    x = 0.8 * jnp.sin(0.4 * h + 0.25 * w + 0.5 * t + 2.0 * c)[None]
    opt = nnx.Optimizer(m, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, x, key):
        def loss_fn(m):
            recon, mean, logvar = m(x, key=key)
            return vae_loss(recon, x, mean, logvar)

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(m, opt, x, k)) for k in jax.random.split(jax.random.key(0), 30)]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < 0.7 * losses[0], losses


# ---------------------------------------------------------------- errors


def test_bad_input_shapes(model):
    with pytest.raises(ValueError, match=r"T=8 .*1 \+ 4\*k.*1, 5, 9"):
        model.encode(jnp.zeros((1, 8, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"H=30 and W=32 .*spatial_downsample=4"):
        model.encode(jnp.zeros((1, 5, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\).*\(1, 5, 32, 32\)"):
        model.encode(jnp.zeros((1, 5, 32, 32)))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        model(jnp.zeros((1, 5, 32, 32, 4)))
    with pytest.raises(ValueError, match=r"\(B, t, h, w, 4\)"):
        model.decode(jnp.zeros((1, 2, 8, 8, 3)))
    with pytest.raises(ValueError, match="T=0"):
        model.latent_shape(0, 32, 32)
    with pytest.raises(ValueError, match="W=18"):
        model.latent_shape(5, 32, 18)
    with pytest.raises(ValueError, match=">= 1"):
        model.video_frames(0)


@pytest.mark.parametrize(
    "cfg, msg",
    [
        (dict(spatial_downsample=6), "power of 2"),
        (dict(temporal_downsample=3), "1, 2, 4 or 8"),
        (dict(temporal_downsample=16), "1, 2, 4 or 8"),
        (dict(channel_mults=(1, 2), spatial_downsample=8), r"2 levels .* need 3 down stages"),
        (dict(channel_mults=(1, 2, 2, 2), spatial_downsample=32), "need 5 down stages"),
        (dict(channel_mults=()), "non-empty"),
        (dict(channel_mults=(1, 0)), "positive"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(num_res_blocks=-1), "num_res_blocks"),
    ],
)
def test_bad_configs(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        CausalVAE(base_channels=8, **cfg, rngs=nnx.Rngs(0))
