"""Parameter count and FLOPs per token of a config's DiT, without training (``sora-jax model-info``).

Parameters are counted on the abstract model (``nnx.eval_shape``: no memory) and in closed
form (:func:`sora_jax.models.dit.dit_param_count_analytic`); FLOPs per token are analytic
(:func:`sora_jax.models.dit.dit_flops_per_token`, matmuls only) and, with ``xla=True``,
cross-checked with XLA's cost analysis of the compiled forward pass on abstract inputs
(compiling needs no device memory for the weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax.models.dit import dit_flops_per_token, dit_param_count_analytic
from sora_jax.models.factory import build_dit, dit_in_dim, dit_out_dim, latent_shape
from sora_jax.models.image_context import CLIP_IMAGE_TOKENS


def _tokens(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    if cfg.model_info.latent:
        t, h, w = cfg.model_info.latent
    else:
        t, h, w, _ = latent_shape(cfg, cfg.sample.frames, cfg.sample.height, cfg.sample.width)
    pt, ph, pw = cfg.dit.patch
    return (t // pt) * (h // ph) * (w // pw), int(cfg.text.max_length)


def xla_forward_flops(cfg: ml_collections.ConfigDict, seq_len: int, text_len: int) -> float:
    """FLOPs of one forward pass on a (1, seq_len) row, from XLA's cost analysis.

    Compiled with dense attention, no remat, unrolled layers and per-token conditioning:
    XLA counts a loop body once, so a layer scan or the block-sparse backend's loops would
    hide most FLOPs, and it counts both branches of the grouped conditioning's ``cond``.

    Raises:
      RuntimeError: the backend reports no cost analysis.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.dit.attention_backend, cfg.dit.remat, cfg.dit.scan_layers = "xla", False, False
    cfg.dit.condition_groups = 0
    model = nnx.eval_shape(lambda: build_dit(cfg))
    graphdef, state = nnx.split(model)
    d = cfg.dit
    in_dim = model.in_dim

    image_len = (d.get("image_pos_len") or CLIP_IMAGE_TOKENS) if d.get("image_dim") else 0

    def forward(state, tokens, seg, pos, t, text, tseg, labels, image):
        m = nnx.merge(graphdef, state)
        if d.num_classes:
            return m(tokens, seg, pos, t, labels=labels)
        if image is not None:
            return m(tokens, seg, pos, t, text, tseg, image=image,
                     image_segment_ids=jnp.ones((1, image_len), jnp.int32))
        return m(tokens, seg, pos, t, text, tseg)

    S = jax.ShapeDtypeStruct
    args = (state, S((1, seq_len, in_dim), jnp.float32), S((1, seq_len), jnp.int32),
            S((1, seq_len, 3), jnp.int32), S((1, seq_len), jnp.float32),
            S((1, text_len, d.text_dim), jnp.float32), S((1, text_len), jnp.int32),
            S((1, seq_len), jnp.int32), S((1, image_len, d.image_dim), jnp.float32) if image_len else None)
    flops = compiled_flops(jax.jit(forward).lower(*args).compile())
    if flops is None:
        raise RuntimeError("this backend reports no XLA cost analysis")
    return flops


def model_info(cfg: ml_collections.ConfigDict, *, xla: bool = False,
               seq_len: int | None = None) -> dict[str, Any]:
    """Size and cost of ``cfg``'s DiT.

    The row is ``seq_len`` tokens, or ``cfg.model_info.latent`` = (t, h, w) latent frames
    (default: the latent of ``cfg.sample``'s video) patchified by ``cfg.dit.patch``.

    Returns:
      ``params`` (counted), ``params_analytic``, ``flops_per_token`` (analytic forward FLOPs
      per latent token at ``seq_len``, 2 per multiply-add; the row is one example at one
      timestep, so with ``dit.condition_groups`` its conditioning runs once),
      ``train_flops_per_token`` (3x: forward + backward; remat's recomputation is not model
      FLOPs), ``seq_len``, ``text_len``, the shape, and with ``xla`` ``flops_per_token_xla``
      and ``xla_over_analytic`` (against the per-token analytic count, which XLA compiles).
    """
    d = cfg.dit
    in_dim = dit_in_dim(cfg)
    tokens, text_len = _tokens(cfg)
    seq_len = seq_len or tokens
    model = nnx.eval_shape(lambda: build_dit(cfg))
    params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    kw = {k: d[k] for k in ("hidden_size", "depth", "num_heads")}
    kw.update(mlp_ratio=d.mlp_ratio, text_dim=d.text_dim, adaln=d.adaln)
    wan_options = {k: d[k] for k in ("text_null_token", "pooled_text", "final_modulation", "context_flag",
                                     "image_dim", "image_pos_len") if k in d}
    out_dim = dit_out_dim(cfg)
    analytic = dit_param_count_analytic(in_dim=in_dim, qk_norm=d.qk_norm, out_dim=out_dim,
                                        num_classes=d.num_classes, **kw, **wan_options)
    kw.pop("num_heads")
    image = {}
    if d.get("image_dim"):  # CLIP states per example: the position table's length, else one image's
        image = dict(image_dim=d.image_dim, image_len=d.get("image_pos_len") or CLIP_IMAGE_TOKENS)
    flops_kw = dict(in_dim=in_dim, out_dim=out_dim, seq_len=seq_len, text_len=text_len,
                    cross_attention=not d.num_classes, **kw, **image)
    flops = dit_flops_per_token(condition_groups=d.get("condition_groups", 0), **flops_kw)
    info = {"name": cfg.name, "params": params, "params_analytic": analytic,
            "flops_per_token": flops, "train_flops_per_token": 3 * flops, "seq_len": seq_len,
            "text_len": text_len, "in_dim": in_dim, "hidden_size": d.hidden_size, "depth": d.depth,
            "num_heads": d.num_heads, "num_classes": int(d.num_classes), "adaln": d.adaln}
    if xla:
        per_token = xla_forward_flops(cfg, seq_len, text_len) / seq_len
        info.update(flops_per_token_xla=per_token,
                    xla_over_analytic=per_token / dit_flops_per_token(condition_groups=0, **flops_kw))
    return info


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA counts for one run of a compiled program (per device), or None where the
    backend reports none. A loop body is counted once, whatever its trip count."""
    cost = compiled.cost_analysis()
    return float(cost["flops"]) if cost and "flops" in cost else None
