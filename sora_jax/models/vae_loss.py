"""VAE objective: pixel reconstruction (L1 / L2, SSIM), a weighted KL to N(0, I), and the
adversarial pieces (hinge losses, VQGAN's adaptive weight).

The KL of a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) from the prior N(0, I) is,
per latent element (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Appendix B /
eq. 10, where -KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)):

    KL = 1/2 * (mean^2 + exp(logvar) - 1 - logvar)

Latent-diffusion VAEs (and the causal video VAEs of MAGVIT-v2, CogVideoX, Open-Sora) use a tiny
KL weight so the latent stays close to a reconstruction code while keeping a bounded scale.

Pixel losses alone give blurred reconstructions; the recipe adds a structural term
``1 - SSIM`` (Wang et al. 2004) and a patch discriminator trained with hinge losses (Lim & Ye
2017, "Geometric GAN"; as in VQGAN, Esser et al. 2021), whose generator term is scaled by the
adaptive weight of VQGAN eq. 7. No perceptual network (LPIPS needs downloaded VGG weights).
The full training objective lives in ``sora_jax.train.steps.vae_loss_fn``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sora_jax.evaluation.image_quality import PSNR_CAP_DB, psnr_per_item, ssim

__all__ = [
    "VAE_LOSS_KEYS",
    "vae_loss_settings",
    "adaptive_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "kl_divergence",
    "vae_loss",
]


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mean over all latent elements of KL(N(mean, exp(logvar)) || N(0, 1)), in nats.

    Args:
      mean, logvar: same shape, any rank, float.

    Returns:
      float32 scalar, >= 0; zero iff mean == 0 and logvar == 0.

    Raises:
      ValueError: if the shapes differ.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean {mean.shape} and logvar {logvar.shape} must have the same shape")
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def vae_loss(
    recon: jax.Array,
    target: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    kl_weight: float = 1e-6,
    ssim_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted VAE loss: l1_weight * L1 + l2_weight * L2 + ssim_weight * (1 - SSIM) + kl_weight * KL.

    L1 and L2 are means over all pixel elements of |recon - target| and (recon - target)^2 (on
    the [-1, 1] scale); SSIM is ``ssim`` (Wang et al. 2004, per frame, pixels mapped to [0, 1]);
    KL is ``kl_divergence`` (mean over latent elements, Kingma & Welling 2014 eq. 10). Averaging
    rather than summing keeps the weights independent of resolution and duration, so one set
    of weights serves every size.

    Args:
      recon, target: video (B, T, H, W, C) float (any shape, equal; SSIM needs (..., H, W, C)).
      mean, logvar: posterior parameters (B, t, h, w, c) float (equal shapes).
      l1_weight, l2_weight, kl_weight, ssim_weight: non-negative floats (may be traced arrays).
        A Python 0 ``ssim_weight`` still reports SSIM (NaN for inputs without (H, W, C) axes),
        without differentiating it.

    Returns:
      (loss, metrics): loss a float32 scalar; metrics a dict of float32 scalars ``loss``, ``l1``,
      ``l2``, ``kl``, ``ssim`` and ``psnr`` (dB, mean over examples of ``psnr_per_item`` with
      recon clipped to [-1, 1], each capped at ``PSNR_CAP_DB``).

    Raises:
      ValueError: if recon and target, or mean and logvar, differ in shape, or ssim_weight is
        non-zero and recon has fewer than 3 axes.
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon {recon.shape} and target {target.shape} must have the same shape")
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(diff))
    l2 = jnp.mean(jnp.square(diff))
    kl = kl_divergence(mean, logvar)
    loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
    ssim_off = isinstance(ssim_weight, (int, float)) and ssim_weight == 0
    if ssim_off:
        s = _ssim_or_nan(jax.lax.stop_gradient(recon), target)
    else:
        s = ssim(recon, target)
        loss = loss + ssim_weight * (1.0 - s)
    metrics = {
        "loss": loss,
        "l1": l1,
        "l2": l2,
        "kl": kl,
        "ssim": s,
        # recon clipped to the pixel range, per example, capped for a perfect match
        "psnr": jnp.mean(jnp.minimum(psnr_per_item(
            jnp.clip(jax.lax.stop_gradient(recon), -1.0, 1.0), target), PSNR_CAP_DB)),
    }
    return loss, metrics


def _ssim_or_nan(recon: jax.Array, target: jax.Array) -> jax.Array:
    # Callers of ``vae_loss`` may pass flat arrays (no frame axes); SSIM is undefined there.
    if recon.ndim < 3:
        return jnp.full((), jnp.nan, jnp.float32)
    return ssim(recon, target)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss (Lim & Ye 2017, "Geometric GAN", eq. 7; VQGAN's ``hinge_d_loss``):

        0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))

    Zero once real logits are >= 1 and fake ones <= -1, so a confident discriminator stops
    pushing. The 0.5 averages the two halves (as VQGAN does).

    Args:
      logits_real, logits_fake: float arrays of any shapes (patch logits).

    Returns:
      float32 scalar >= 0.
    """
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator loss of the hinge GAN (Lim & Ye 2017, eq. 8; VQGAN's ``g_loss``): -mean(D(G(z))).

    Args:
      logits_fake: float array, the discriminator's logits on reconstructions.

    Returns:
      float32 scalar (unbounded).
    """
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, max_weight: float = 1e4,
                    eps: float = 1e-4) -> jax.Array:
    """VQGAN's adaptive adversarial weight (Esser et al. 2021, "Taming Transformers", eq. 7):

        lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + eps), clipped to [0, max_weight]

    where G_L is the decoder's last layer: the GAN term is scaled so that its gradient at the
    output layer is as large as the reconstruction term's, whatever the two losses' scales.
    The result carries no gradient (it is a weight, not part of the objective).

    Args:
      grad_rec, grad_gan: gradients of the reconstruction and generator losses with respect to
        the last layer's kernel, float arrays (same shape).
      max_weight: upper clip (VQGAN: 1e4).
      eps: keeps the ratio finite while the GAN gradient is ~0 (VQGAN: 1e-4).

    Returns:
      float32 scalar in [0, max_weight], stop-gradient.
    """
    num = jnp.sqrt(jnp.sum(jnp.square(grad_rec.astype(jnp.float32))))
    den = jnp.sqrt(jnp.sum(jnp.square(grad_gan.astype(jnp.float32)))) + eps
    return jax.lax.stop_gradient(jnp.clip(num / den, 0.0, max_weight))


# The keys of the ``vae_loss`` config section (its values live in the configs).
VAE_LOSS_KEYS = ("l1_weight", "l2_weight", "kl_weight", "ssim_weight", "gan_weight", "disc_start",
                 "adaptive_weight", "max_adaptive_weight", "disc_channels", "disc_layers",
                 "disc_lr_mult")


def vae_loss_settings(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``vae_loss`` config section, checked and converted to plain Python values.

    Args:
      loss_cfg: ConfigDict or dict with every key of :data:`VAE_LOSS_KEYS` (see ``vae_loss_fn``).

    Returns:
      dict of floats, ``disc_start`` / ``disc_channels`` / ``disc_layers`` ints and
      ``adaptive_weight`` bool.

    Raises:
      ValueError: an unknown key (a typo would otherwise silently train without that term), a
        missing one, a negative weight or ``disc_start``, or a non-positive
        ``max_adaptive_weight`` / ``disc_lr_mult``.
    """
    c = loss_cfg.to_dict() if hasattr(loss_cfg, "to_dict") else dict(loss_cfg)
    unknown, missing = sorted(set(c) - set(VAE_LOSS_KEYS)), sorted(set(VAE_LOSS_KEYS) - set(c))
    if unknown or missing:
        raise ValueError(f"vae_loss config keys: unknown {unknown}, missing {missing}; "
                         f"expected {list(VAE_LOSS_KEYS)}")
    for k in ("l1_weight", "l2_weight", "kl_weight", "ssim_weight", "gan_weight",
              "max_adaptive_weight", "disc_lr_mult"):
        c[k] = float(c[k])
        if c[k] < 0:
            raise ValueError(f"vae_loss.{k} must be >= 0, got {c[k]}")
    for k in ("disc_start", "disc_channels", "disc_layers"):
        c[k] = int(c[k])
    c["adaptive_weight"] = bool(c["adaptive_weight"])
    if c["disc_start"] < 0:
        raise ValueError(f"vae_loss.disc_start must be >= 0, got {c['disc_start']}")
    if c["max_adaptive_weight"] <= 0 or c["disc_lr_mult"] <= 0:
        raise ValueError("vae_loss.max_adaptive_weight and vae_loss.disc_lr_mult must be > 0")
    return c
