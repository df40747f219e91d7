"""VAE objective: pixel reconstruction (L1 / L2) plus a weighted KL to N(0, I).

The KL of a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) from the prior N(0, I) is,
per latent element (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Appendix B /
eq. 10, where -KL = 1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)):

    KL = 1/2 * (mean^2 + exp(logvar) - 1 - logvar)

Latent-diffusion VAEs (and the causal video VAEs of MAGVIT-v2, CogVideoX, Open-Sora) use a tiny
KL weight so the latent stays close to a reconstruction code while keeping a bounded scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kl_divergence", "psnr", "vae_loss"]


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


def psnr(recon: jax.Array, target: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB, averaged over the batch.

    Pixels in [-1, 1] are mapped to [0, 1] (peak 1); ``recon`` is clipped to [-1, 1] first since
    the decoder output is unbounded. PSNR is computed per example (over all its other axes) and
    then averaged, as video PSNR is usually reported.

    Args:
      recon, target: (B, ...) float, same shape.

    Returns:
      float32 scalar (capped at 100 dB for a perfect match).

    Raises:
      ValueError: if the shapes differ.
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon {recon.shape} and target {target.shape} must have the same shape")
    r = (jnp.clip(recon.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5
    t = (target.astype(jnp.float32) + 1.0) * 0.5
    axes = tuple(range(1, r.ndim))
    mse = jnp.mean(jnp.square(r - t), axis=axes) if axes else jnp.square(r - t)
    return jnp.mean(jnp.minimum(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), 100.0))


def vae_loss(
    recon: jax.Array,
    target: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    kl_weight: float = 1e-6,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted VAE loss: l1_weight * L1 + l2_weight * L2 + kl_weight * KL.

    L1 and L2 are means over all pixel elements of |recon - target| and (recon - target)^2 (on
    the [-1, 1] scale); KL is ``kl_divergence`` (mean over latent elements, Kingma & Welling 2014
    eq. 10). Averaging rather than summing keeps the weights independent of resolution and
    duration, so one set of weights serves every size.

    Args:
      recon, target: video (B, T, H, W, C) float (any shape, equal).
      mean, logvar: posterior parameters (B, t, h, w, c) float (equal shapes).
      l1_weight, l2_weight, kl_weight: non-negative floats (may be traced arrays).

    Returns:
      (loss, metrics): loss a float32 scalar; metrics a dict of float32 scalars ``loss``, ``l1``,
      ``l2``, ``kl`` and ``psnr`` (dB, [-1, 1] pixels mapped to [0, 1], recon clipped).

    Raises:
      ValueError: if recon and target, or mean and logvar, differ in shape.
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon {recon.shape} and target {target.shape} must have the same shape")
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(diff))
    l2 = jnp.mean(jnp.square(diff))
    kl = kl_divergence(mean, logvar)
    loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
    metrics = {
        "loss": loss,
        "l1": l1,
        "l2": l2,
        "kl": kl,
        "psnr": psnr(jax.lax.stop_gradient(recon), target),
    }
    return loss, metrics
