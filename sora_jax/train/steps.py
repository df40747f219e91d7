"""Loss functions plugged into the one training loop: the VAE recipe and DiT rectified flow.

Every loss function has the signature ``(model, batch, key, step) -> (loss, metrics)`` that
``sora_jax.train.trainer.TrainStep`` differentiates with respect to all of ``model``'s
``nnx.Param``s in one ``value_and_grad``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sora_jax.diffusion.conditioning import conditioning_settings, is_enabled
from sora_jax.diffusion.flow import rectified_flow_loss
from sora_jax.models.vae_gan import VAETrainModel
from sora_jax.models.vae_loss import (
    adaptive_weight, hinge_d_loss, hinge_g_loss, ssim, vae_loss, vae_loss_settings,
)
from sora_jax.train.trainer import OptimizerFn, clipped_adamw, make_optimizer, make_schedule

__all__ = ["dit_loss_fn", "vae_loss_fn", "vae_optimizer_fn"]

# G_L of VQGAN eq. 7: the decoder's output conv (``CausalVAE.decoder.conv_out``).
_LAST_LAYER = ("decoder", "conv_out", "kernel")


def _reconstruction(recon: jax.Array, target: jax.Array, c: dict[str, Any]) -> jax.Array:
    """Weighted pixel + structural loss, the L_rec of VQGAN eq. 7 (KL excluded, as there)."""
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    if c["l1_weight"]:
        loss += c["l1_weight"] * jnp.mean(jnp.abs(diff))
    if c["l2_weight"]:
        loss += c["l2_weight"] * jnp.mean(jnp.square(diff))
    if c["ssim_weight"]:
        loss += c["ssim_weight"] * (1.0 - ssim(recon, target))
    return loss


def _is_last_layer(path, _value) -> bool:
    return tuple(str(p) for p in path) == _LAST_LAYER


class _GanOut(NamedTuple):
    grad_pixels: jax.Array  # d g_loss / d recon, (B, T, H, W, C)
    g_loss: jax.Array
    lam: jax.Array  # adaptive weight lambda (VQGAN eq. 7), 0 while the GAN is off
    d_loss: jax.Array
    logits_real: jax.Array
    logits_fake: jax.Array


def vae_loss_fn(loss_cfg: Mapping[str, Any] | ml_collections.ConfigDict):
    """The VAE training objective: ``(model, {"video": (B, T, H, W, C)}, key, step) -> (loss, metrics)``.

    loss = l1_weight * L1 + l2_weight * L2 + ssim_weight * (1 - SSIM) + kl_weight * KL
           + [step >= disc_start] * (gan_weight * lambda * L_G + L_D)

    with L1 / L2 / SSIM / KL as in ``sora_jax.models.vae_loss.vae_loss``; L_G = -mean D(recon)
    and L_D = 0.5 (mean relu(1 - D(video)) + mean relu(1 + D(recon))) the hinge losses (Lim &
    Ye 2017; VQGAN, Esser et al. 2021); lambda VQGAN's adaptive weight (eq. 7): the ratio of
    the gradient norms of L_rec = l1/l2/ssim terms and of L_G at the decoder's last layer
    ``decoder.conv_out.kernel``, clipped to [0, max_adaptive_weight], no gradient (1 when
    ``adaptive_weight`` is False). The video is the posterior sample's decoding
    (reparameterised with ``key``).

    The two players share one ``value_and_grad`` without mixing: L_G reaches the VAE only (the
    discriminator's parameters are stop-gradient there) and L_D reaches the discriminator only
    (it sees stop_gradient(recon)). Before ``disc_start`` a ``lax.cond`` skips the discriminator
    altogether (its forward and backward do not run) and both GAN terms are 0; pair with
    ``vae_optimizer_fn``, whose discriminator update is also held until ``disc_start``.

    Config keys (the ``vae_loss`` section, all required):
      l1_weight, l2_weight, kl_weight, ssim_weight: term weights.
      gan_weight: weight of L_G; 0 turns the discriminator off (no parameters).
      disc_start: first step (0-based) with the GAN terms and discriminator updates on.
      adaptive_weight: scale L_G by VQGAN's lambda; False: lambda = 1.
      max_adaptive_weight: upper clip of lambda (VQGAN's is 1e4).
      disc_channels, disc_layers: ``PatchDiscriminator3d`` width and stride-2 layers
        (read by ``sora_jax.models.vae_gan.build_vae_train_model``).
      disc_lr_mult: discriminator learning rate / VAE learning rate
        (read by ``vae_optimizer_fn``).

    The model is a ``VAETrainModel`` (``build_vae_train_model``); a bare ``CausalVAE`` is
    accepted while ``gan_weight`` is 0.

    Metrics (float32 scalars): ``loss``, ``l1``, ``l2``, ``kl``, ``ssim``, ``psnr``; with the
    GAN also ``rec_loss`` (L_rec), ``g_loss``, ``d_loss``, ``logits_real``, ``logits_fake``
    (mean patch logits; all 0 before ``disc_start``), ``adaptive_weight`` (lambda) and
    ``gan_weight`` (the effective weight gan_weight * lambda on L_G, 0 before ``disc_start``).

    Raises:
      ValueError: bad config (``vae_loss_settings``); at trace time, ``gan_weight`` > 0 with a
        model that has no discriminator, or ``adaptive_weight`` with an autoencoder that has no
        ``decoder.conv_out.kernel``.
    """
    c = vae_loss_settings(loss_cfg)
    gan = c["gan_weight"] > 0
    weights = {k: c[k] for k in ("l1_weight", "l2_weight", "kl_weight", "ssim_weight")}

    def loss_fn(model: nnx.Module, batch, key: jax.Array, step: jax.Array):
        if isinstance(model, VAETrainModel):
            vae, disc = model.vae, model.discriminator
        else:
            vae, disc = model, None
        video = batch["video"]
        if not gan:
            recon, mean, logvar = vae(video, key=key)
            return vae_loss(recon, video, mean, logvar, **weights)
        if disc is None:
            raise ValueError("vae_loss.gan_weight > 0 needs a VAETrainModel with a discriminator "
                             "(sora_jax.models.vae_gan.build_vae_train_model)")
        pull_kernel = None
        if c["adaptive_weight"]:
            # One decode inside jax.vjp w.r.t. the last kernel: its pullback maps a pixel gradient
            # to that kernel's gradient through conv_out and depth_to_space alone, so the two
            # gradients of eq. 7 cost two small transposed convs, not two decoder backwards.
            graphdef, kernel, rest = nnx.split(vae, _is_last_layer, ...)
            if len(jax.tree.leaves(kernel)) != 1:
                raise ValueError("vae_loss.adaptive_weight needs an autoencoder with a "
                                 "decoder.conv_out.kernel last layer; set adaptive_weight=False")

            def run(k):
                recon, mean, logvar = nnx.merge(graphdef, k, rest)(video, key=key)
                return recon, (mean, logvar)

            recon, pull_kernel, (mean, logvar) = jax.vjp(run, kernel, has_aux=True)
        else:
            recon, mean, logvar = vae(video, key=key)
        base, metrics = vae_loss(recon, video, mean, logvar, **weights)
        recon_sg = jax.lax.stop_gradient(recon)
        d_graphdef, d_state = nnx.split(disc)

        def gan_on(d_state) -> _GanOut:
            frozen = nnx.merge(d_graphdef, jax.lax.stop_gradient(d_state))
            # L_G and its pixel gradient from one forward and one input-only backward; the
            # outer value_and_grad gets that gradient through a linear surrogate below.
            g_loss, pull_pixels = jax.vjp(lambda x: hinge_g_loss(frozen(x)), recon_sg)
            (grad_pixels,) = pull_pixels(jnp.ones_like(g_loss))
            lam = jnp.ones((), jnp.float32)
            if pull_kernel is not None:
                grad_rec = jax.grad(lambda r: _reconstruction(r, video, c))(recon_sg)
                (k_rec,) = pull_kernel(grad_rec)
                (k_gan,) = pull_kernel(grad_pixels)
                lam = adaptive_weight(jax.tree.leaves(k_rec)[0], jax.tree.leaves(k_gan)[0],
                                      c["max_adaptive_weight"])
            # Real and fake in one batch: GroupNorm statistics are per example, so this equals
            # two separate calls.
            logits = nnx.merge(d_graphdef, d_state)(jnp.concatenate([video.astype(recon_sg.dtype),
                                                                     recon_sg]))
            real, fake = jnp.split(logits, 2)
            return _GanOut(grad_pixels, g_loss, lam, hinge_d_loss(real, fake),
                           jnp.mean(real), jnp.mean(fake))

        def gan_off(d_state) -> _GanOut:
            zero = jnp.zeros((), jnp.float32)
            return _GanOut(jnp.zeros_like(recon_sg), zero, zero, zero, zero, zero)

        out = jax.lax.cond(step >= c["disc_start"], gan_on, gan_off, d_state)
        weight = c["gan_weight"] * out.lam
        # Value weight * g_loss; gradient w.r.t. recon weight * dL_G/drecon (the surrogate is
        # linear in recon and its value cancels).
        surrogate = jnp.sum(jax.lax.stop_gradient(out.grad_pixels).astype(jnp.float32)
                            * recon.astype(jnp.float32))
        adversarial = weight * (out.g_loss + surrogate - jax.lax.stop_gradient(surrogate))
        loss = base + adversarial + out.d_loss
        metrics.update(
            loss=loss, rec_loss=jax.lax.stop_gradient(base - c["kl_weight"] * metrics["kl"]),
            g_loss=out.g_loss, d_loss=out.d_loss, logits_real=out.logits_real,
            logits_fake=out.logits_fake, adaptive_weight=out.lam, gan_weight=weight,
        )
        return loss, metrics

    return loss_fn


def _part_labels(params):
    # Top-level key of a VAETrainModel's parameter tree: "vae" or "discriminator".
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "disc" if getattr(path[0], "key", None) == "discriminator" else "vae",
        params)


def vae_optimizer_fn(loss_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> OptimizerFn:
    """The optimizer factory (``TrainTask.optimizer_fn``) of a VAE run with its ``vae_loss`` config.

    Without the GAN: ``make_optimizer``. With it (a ``VAETrainModel`` with a discriminator):
    ``optax.multi_transform`` of two clipped AdamWs from the same ``train`` config, so each
    part is clipped by its own global norm (a discriminator's large gradients must not shrink
    the VAE's): the VAE's at the config's schedule; the discriminator's at
    ``disc_lr_mult * schedule(step)``, held off until step ``disc_start`` by
    ``optax.transforms.conditionally_mask``: zero updates and its AdamW state frozen (weight
    decay would otherwise still move it, and a bias-correction count advanced over held-off
    steps would over-scale its first real updates); its inner count starts at 0 on the first
    live update.

    Returns:
      ``train config -> (transformation, VAE learning-rate schedule)``.

    Raises:
      ValueError: bad config (``vae_loss_settings``).
    """
    c = vae_loss_settings(loss_cfg)
    if c["gan_weight"] <= 0:
        return make_optimizer
    start, mult = c["disc_start"], c["disc_lr_mult"]

    def make(cfg: ml_collections.ConfigDict):
        schedule = make_schedule(cfg)
        # the inner count restarts at 0 on the first live update; shift it back so the
        # discriminator follows the run's schedule from step disc_start on
        disc = optax.transforms.conditionally_mask(
            clipped_adamw(cfg, lambda n: mult * schedule(n + start)), lambda count: count >= start)
        tx = optax.multi_transform({"vae": clipped_adamw(cfg, schedule), "disc": disc}, _part_labels)
        return tx, schedule

    return make


def dit_loss_fn(flow_cfg: ml_collections.ConfigDict,
                conditioning: Mapping[str, Any] | ml_collections.ConfigDict | None = None):
    """``(dit, packed batch, key, step) -> (loss, metrics)``: rectified-flow velocity MSE on real
    tokens (``step`` unused).

    ``conditioning`` (the config section, see
    ``sora_jax.diffusion.conditioning.conditioning_settings``) draws clean context frames per
    example; None or rates that give only "none" train text-to-video alone.

    Metrics add the packing quality of the batch: ``padding_fraction`` (share of latent slots
    that are padding) and ``examples_per_row`` (segments per row; ids are 1..k in a row).

    Raises:
      ValueError: a bad ``conditioning`` section.
    """
    kwargs = flow_cfg.to_dict()
    if conditioning is not None:
        settings = conditioning_settings(conditioning)
        if is_enabled(settings):
            kwargs["conditioning"] = settings

    def loss_fn(model: nnx.Module, batch, key: jax.Array, step: jax.Array | None = None):
        batch = dict(batch)
        dropped = batch.pop("num_dropped", None)
        loss, aux = rectified_flow_loss(model, batch, key, **kwargs)
        seg = batch["segment_ids"]
        aux = dict(aux, padding_fraction=jnp.mean((seg == 0).astype(jnp.float32)),
                   examples_per_row=jnp.mean(jnp.max(seg, axis=1).astype(jnp.float32)))
        if dropped is not None:
            aux = dict(aux, num_dropped=dropped)
        return loss, aux

    return loss_fn
