"""An exponential moving average (EMA) of a model's parameters, updated by the train step.

Diffusion models are sampled from an average of their weights over the end of training, not
from the last iterate (DiT, PixArt-alpha, Open-Sora, MaxDiffusion all do): the average removes
the step-to-step noise of the optimizer, which a sampler otherwise integrates over its whole
trajectory. ``EMA`` keeps that average as a copy of the model (same modules, same logical
axis names, so on a mesh it is sharded exactly like the parameters and costs one more copy of
them), updated once per applied optimizer step:

    ema <- beta_t * ema + (1 - beta_t) * params.

Two decay profiles (``train.ema.profile``):

- ``"power"`` (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
  Models", EDM2, eq. 2): beta_t = (1 - 1/t)^(gamma + 1) after the t-th update. The average then
  covers a fixed *fraction* of training whatever its length; that fraction is set by its
  relative standard deviation sigma_rel (``ema.sigma_rel``), and gamma follows from it (EDM2
  eq. 3, :func:`sigma_rel_to_gamma`). The first update copies the parameters (beta_1 = 0).
- ``"warmup"``: beta_t = min(decay, (1 + t) / (10 + t)) (the warm-up of TensorFlow's
  ``ExponentialMovingAverage`` with ``num_updates``): a fixed decay once t is large, shorter
  averages before.
- ``"none"``: no EMA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

__all__ = ["EMA", "EMA_PROFILES", "ema_decay", "sigma_rel_to_gamma"]

EMA_PROFILES = ("none", "power", "warmup")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma whose EMA profile has relative width ``sigma_rel``.

    EDM2 eq. 3: sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^-1 (gamma + 3)^(-1/2); squared and
    multiplied out, gamma is the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2.
    (EDM2 quotes gamma = 16.97 for sigma_rel = 0.05 and 6.94 for 0.10.)

    Raises:
      ValueError: ``sigma_rel`` not in (0, 0.28): gamma must be > 0 (at gamma = 0,
        sigma_rel = 1/sqrt(12) = 0.2887).
    """
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28), got {sigma_rel}")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_decay(updates: jax.Array, profile: str, decay: float = 0.9999, sigma_rel: float = 0.05) -> jax.Array:
    """beta_t of the update that makes ``updates`` updates in all (t >= 1), float32 scalar.

    Args:
      updates: int scalar t, the count of EMA updates including this one.
      profile: "power" (uses ``sigma_rel``) or "warmup" (uses ``decay``); see the module doc.

    Raises:
      ValueError: an unknown or "none" profile, or a ``sigma_rel`` out of range.
    """
    t = jnp.asarray(updates, jnp.float32)
    if profile == "power":
        gamma = sigma_rel_to_gamma(sigma_rel)
        return jnp.power(1.0 - 1.0 / jnp.maximum(t, 1.0), gamma + 1.0)
    if profile == "warmup":
        return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
    raise ValueError(f"ema.profile {profile!r} has no decay; use one of {EMA_PROFILES[1:]}")


class EMACount(nnx.Variable):
    """The number of EMA updates applied so far (int32 scalar); not a parameter."""


class EMA(nnx.Module):
    """The EMA of ``model``'s parameters: ``weights`` is a model of the same structure.

    Args:
      model: the trained module (only ``nnx.Param`` leaves; copied at construction).
      cfg: an ``ema`` section (``profile``, ``decay``, ``sigma_rel``), see :func:`ema_decay`.

    Attributes:
      weights: the averaged model, usable as the model itself (e.g. for sampling).
      count: ``EMACount``, updates applied so far.
    """

    def __init__(self, model: nnx.Module, cfg: ml_collections.ConfigDict):
        self.weights = nnx.clone(model)
        # clone shares the arrays; the train step donates both copies, so they must be distinct
        nnx.update(self.weights, jax.tree.map(lambda x: x.copy(), nnx.state(model)))
        self.count = EMACount(jnp.zeros((), jnp.int32))
        # plain Python values: static parts of the module's graph
        self.profile, self.decay, self.sigma_rel = str(cfg.profile), float(cfg.decay), float(cfg.sigma_rel)
        ema_decay(1, self.profile, self.decay, self.sigma_rel)  # a bad profile fails here, not in jit

    def update(self, model: nnx.Module, apply: jax.Array | bool = True):
        """One EMA step towards ``model``'s current parameters (traceable under jit).

        ``apply`` False (e.g. a skipped non-finite optimizer step) leaves the average and the
        count unchanged, so the average only counts steps that moved the parameters.
        """
        count = self.count[...] + 1
        beta = ema_decay(count, self.profile, self.decay, self.sigma_rel)
        avg, params = nnx.state(self.weights, nnx.Param), nnx.state(model, nnx.Param)
        # beta e + (1 - beta) p, not e + (1 - beta)(p - e): the first update (beta = 0) is then
        # an exact copy of the parameters
        new = jax.tree.map(lambda e, p: jnp.where(apply, beta * e + (1.0 - beta) * p, e).astype(e.dtype),
                           avg, params)
        nnx.update(self.weights, new)
        self.count[...] = jnp.where(apply, count, self.count[...])
