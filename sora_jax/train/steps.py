"""Loss functions plugged into the one training loop: VAE reconstruction and DiT rectified flow."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from sora_jax.diffusion.flow import rectified_flow_loss
from sora_jax.models.vae_loss import vae_loss


def vae_loss_fn(loss_cfg: ml_collections.ConfigDict):
    """``(vae, {"video": (B, T, H, W, 3)}, key) -> (loss, metrics)``: L1 + L2 + KL (``vae_loss``)."""

    def loss_fn(model: nnx.Module, batch, key: jax.Array):
        recon, mean, logvar = model(batch["video"], key=key)
        return vae_loss(recon, batch["video"], mean, logvar, **loss_cfg.to_dict())

    return loss_fn


def dit_loss_fn(flow_cfg: ml_collections.ConfigDict):
    """``(dit, packed batch, key) -> (loss, metrics)``: rectified-flow velocity MSE on real tokens."""
    kwargs = flow_cfg.to_dict()

    def loss_fn(model: nnx.Module, batch, key: jax.Array):
        batch = dict(batch)
        dropped = batch.pop("num_dropped", None)
        loss, aux = rectified_flow_loss(model, batch, key, **kwargs)
        if dropped is not None:
            aux = dict(aux, num_dropped=dropped)
        return loss, aux

    return loss_fn
