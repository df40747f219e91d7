"""The module a VAE training run optimises and checkpoints: the autoencoder and, when the
adversarial term is on, its 3D patch discriminator (VQGAN-style training, Esser et al. 2021).

Keeping both in one ``nnx.Module`` lets the one training loop (``sora_jax.train.trainer``)
update them with one optimizer step and save them in one checkpoint, whose ``model`` item is
``{"vae": ..., "discriminator": ...}`` (no ``discriminator`` key when the GAN is off). Restore
a checkpoint into the same structure (``build_vae_train_model`` with the run's ``vae_loss``
config) and use ``.vae``.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from sora_jax.models.discriminator import PatchDiscriminator3d
from sora_jax.models.vae_loss import vae_loss_settings

__all__ = ["VAETrainModel", "build_vae_train_model"]


class VAETrainModel(nnx.Module):
    """An autoencoder and its optional discriminator, trained together.

    Args:
      vae: the autoencoder (``sora_jax.models.vae.CausalVAE``: ``vae(video, key=...) ->
        (recon, mean, logvar)`` and a ``decoder.conv_out.kernel`` last layer).
      discriminator: a ``PatchDiscriminator3d``, or None when the adversarial term is off.

    Not callable: the loss function (``sora_jax.train.steps.vae_loss_fn``) uses the parts.
    """

    def __init__(self, vae: nnx.Module, discriminator: nnx.Module | None = None):
        self.vae = vae
        self.discriminator = discriminator


def build_vae_train_model(vae: nnx.Module, loss_cfg: Mapping[str, Any] | Any,
                          rngs: nnx.Rngs) -> VAETrainModel:
    """Wraps ``vae`` with the discriminator its ``vae_loss`` config asks for.

    Args:
      vae: the autoencoder (its ``in_channels`` sets the discriminator's input channels).
      loss_cfg: the ``vae_loss`` config section (``ml_collections.ConfigDict`` or dict). Keys
        read: ``gan_weight`` (> 0 builds a discriminator; default 0), ``disc_channels``
        (default 64), ``disc_layers`` (default 3); see ``sora_jax.train.steps.vae_loss_fn``.
      rngs: ``nnx.Rngs`` for the discriminator's initialisation (``vae`` is used as is).

    Returns:
      ``VAETrainModel(vae, PatchDiscriminator3d or None)``.

    Raises:
      ValueError: a bad ``vae_loss`` section (``sora_jax.models.vae_loss.vae_loss_settings``: the
        one place its keys, defaults and checks live).
    """

    c = vae_loss_settings(loss_cfg)
    disc = None
    if c["gan_weight"] > 0:
        disc = PatchDiscriminator3d(
            in_channels=int(getattr(vae, "in_channels", 3)),
            channels=c["disc_channels"],
            num_layers=c["disc_layers"],
            rngs=rngs,
        )
    return VAETrainModel(vae, disc)
