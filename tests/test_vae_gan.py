"""The VAE recipe's structural and adversarial terms: SSIM loss, hinge losses, VQGAN's adaptive
weight, the 3D patch discriminator, and the GAN switching on at its configured step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.configs.common import train_section
from sora_jax.evaluation.image_quality import ssim
from sora_jax.models.discriminator import PatchDiscriminator3d
from sora_jax.models.vae import CausalVAE
from sora_jax.models.vae_gan import VAETrainModel, build_vae_train_model
from sora_jax.models.vae_loss import (
    adaptive_weight, hinge_d_loss, hinge_g_loss, vae_loss, vae_loss_settings,
)
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.steps import vae_loss_fn, vae_optimizer_fn
from sora_jax.train.trainer import TrainTask, train

# Small enough to compile in seconds; patch_size 2 puts depth_to_space after the last layer.
LOSS = dict(l1_weight=1.0, l2_weight=0.5, kl_weight=1e-6, ssim_weight=0.3, gan_weight=0.5,
            disc_start=2, adaptive_weight=True, max_adaptive_weight=1e4, disc_channels=4,
            disc_layers=2, disc_lr_mult=1.0)
# the plain objective: L1 + KL, no discriminator
PLAIN = dict(LOSS, l2_weight=0.0, ssim_weight=0.0, gan_weight=0.0, disc_start=0)


def tiny_vae(seed=0):
    return CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1,), num_res_blocks=0,
                     spatial_downsample=2, temporal_downsample=1, patch_size=2,
                     rngs=nnx.Rngs(seed))


def video(step=0, shape=(2, 3, 8, 8, 3)):
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape[1:]), indexing="ij")
    t, h, w, c = grids
    smooth = 0.7 * np.sin(0.6 * h + 0.4 * w + 0.5 * t + 2.0 * c + step)
    noise = 0.1 * np.random.default_rng(step).standard_normal(shape)
    return np.clip(smooth[None] + noise, -1, 1).astype(np.float32)


def params(module):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def trees_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_vae_loss_reports_ssim_and_trains_on_it():
    a = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 2, 16, 16, 3)), jnp.float32)
    _, m = vae_loss(a, a, jnp.zeros(2), jnp.zeros(2), ssim_weight=1.0)
    assert float(m["ssim"]) == pytest.approx(1.0, abs=1e-6)
    b = a.at[:, :, 4:8].set(0.0)
    loss, m = vae_loss(b, a, jnp.zeros(2), jnp.zeros(2), l1_weight=0.0, kl_weight=0.0, ssim_weight=1.0)
    assert float(loss) == pytest.approx(1.0 - float(ssim(b, a)), abs=1e-6) and float(loss) > 0.01


def test_hinge_losses_on_known_logits():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2.5): 0.5 * (2.5 / 3 + 3.5 / 3) = 1
    assert float(hinge_d_loss(real, fake)) == pytest.approx(1.0, rel=1e-6)
    assert float(hinge_g_loss(fake)) == pytest.approx(0.5 / 3, rel=1e-6)
    # a confident discriminator (real >= 1, fake <= -1) has zero loss
    assert float(hinge_d_loss(jnp.array([1.0, 3.0]), jnp.array([-1.0, -4.0]))) == 0.0
    # adaptive weight clipping and stop-gradient
    assert float(adaptive_weight(jnp.full((3,), 1e3), jnp.zeros(3), max_weight=5.0)) == 5.0
    assert float(adaptive_weight(jnp.zeros(3), jnp.ones(3))) == 0.0
    assert float(jax.grad(lambda x: adaptive_weight(x, jnp.ones(3)))(jnp.ones(3)).sum()) == 0.0


def test_discriminator_accepts_images_and_videos():
    score = nnx.jit(lambda d, x: d(x))
    disc = PatchDiscriminator3d(channels=4, num_layers=3, rngs=nnx.Rngs(0))
    x9 = jnp.asarray(video(0, (2, 9, 16, 16, 3)))
    assert score(disc, x9[:, :1]).shape == (2, 1, 2, 2, 1)  # an image: time stays 1
    y9 = score(disc, x9)
    assert y9.shape == (2, 2, 2, 2, 1) and y9.dtype == jnp.float32  # 9 -> 5 -> 3 -> 2 frames
    assert score(disc, x9[:, :4]).shape == (2, 1, 2, 2, 1)
    assert np.all(np.isfinite(y9))
    # GroupNorm statistics are per example: batch 1 scores like batch 2
    np.testing.assert_allclose(score(disc, x9[:1]), y9[:1], rtol=1e-5, atol=1e-6)
    native = PatchDiscriminator3d(channels=4, num_layers=3, impl="conv3d", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(score(native, x9), y9, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="expects video"):
        disc(x9[..., :1])


def test_loss_settings_need_every_key_and_the_plain_objective_is_vae_loss():
    assert vae_loss_settings(PLAIN)["gan_weight"] == 0.0
    typo = dict(PLAIN, ssim_wieght=1.0)
    del typo["ssim_weight"]
    with pytest.raises(ValueError, match=r"unknown \['ssim_wieght'\], missing \['ssim_weight'\]"):
        vae_loss_settings(typo)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        vae_loss_settings(dict(PLAIN, kl_weight=-1.0))
    vae, x, key = tiny_vae(), jnp.asarray(video()), jax.random.key(3)
    model = build_vae_train_model(vae, PLAIN, nnx.Rngs(1))
    assert model.discriminator is None
    loss_fn = vae_loss_fn(PLAIN)

    @nnx.jit
    def both(model):
        recon, mean, logvar = model.vae(x, key=key)
        return loss_fn(model, {"video": x}, key, jnp.int32(0))[0], vae_loss(
            recon, x, mean, logvar, l1_weight=1.0, l2_weight=0.0, kl_weight=1e-6, ssim_weight=0.0)[0]

    loss, expected = both(model)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="discriminator"):
        vae_loss_fn(LOSS)(vae, {"video": x}, key, jnp.int32(5))


@pytest.fixture(scope="module")
def gan_grads():
    """Loss, metrics and gradients of the full objective with the GAN on (one jit)."""
    model = build_vae_train_model(tiny_vae(), LOSS, nnx.Rngs(1))
    x, key = jnp.asarray(video()), jax.random.key(3)
    loss_fn = vae_loss_fn(LOSS)

    @nnx.jit
    def grads(model):
        return nnx.value_and_grad(lambda m: loss_fn(m, {"video": x}, key, jnp.int32(LOSS["disc_start"])),
                                  has_aux=True)(model)

    (_, metrics), g = grads(model)
    return model, x, key, metrics, g


def _recon_terms(recon, x, mean, logvar):
    """L_rec of eq. 7: the weighted l1 / l2 / ssim terms (no KL)."""
    w = {k: LOSS[k] for k in ("l1_weight", "l2_weight", "ssim_weight")}
    return vae_loss(recon, x, mean, logvar, kl_weight=0.0, **w)[0]


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(gan_grads):
    model, x, key, metrics, _ = gan_grads
    disc = model.discriminator

    @nnx.jit
    def last_layer_grads(vae, disc):
        def grad(objective):
            g = nnx.grad(lambda vae: objective(*vae(x, key=key)))(vae)
            return g["decoder"]["conv_out"]["kernel"][...]

        return (grad(lambda r, mean, logvar: _recon_terms(r, x, mean, logvar)),
                grad(lambda r, mean, logvar: hinge_g_loss(disc(r))))

    g_rec, g_gan = map(np.asarray, last_layer_grads(model.vae, disc))
    expected = np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4)
    assert 0 < expected < LOSS.get("max_adaptive_weight", 1e4)
    np.testing.assert_allclose(float(metrics["adaptive_weight"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["gan_weight"]), LOSS["gan_weight"] * expected, rtol=1e-4)


def test_generator_and_discriminator_gradients_come_from_their_own_losses(gan_grads):
    model, x, key, metrics, g = gan_grads
    lam = float(metrics["adaptive_weight"])
    disc = model.discriminator

    # the VAE's gradient: reconstruction + KL + weighted generator loss, the discriminator fixed
    def vae_objective(vae):
        recon, mean, logvar = vae(x, key=key)
        base = vae_loss(recon, x, mean, logvar, **{k: LOSS[k] for k in
                        ("l1_weight", "l2_weight", "kl_weight", "ssim_weight")})[0]
        return base + LOSS["gan_weight"] * lam * hinge_g_loss(disc(recon))

    # the discriminator's gradient: hinge loss on real and (fixed) reconstructed videos
    def d_objective(d, recon):
        return hinge_d_loss(d(x), d(recon))

    @nnx.jit
    def reference(vae, disc):
        recon = vae(x, key=key)[0]
        return (nnx.grad(vae_objective)(vae), nnx.value_and_grad(d_objective)(disc, recon))

    g_vae, (d_loss, g_disc) = reference(model.vae, disc)
    assert_trees_close(nnx.to_pure_dict(g["vae"]), nnx.to_pure_dict(g_vae), rtol=2e-3, atol=1e-6)
    assert_trees_close(nnx.to_pure_dict(g["discriminator"]), nnx.to_pure_dict(g_disc),
                       rtol=2e-3, atol=1e-7)
    assert float(metrics["d_loss"]) == pytest.approx(float(d_loss), rel=1e-5)


def test_discriminator_optimizer_is_held_until_disc_start():
    """Zero discriminator updates (weight decay on) and a frozen AdamW state before disc_start;
    the VAE part is updated from its first step of non-zero learning rate."""
    cfg = train_section(steps=10, learning_rate=0.1, warmup_steps=1, weight_decay=0.5)
    tx, _ = vae_optimizer_fn(dict(LOSS, disc_start=2))(cfg)
    p = {"vae": {"w": jnp.ones(3)}, "discriminator": {"w": jnp.ones(3)}}
    state = tx.init(p)
    for i in range(3):
        u, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
        assert (float(jnp.abs(u["discriminator"]["w"]).sum()) == 0.0) == (i < 2)
        assert (float(jnp.abs(u["vae"]["w"]).sum()) > 0) == (i > 0)  # warm-up starts at lr 0
    disc_adam = jax.tree.leaves(state.inner_states["disc"].inner_state,
                                is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    counts = [int(s.count) for s in disc_adam if isinstance(s, optax.ScaleByAdamState)]
    assert counts == [1]  # the inner AdamW saw only the live update


def test_discriminator_switches_on_at_the_configured_step(tmp_path):
    """Through the real train() loop: a checkpoint after every step, its metrics per step."""
    start = LOSS["disc_start"]
    model = build_vae_train_model(tiny_vae(), LOSS, nnx.Rngs(1))
    disc0, vae0 = params(model.discriminator), params(model.vae)
    finished = []

    def on_finish(m):
        finished.append(params(m.discriminator))
        m.vae.latent_shift[...] = jnp.full_like(m.vae.latent_shift[...], 7.0)

    steps = 4
    # weight decay on: a plain zero gradient would still move the discriminator before its start
    cfg = train_section(steps=steps, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1,
                        log_every=1, checkpoint_every=1, max_to_keep=steps)
    task = TrainTask("vae", model, vae_loss_fn(LOSS), lambda step: {"video": video(step)},
                     optimizer_fn=vae_optimizer_fn(LOSS), on_finish=on_finish)
    summary = train(task, cfg, str(tmp_path), progress=False)
    assert summary["train_step_compiles"] == 1

    with open(tmp_path / "logs" / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    for done, log in zip(range(1, steps + 1), logs):
        assert log["step"] == done
        restored = build_vae_train_model(tiny_vae(9), LOSS, nnx.Rngs(9))
        ckpt.restore(restored, step=done)
        on = done - 1 >= start  # the step just taken (0-based) is done - 1
        assert trees_equal(params(restored.discriminator), disc0) == (not on), done
        assert (log["vae/gan_weight"] > 0) == on and (log["vae/d_loss"] > 0) == on, log
        if not on:
            assert log["vae/g_loss"] == 0.0 and log["vae/logits_fake"] == 0.0
        if done >= 2:  # step 0 runs at learning rate 0 (warm-up from 0)
            assert not trees_equal(params(restored.vae), vae0)
        shift = np.asarray(restored.vae.latent_shift[...])
        assert np.all(shift == (7.0 if done == steps else 0.0))  # on_finish before the last save
    ckpt.close()
    assert len(finished) == 1 and trees_equal(finished[0], params(model.discriminator))
    assert isinstance(model, VAETrainModel)
