"""Loss functions plugged into the one training loop: VAE reconstruction and DiT rectified flow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    """``(dit, packed batch, key) -> (loss, metrics)``: rectified-flow velocity MSE on real tokens.

    Metrics add the packing quality of the batch: ``padding_fraction`` (share of latent slots
    that are padding) and ``examples_per_row`` (segments per row; ids are 1..k in a row).
    """
    kwargs = flow_cfg.to_dict()

    def loss_fn(model: nnx.Module, batch, key: jax.Array):
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
