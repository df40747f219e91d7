"""Segment-masked multi-head attention for packed sequences (NaViT, Dehghani et al. 2023).

A packed row holds several examples, told apart by segment ids (0 = padding). A query may
attend to a key only when both carry the same non-zero segment id, so examples packed in
one row never see each other and the result equals running each example alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BACKENDS = ("xla", "cudnn")


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                 kv_always_visible: jax.Array | None = None) -> jax.Array:
    """Boolean attention mask (B, Lq, Lk) of packed segments.

    mask[b, i, j] = (q_seg[b, i] == kv_seg[b, j] or kv_always_visible[b, j]) and
    q_seg[b, i] != 0. Padding queries (segment 0) see nothing; padding keys (segment 0)
    are seen by no real query.
    """
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_always_visible is not None:
        mask = mask | kv_always_visible.astype(bool)[:, None, :]
    return mask & (q_segment_ids != 0)[:, :, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                          kv_always_visible: jax.Array | None = None,
                          backend: str = "xla", scale: float | None = None) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T * scale + mask) v over packed segments.

    Args:
      q: (B, Lq, H, Dh) queries.
      k, v: (B, Lk, H, Dh) keys and values.
      q_segment_ids: (B, Lq) int, 0 = padding.
      kv_segment_ids: (B, Lk) int, 0 = padding.
      kv_always_visible: optional (B, Lk) bool; such keys are visible to every non-padding
        query whatever its segment (the learned null text token of cross-attention, which
        gives a token whose segment has no text a defined output).
      backend: ``"xla"``: explicit einsum and masked softmax in float32; runs anywhere and
        is the reference. ``"cudnn"``: ``jax.nn.dot_product_attention(implementation=
        "cudnn")`` (fused flash attention), GPU only; q/k/v are cast to bfloat16 there
        (cuDNN supports only fp16/bf16) and the mask is passed as an additive bias.
      scale: logit scale; default 1/sqrt(Dh).

    Returns:
      (B, Lq, H, Dh) array in q's dtype. Rows of queries that may attend to nothing
      (padding, segment 0) are exactly 0, never NaN.

    Raises:
      ValueError: unknown backend or mismatched shapes.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {_BACKENDS}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, Lq, H, Dh), k/v (B, Lk, H, Dh); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
        raise ValueError(f"segment ids {q_segment_ids.shape}/{kv_segment_ids.shape} do not "
                         f"match q {q.shape[:2]} / k {k.shape[:2]}")
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    mask = segment_mask(q_segment_ids, kv_segment_ids, kv_always_visible)  # (B, Lq, Lk)
    has_any = jnp.any(mask, axis=-1)  # (B, Lq)

    if backend == "cudnn":
        dt = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        # A finite bias (not -inf) keeps fully-masked rows finite inside the kernel; those
        # rows are zeroed below anyway.
        bias = jnp.where(mask, 0.0, float(jnp.finfo(dt).min) / 2).astype(dt)[:, None]
        out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt),
                                           bias=bias, scale=scale, implementation="cudnn")
        return jnp.where(has_any[:, :, None, None], out, 0).astype(q.dtype)

    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = jnp.where(mask[:, None], logits * scale, -jnp.inf)
    # The row max is a constant shift: no gradient through it, and 0 for empty rows so
    # exp(-inf - 0) = 0 there instead of NaN.
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype)
