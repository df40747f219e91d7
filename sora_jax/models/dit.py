"""Diffusion transformer (DiT) over packed spacetime-patch tokens.

Architecture (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", with the
text cross-attention of PixArt-alpha / Wan 2.1 and the 3D RoPE + QK-norm of Open-Sora 2.0):

  tokens (B, L, in_dim) --Linear--> x (B, L, hidden)
  c = TimestepMLP(sinusoid(1000 t)) + Linear(mean of the segment's text)   (B, L, hidden)
  depth x block:
      x += gate1 * SelfAttn(modulate(LN(x), shift1, scale1))     RMS QK-norm, 3D RoPE,
                                                                  segment mask
      x += CrossAttn(LN_affine(x), text)                         same-segment text + null
      x += gate2 * MLP(modulate(LN(x), shift2, scale2))
      (shift, scale, gate) x 2 = Linear_zero(SiLU(c))            adaLN-Zero, per token
                                 (adaln="single": one shared Linear_zero(SiLU(c)) + a
                                  learned per-block table, PixArt-alpha's adaLN-single)
  out = Linear_zero(modulate(LN(x), shift, scale))               (B, L, in_dim) velocity

Everything but attention acts per token, and attention is masked to the token's own
segment (NaViT, Dehghani et al. 2023), so a packed row computes exactly what each of its
examples would alone. Timesteps are per token, so conditioning frames (t = 0) and noisy
frames can share a sequence. c and its adaLN Linears depend on a token only through its
(segment, timestep), so they are computed once per distinct value of a row and gathered
(``condition_groups``, :mod:`sora_jax.models.condition_groups`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.condition_groups import DEFAULT_MAX_GROUPS, GroupedConditioning
from sora_jax.models.context_parallel import attention as context_attention
from sora_jax.models.image_context import ImageEmbedder
from sora_jax.models.mup import (PARAMETERIZATIONS, attention_query_scale, output_multiplier, rescale_init,
                                 width_multiplier)
from sora_jax.parallel.axes import BATCH, EMBED, HEADS, IN_FEATURES, LAYERS, LENGTH, MLP as MLP_AXIS, NORM
from sora_jax.parallel.sharding import constrain, partitioned
from sora_jax.models.layers import (MLP, AdaLNModulation, RMSNorm, TimestepEmbedder,
                                    apply_rope, default_rope_axes_dims, dense, layer_norm,
                                    modulate, rope_cos_sin, sincos_3d)


QK_NORMS = (True, False, "per_head", "across_heads")


def qk_norm_scope(qk_norm: bool | str) -> str | None:
    """The QK-norm setting as "per_head" (RMS over each head's features, one (Dh,) scale:
    Dehghani et al. 2023, Open-Sora 2.0), "across_heads" (RMS over all heads' features at once,
    one (heads * Dh,) scale: Wan 2.1) or None (off); True means "per_head".

    Raises:
      ValueError: any other value.
    """
    if qk_norm is True or qk_norm == "per_head":
        return "per_head"
    if qk_norm is False or qk_norm is None:
        return None
    if qk_norm == "across_heads":
        return "across_heads"
    raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")


def _qk_norms(qk_norm: bool | str, hidden_size: int, head_dim: int):
    scope = qk_norm_scope(qk_norm)
    if scope is None:
        return None, None
    dim = head_dim if scope == "per_head" else hidden_size
    return RMSNorm(dim), RMSNorm(dim)


def _qk_normalize(norm: RMSNorm, x: jax.Array) -> jax.Array:
    # x (B, L, H, Dh); an across-heads norm sees the heads' features as one vector
    if norm.scale.shape[0] == x.shape[-1]:
        return norm(x)
    return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with RMS QK-norm and 3D RoPE over packed segments.

    Call: x (B, L, hidden), cos/sin (B, L, Dh), segment_ids (B, L) -> (B, L, hidden).

    ``query_scale``: None (SP), or a factor on the queries after QK-norm and RoPE, i.e. on the
    logits (μP's 1/d_head attention, :mod:`sora_jax.models.mup`).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, qk_norm: bool | str = True,
                 backend: str = "xla", query_scale: float | None = None, rngs: nnx.Rngs, dtype=None):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.query_scale = query_scale
        self.qkv = dense(hidden_size, 3 * hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
        self.proj = dense(hidden_size, hidden_size, dtype=dtype, rngs=rngs, axes=(HEADS, EMBED))
        self.q_norm, self.k_norm = _qk_norms(qk_norm, hidden_size, self.head_dim)

    def __call__(self, x, cos, sin, segment_ids):
        b, l, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3 * self.num_heads, self.head_dim), 3,
                            axis=2)
        if self.q_norm is not None:
            q, k = _qk_normalize(self.q_norm, q), _qk_normalize(self.k_norm, k)
        # RoPE after the norm (as Flux / SD3.5): the norm would otherwise rescale the
        # rotated pairs and the rotation must act on what enters the dot product.
        if cos is not None:  # None: absolute sin-cos positions were added to the input instead
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.query_scale is not None:  # μP
            q = q * self.query_scale
        o = context_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                              gather_kv=True, backend=self.backend)
        return self.proj(o.reshape(b, l, -1))


class CrossAttention(nnx.Module):
    """Cross-attention from latent tokens to the text tokens of their own segment.

    One learned null token (in model width, projected by the same k/v maps and k-norm as
    real text) is visible to every query. Without it, a token whose segment has no text
    (caption dropout; the unconditional branch of classifier-free guidance, Ho & Salimans
    2022) would have an empty softmax; with it, "no text" is a learned, defined state.

    With ``image_context`` (Wan 2.1 I2V), a second key/value set over image-encoder tokens
    (already at model width, :class:`~sora_jax.models.image_context.ImageEmbedder`) is
    attended with the same queries, its keys RMS-normed as the text keys, and the two
    attention outputs are summed before the output projection.

    Call: x (B, L, hidden), text (B, Lt, hidden), segment_ids (B, L),
    text_segment_ids (B, Lt), and with ``image_context`` image (B, Li, hidden),
    image_segment_ids (B, Li) -> (B, L, hidden).

    ``query_scale``: as :class:`SelfAttention`'s (μP), for the text and image logits alike.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, qk_norm: bool | str = True,
                 null_token: bool = True, image_context: bool = False, backend: str = "xla",
                 query_scale: float | None = None, rngs: nnx.Rngs, dtype=None):
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.query_scale = query_scale
        self.q = dense(hidden_size, hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
        self.kv = dense(hidden_size, 2 * hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
        self.proj = dense(hidden_size, hidden_size, dtype=dtype, rngs=rngs, axes=(HEADS, EMBED))
        self.q_norm, self.k_norm = _qk_norms(qk_norm, hidden_size, self.head_dim)
        self.null_token = nnx.Param(
            partitioned(nnx.initializers.normal(0.02), (NORM,))(rngs.params(), (hidden_size,), jnp.float32)
        ) if null_token else None
        if image_context:
            self.image_kv = dense(hidden_size, 2 * hidden_size, dtype=dtype, rngs=rngs, axes=(EMBED, HEADS))
            self.image_k_norm = _qk_norms(qk_norm, hidden_size, self.head_dim)[1]
        else:
            self.image_kv = self.image_k_norm = None

    def __call__(self, x, text, segment_ids, text_segment_ids, image=None, image_segment_ids=None):
        b, l, _ = x.shape
        if self.null_token is not None:
            null = jnp.broadcast_to(self.null_token[...].astype(text.dtype), (b, 1, text.shape[-1]))
            ctx = jnp.concatenate([null, text], axis=1)  # (B, 1 + Lt, hidden)
            kv_seg = jnp.concatenate([jnp.zeros((b, 1), text_segment_ids.dtype), text_segment_ids], axis=1)
            always = jnp.zeros((b, ctx.shape[1]), bool).at[:, 0].set(True)
        else:  # Wan 2.1: every query's segment must have text (the empty prompt's, for CFG)
            ctx, kv_seg, always = text, text_segment_ids, None
        lk = ctx.shape[1]
        q = self.q(x).reshape(b, l, self.num_heads, self.head_dim)
        k, v = jnp.split(self.kv(ctx).reshape(b, lk, 2 * self.num_heads, self.head_dim), 2,
                         axis=2)
        if self.q_norm is not None:
            q, k = _qk_normalize(self.q_norm, q), _qk_normalize(self.k_norm, k)
        if self.query_scale is not None:  # μP
            q = q * self.query_scale
        o = context_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
                              kv_always_visible=always, gather_kv=False, backend=self.backend)
        if self.image_kv is not None:
            li = image.shape[1]
            ki, vi = jnp.split(self.image_kv(image).reshape(b, li, 2 * self.num_heads, self.head_dim), 2, axis=2)
            if self.image_k_norm is not None:
                ki = _qk_normalize(self.image_k_norm, ki)
            o = o + context_attention(q, ki, vi, q_segment_ids=segment_ids, kv_segment_ids=image_segment_ids,
                                      gather_kv=False, backend=self.backend)
        return self.proj(o.reshape(b, l, -1))


class DiTBlock(nnx.Module):
    """One adaLN-Zero transformer block with self-attention, cross-attention and MLP.

    The cross-attention residual is ungated (as PixArt-alpha): text must influence the
    output from step 0, and the block still starts as the identity on the self-attention
    and MLP branches, whose gates are zero-initialised (Peebles & Xie 2023 §3.2).

    Call: x (B, L, hidden), c, cos/sin (B, L, Dh), segment_ids (B, L), text (B, Lt, hidden),
    text_segment_ids (B, Lt), and with ``image_context`` image (B, Li, hidden),
    image_segment_ids (B, Li) -> (B, L, hidden). c is the conditioning vector (B, L, hidden)
    or a :class:`~sora_jax.models.condition_groups.GroupedConditioning` (the modulation is
    then computed per group). With ``shared_adaln``, c is instead the shared modulation
    (B, L, 6 * hidden), to which the block adds its own learned (6, hidden) table
    (zero-initialised, so gates start at 0). ``query_scale``: the attentions' (μP; None: SP).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 qk_norm: bool | str = True, cross_attention: bool = True, backend: str = "xla",
                 shared_adaln: bool = False, text_null_token: bool = True, image_context: bool = False,
                 query_scale: float | None = None, rngs: nnx.Rngs, dtype=None):
        self.norm1 = layer_norm(hidden_size, affine=False, rngs=rngs, dtype=dtype)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, backend=backend,
                                  query_scale=query_scale, rngs=rngs, dtype=dtype)
        if cross_attention:  # off in the class-conditional DiT of Peebles & Xie
            self.norm_cross = layer_norm(hidden_size, affine=True, rngs=rngs, dtype=dtype)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm,
                                             null_token=text_null_token, image_context=image_context,
                                             backend=backend, query_scale=query_scale, rngs=rngs, dtype=dtype)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = layer_norm(hidden_size, affine=False, rngs=rngs, dtype=dtype)
        self.mlp = MLP(hidden_size, mlp_width(hidden_size, mlp_ratio), rngs=rngs, dtype=dtype)
        if shared_adaln:
            self.adaln = None
            self.modulation = nnx.Param(
                partitioned(nnx.initializers.zeros, (None, NORM))(rngs.params(), (6, hidden_size), jnp.float32))
        else:
            self.adaln = AdaLNModulation(hidden_size, hidden_size, 6, rngs=rngs, dtype=dtype)
            self.modulation = None

    def __call__(self, x, c, cos, sin, segment_ids, text, text_segment_ids, image=None, image_segment_ids=None):
        if self.adaln is not None:
            mod = (c.apply(self.adaln.project) if isinstance(c, GroupedConditioning)
                   else self.adaln.project(c))
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        else:
            table = self.modulation[...].reshape(-1).astype(c.dtype)
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(c + table, 6, axis=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin,
                                  segment_ids)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text, segment_ids, text_segment_ids, image,
                                    image_segment_ids)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


def mlp_width(hidden_size: int, mlp_ratio: float) -> int:
    """MLP hidden width: round(hidden * ratio), so ratios such as Wan's 8960 / 1536 are exact."""
    return int(round(hidden_size * mlp_ratio))


def _apply_block(block: DiTBlock, *args):
    # Module-level function: nnx.remat refuses bound methods.
    return block(*args)


ADALN_KINDS = ("per_block", "single")  # DiT's adaLN-Zero per block; PixArt-alpha's adaLN-single
POS_EMBEDS = ("rope", "sincos")  # 3D RoPE; the class-conditional DiT's fixed sin-cos table

# Activation checkpointing policies (``jax.checkpoint_policies``) by config name: what each
# block keeps from its forward pass for the backward; everything else is recomputed.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,  # remat in name only
}


FINAL_MODULATIONS = ("linear", "table")


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then Linear(hidden -> out_dim); both zero-initialised, so a
    fresh model predicts exactly 0 (DiT).

    ``modulation="linear"``: (shift, scale) = Linear_zero(SiLU(c)) (DiT). ``"table"``:
    (shift, scale) = a learned (2, hidden) table + c, with no Linear (Wan 2.1's output head,
    whose c is the timestep embedding).

    ``output_multiplier``: None (SP), or a factor on the Linear's input, so on its kernel's
    contribution and not its bias's (μP's 1/m output multiplier, as ``mup``'s MuReadout).
    """

    def __init__(self, hidden_size: int, out_dim: int, *, modulation: str = "linear",
                 output_multiplier: float | None = None, rngs: nnx.Rngs, dtype=None):
        if modulation not in FINAL_MODULATIONS:
            raise ValueError(f"final modulation must be one of {FINAL_MODULATIONS}, got {modulation!r}")
        self.output_multiplier = output_multiplier
        self.norm = layer_norm(hidden_size, affine=False, rngs=rngs, dtype=dtype)
        if modulation == "linear":
            self.adaln = AdaLNModulation(hidden_size, hidden_size, 2, rngs=rngs, dtype=dtype)
            self.table = None
        else:
            self.adaln = None
            self.table = nnx.Param(
                partitioned(nnx.initializers.zeros, (None, NORM))(rngs.params(), (2, hidden_size), jnp.float32))
        self.linear = dense(hidden_size, out_dim, zero=True, dtype=dtype, rngs=rngs,
                            axes=(EMBED, IN_FEATURES))

    def _project(self, c):
        if self.adaln is not None:
            return self.adaln.project(c)
        # rows (shift, scale) of the table, each plus c: (..., 2 * hidden) like the Linear's
        return jnp.concatenate([c, c], axis=-1) + self.table[...].reshape(-1).astype(c.dtype)

    def __call__(self, x, c):
        """x (B, L, hidden); c (B, L, hidden) or a GroupedConditioning -> (B, L, out_dim)."""
        mod = c.apply(self._project) if isinstance(c, GroupedConditioning) else self._project(c)
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(self.norm(x), shift, scale)
        if self.output_multiplier is not None:  # μP
            h = h * self.output_multiplier
        return self.linear(h)


def segment_mean_text(text: jax.Array, segment_ids: jax.Array,
                      text_segment_ids: jax.Array) -> jax.Array:
    """Mean of each token's own-segment text tokens.

    Args:
      text: (B, Lt, D) text states.
      segment_ids: (B, L) latent segment ids (0 = padding).
      text_segment_ids: (B, Lt) text segment ids (0 = padding or dropped).

    Returns:
      (B, L, D) float: for token (b, i) the mean of text[b, j] over j with
      text_segment_ids[b, j] == segment_ids[b, i] != 0; zeros when there is no such j.
    """
    match = ((segment_ids[:, :, None] == text_segment_ids[:, None, :])
             & (segment_ids != 0)[:, :, None]).astype(text.dtype)  # (B, L, Lt)
    count = jnp.sum(match, axis=-1, keepdims=True)
    w = match / jnp.maximum(count, 1.0)
    return jnp.einsum("blj,bjd->bld", w, text)


class DiT(nnx.Module):
    """Diffusion transformer predicting rectified-flow velocity for packed tokens.

    Args:
      in_dim: input token width pt*ph*pw*c.
      out_dim: output (velocity) token width; None: ``in_dim``. Wan 2.1 I2V takes 36 channels
        (16 noisy latent, 4 mask, 16 first-frame latent) and predicts 16.
      hidden_size, depth, num_heads, mlp_ratio: transformer shape.
      text_dim: width of the text-encoder states (384 for all-MiniLM-L6-v2).
      qk_norm: RMS-normalise queries and keys per head (learned scale).
      rope_axes_dims: split of head_dim over RoPE axes (t, h, w); default
        :func:`default_rope_axes_dims`.
      rope_theta: RoPE base.
      attention_backend: "xla" (dense reference), "chunked" (block-sparse flash attention
        in JAX, any device), "cudnn" (GPU), "splash" (TPU Pallas) or "auto" (chosen per
        device and length; see :mod:`sora_jax.models.attention`).
      remat: rematerialise each block in the backward pass (``nnx.remat``): less
        activation memory, about one extra forward of compute.
      remat_policy: what a rematerialised block keeps (:data:`REMAT_POLICIES`).
      scan_layers: stack the blocks' parameters on a leading ``layers`` axis and run them
        with ``nnx.scan`` (MaxText's scan_layers): compile time independent of depth, and
        remat that bounds memory (see the comment in ``__init__``). Checkpoints of scanned
        and unrolled models are not interchangeable.
      dtype: compute dtype of the linears (None: float32 here); params are float32 and
        the output is always cast to float32.
      num_classes: 0 (default): text-conditioned. > 0: the class-conditional DiT of Peebles &
        Xie 2023 (scaling-law sweeps, the DiT-S/B/L/XL table): a label embedding of
        ``num_classes + 1`` rows (the last is the CFG null class) added to the timestep
        embedding, and no cross-attention or text projections.
      pos_embed: "rope" (3D RoPE in every self-attention) or "sincos" (fixed 3D sin-cos
        positions added to the patch embedding, as the DiT paper's 2D ones).
      adaln: "per_block" (adaLN-Zero of Peebles & Xie: each block maps c to its 6
        modulations with its own Linear, 6 h^2 parameters per block) or "single"
        (adaLN-single of PixArt-alpha, Chen et al. 2023 §2.3, as Wan 2.1's shared timestep
        MLP: one Linear_zero(SiLU(c)) -> 6 h for all blocks, plus a learned (6, h) table per
        block; zero-initialised, so every block still starts as the identity).
      condition_groups: K > 0: the conditioning vector and its adaLN modulations are computed
        once per distinct (segment, timestep, label) of a row, up to K of them, and gathered
        to the tokens (:mod:`sora_jax.models.condition_groups`; a row with more falls back to
        per token, exactly); 0: per token. Same parameters and results either way.
      qk_norm: True / "per_head" (one RMS norm per head), "across_heads" (one RMS norm over
        all heads' features, Wan 2.1's ``rms_norm_across_heads``) or False.
      text_null_token: cross-attention sees a learned null token besides the segment's text
        (our default: a segment without text, the CFG unconditional branch, has a defined
        state). False (Wan 2.1): cross-attention sees the segment's text tokens only, so every
        segment needs text, e.g. the encoded empty or negative prompt.
      pooled_text: add Linear(mean of the segment's text states) to c (our default); False
        (Wan 2.1): c is the timestep embedding alone.
      final_modulation: the output head's (shift, scale): "linear" (Linear_zero(SiLU(c)), DiT)
        or "table" (a learned (2, h) table + c, Wan 2.1).
      context_flag: a learned embedding added to clean context tokens (``cond_mask``; our
        image / video prompts). False: none (Wan 2.1, whose I2V conditions otherwise); context
        tokens are then told apart by their t = 0 alone.
      image_dim: None, or the width of image-encoder states (Wan 2.1 I2V / FLF2V: CLIP
        ViT-H/14's 1280): an :class:`~sora_jax.models.image_context.ImageEmbedder` maps them to
        model width and every cross-attention attends them with a second key/value set.
      image_pos_len: with ``image_dim``, None or the image tokens per example, which then get a
        learned position table (FLF2V: 2 x 257).
      parameterization: "sp" (standard: the default) or "mup" (μP, Adam variant,
        :mod:`sora_jax.models.mup`: the initialisation is rescaled after construction, the
        attention logits get 1/sqrt(m) and the output layer's input 1/m, m = hidden_size /
        ``mup_base_width``; the per-parameter learning rates come from
        :func:`sora_jax.models.mup.lr_multipliers`). Under "sp" nothing of μP is applied.
      mup_base_width: the width at which μP equals SP (required with "mup"; ignored with "sp").
      mup_base_head_dim: the base model's head dimension (μP's attention factor
        sqrt(mup_base_head_dim / head_dim)); None = the base model has the same heads, so its
        head dimension is head_dim / m and the factor 1/sqrt(m). A family that widens by adding
        heads of a fixed dimension sets it to that dimension (the factor is then 1).
      rngs: NNX random streams.

    Wan 2.1's transformer (diffusers ``WanTransformer3DModel``) is this class with
    ``adaln="single"``, ``qk_norm="across_heads"``, ``text_null_token=False``,
    ``pooled_text=False``, ``final_modulation="table"``, its RoPE split
    (``rope_axes_dims`` = d - 4(d // 6), 2(d // 6), 2(d // 6)) and text_dim 4096. Its RoPE
    rotates interleaved pairs where ours rotates halves; the two are the same function up to a
    fixed permutation of each head's query / key features, which the weight import applies
    (:mod:`sora_jax.models.wan_dit`), so no separate RoPE is needed. Wan has no context flag
    (``context_flag=False``).

    Text conditioning: text states are mapped to model width by an MLP (PixArt-alpha's
    caption projection) for cross-attention, and, as a cheap global signal, the mean of the
    raw text states of the token's own segment is projected by a Linear and added to the
    timestep embedding c (zero when the segment has no text, i.e. dropped captions and the
    CFG unconditional branch see only the timestep).

    Raises:
      ValueError: if hidden_size % num_heads != 0, the RoPE split does not sum to the
        head dimension, image context is asked of a class-conditional model, or the
        parameterization is unknown ("mup" without a positive integer ``mup_base_width``).
    """

    def __init__(self, *, in_dim: int, hidden_size: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, text_dim: int = 384, qk_norm: bool = True,
                 rope_axes_dims: Sequence[int] | None = None, rope_theta: float = 10000.0,
                 attention_backend: str = "xla", remat: bool = False, dtype=None,
                 num_classes: int = 0, pos_embed: str = "rope", scan_layers: bool = False,
                 remat_policy: str = "nothing_saveable", adaln: str = "per_block",
                 condition_groups: int = DEFAULT_MAX_GROUPS, text_null_token: bool = True,
                 pooled_text: bool = True, final_modulation: str = "linear", context_flag: bool = True,
                 out_dim: int | None = None, image_dim: int | None = None, image_pos_len: int | None = None,
                 parameterization: str = "sp", mup_base_width: int | None = None,
                 mup_base_head_dim: int | None = None, rngs: nnx.Rngs):
        if condition_groups < 0:
            raise ValueError(f"condition_groups must be >= 0, got {condition_groups}")
        if adaln not in ADALN_KINDS:
            raise ValueError(f"adaln must be one of {ADALN_KINDS}, got {adaln!r}")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        qk_norm_scope(qk_norm)  # raises on an unknown setting
        if image_dim and num_classes:
            raise ValueError("image context (image_dim) needs a text-conditioned DiT (num_classes 0)")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        mup = parameterization == "mup"
        # μP's width multiplier m (1.0 under SP, where it is not used)
        self.parameterization = parameterization
        self.mup_width_mult = width_multiplier(hidden_size, mup_base_width) if mup else 1.0
        head_dim = hidden_size // num_heads
        query_scale = attention_query_scale(self.mup_width_mult, head_dim, mup_base_head_dim) if mup else None
        axes = tuple(rope_axes_dims) if rope_axes_dims is not None else default_rope_axes_dims(head_dim)
        if len(axes) != 3 or sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(f"rope_axes_dims {axes} must be 3 even ints summing to "
                             f"head_dim {head_dim}")
        self.in_dim, self.hidden_size, self.depth = in_dim, hidden_size, depth
        self.out_dim = out_dim or in_dim
        self.num_heads, self.text_dim = num_heads, text_dim
        self.rope_axes_dims, self.rope_theta = axes, rope_theta
        self.remat, self.remat_policy, self.scan_layers = remat, remat_policy, scan_layers
        self.num_classes, self.pos_embed, self.adaln = num_classes, pos_embed, adaln
        self.condition_groups = condition_groups
        self.x_embed = dense(in_dim, hidden_size, dtype=dtype, rngs=rngs, axes=(IN_FEATURES, EMBED))
        # Added to the embedding of clean context tokens (sora_jax.diffusion.conditioning): t = 0
        # alone would not tell a given frame from a fully denoised guess of the model's own.
        self.cond_embed = nnx.Param(
            partitioned(nnx.initializers.normal(0.02), (NORM,))(rngs.params(), (hidden_size,), jnp.float32)
        ) if context_flag else None
        self.t_embed = TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)
        if num_classes:
            self.label_embed = nnx.Embed(
                num_classes + 1, hidden_size, rngs=rngs,
                embedding_init=partitioned(nnx.initializers.normal(0.02), (None, EMBED)))
            self.text_embed = self.pooled_text_embed = None
        else:
            self.label_embed = None
            self.text_embed = MLP(text_dim, hidden_size, out_dim=hidden_size, rngs=rngs,
                                  dtype=dtype, in_axis=IN_FEATURES)
            self.pooled_text_embed = dense(text_dim, hidden_size, dtype=dtype, rngs=rngs,
                                           axes=(IN_FEATURES, EMBED)) if pooled_text else None
        self.image_embed = (ImageEmbedder(image_dim, hidden_size, pos_len=image_pos_len, rngs=rngs, dtype=dtype)
                            if image_dim else None)

        def make_block(rngs):
            return DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                            cross_attention=not num_classes, backend=attention_backend,
                            shared_adaln=adaln == "single", text_null_token=text_null_token,
                            image_context=bool(image_dim), query_scale=query_scale, rngs=rngs, dtype=dtype)

        # adaLN-single: the one Linear every block's modulation comes from (zero: gates start at 0)
        self.t_modulation = (dense(hidden_size, 6 * hidden_size, zero=True, dtype=dtype, rngs=rngs,
                                   axes=(EMBED, MLP_AXIS)) if adaln == "single" else None)

        if scan_layers:
            # One block whose parameters carry a leading (depth,) axis, run with nnx.scan: the
            # step compiles once whatever the depth, and with remat the backward keeps only
            # each layer's input (an unrolled loop lets XLA hoist recomputation and keep all).
            self.blocks = nnx.split_rngs(splits=depth)(nnx.vmap(
                make_block, in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: LAYERS}))(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, self.out_dim, modulation=final_modulation,
                                output_multiplier=output_multiplier(self.mup_width_mult) if mup else None,
                                rngs=rngs, dtype=dtype)
        if mup:  # after construction: the SP initialisers above are untouched
            rescale_init(self, self.mup_width_mult)

    @classmethod
    def from_config(cls, cfg: Any, in_dim: int, rngs: nnx.Rngs, out_dim: int | None = None) -> "DiT":
        """Builds a DiT from the ``dit`` config section (a ConfigDict or mapping).

        Fields (all required; ``configs/quickstart.py`` documents them): hidden_size, depth,
        num_heads, mlp_ratio, qk_norm, text_dim, attention_backend, rope_axes_dims (None: the
        default split), rope_theta, remat, remat_policy, scan_layers, num_classes, pos_embed,
        adaln, dtype (compute dtype of the matmuls, e.g. "bfloat16"; parameters and optimizer
        state stay float32: mixed precision with fp32 master weights); condition_groups is
        optional (default :data:`~sora_jax.models.condition_groups.DEFAULT_MAX_GROUPS`; it
        changes no parameter, so configs saved before it existed still build); so are
        text_null_token, pooled_text, context_flag (default True) and final_modulation
        (default "linear"), which configs saved before the Wan options lack, image_dim,
        image_pos_len (default None; Wan 2.1 I2V), and parameterization / mup_base_width
        (default "sp" / None; μP, :mod:`sora_jax.models.mup`). ``out_dim``: the output token
        width when it differs from ``in_dim``.

        Raises:
          KeyError: a field is missing.
        """
        rope_axes = cfg["rope_axes_dims"]
        return cls(in_dim=in_dim, hidden_size=cfg["hidden_size"], depth=cfg["depth"],
                   num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                   text_dim=cfg["text_dim"], qk_norm=cfg["qk_norm"],
                   rope_axes_dims=tuple(rope_axes) if rope_axes else None,
                   rope_theta=cfg["rope_theta"], attention_backend=cfg["attention_backend"],
                   remat=cfg["remat"], num_classes=cfg["num_classes"],
                   pos_embed=cfg["pos_embed"], scan_layers=cfg["scan_layers"],
                   remat_policy=cfg["remat_policy"], adaln=cfg["adaln"],
                   condition_groups=cfg.get("condition_groups", DEFAULT_MAX_GROUPS),
                   text_null_token=cfg.get("text_null_token", True),
                   pooled_text=cfg.get("pooled_text", True),
                   final_modulation=cfg.get("final_modulation", "linear"),
                   context_flag=cfg.get("context_flag", True),
                   out_dim=out_dim, image_dim=cfg.get("image_dim"), image_pos_len=cfg.get("image_pos_len"),
                   parameterization=cfg.get("parameterization", "sp"), mup_base_width=cfg.get("mup_base_width"),
                   mup_base_head_dim=cfg.get("mup_base_head_dim"), dtype=jnp.dtype(cfg["dtype"]), rngs=rngs)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 timesteps: jax.Array, text: jax.Array | None = None,
                 text_segment_ids: jax.Array | None = None, cond_mask: jax.Array | None = None,
                 labels: jax.Array | None = None, image: jax.Array | None = None,
                 image_segment_ids: jax.Array | None = None) -> jax.Array:
        """Predicts velocity.

        Args:
          tokens: (B, L, in_dim) float, noisy latent patches x_t.
          segment_ids: (B, L) int32, 0 = padding.
          positions: (B, L, 3) int32 (t, h, w) patch-grid coordinates.
          timesteps: (B, L) float32 per-token flow time in [0, 1].
          text: (B, Lt, text_dim) float32 text-encoder states.
          text_segment_ids: (B, Lt) int32 segment of each text token; 0 = padding / no text.
          cond_mask: optional (B, L) bool, True on clean context tokens (image / video prompts,
            :mod:`sora_jax.diffusion.conditioning`); they get a learned flag embedding.
          labels: (B, L) int32 class of each token's example, ``num_classes`` = null class;
            class-conditional models only (which take no text).
          image: (B, Li, image_dim) float image-encoder states; models with ``image_dim`` only.
          image_segment_ids: (B, Li) int32 segment of each image token; 0 = padding.

        Raises:
          ValueError: text missing for a text-conditioned model, labels for a
            class-conditional one, or image states for a model with ``image_dim``.

        Returns:
          (B, L, out_dim) float32 velocity v = noise - x0. Padding tokens get finite values
          that carry no meaning.
        """
        x = self.x_embed(tokens)
        if cond_mask is not None and self.cond_embed is not None:
            x = x + cond_mask[..., None].astype(x.dtype) * self.cond_embed[...].astype(x.dtype)
        if self.num_classes:
            if labels is None:
                raise ValueError("a class-conditional DiT needs labels")
        elif text is None or text_segment_ids is None:
            raise ValueError("a text-conditioned DiT needs text and text_segment_ids")
        if self.image_embed is not None and (image is None or image_segment_ids is None):
            raise ValueError("this DiT has image context (image_dim): it needs image and image_segment_ids")

        def embed(seg, t, lab):  # the conditioning vector c of (segment, timestep, label) values
            c = self.t_embed(t)
            if self.num_classes:
                return c + self.label_embed(lab)
            if self.pooled_text_embed is None:
                return c
            return c + self.pooled_text_embed(segment_mean_text(text, seg, text_segment_ids))

        c = GroupedConditioning(embed, segment_ids, timesteps, labels if self.num_classes else None,
                                max_groups=self.condition_groups)
        ctx = None if self.num_classes else self.text_embed(text)
        # Block-boundary layouts (no-ops outside sora_jax.parallel.sharding.activate): rows over
        # the batch axes, tokens over context, features whole; text is small and whole per row.
        token_axes = (BATCH, LENGTH, None)
        x = constrain(x, token_axes)
        if ctx is not None:
            ctx = constrain(ctx, (BATCH, None, None))
        img = None if self.image_embed is None else constrain(self.image_embed(image), (BATCH, None, None))
        img_seg = None if img is None else image_segment_ids
        if self.pos_embed == "sincos":
            x = x + sincos_3d(positions, self.hidden_size).astype(x.dtype)
            cos = sin = None
        else:
            cos, sin = rope_cos_sin(positions, self.rope_axes_dims, self.rope_theta)
        # what the blocks modulate from: c itself, or (adaLN-single) its shared projection
        mod = c if self.t_modulation is None else constrain(
            c.apply(lambda c: self.t_modulation(jax.nn.silu(c))), token_axes)
        policy = REMAT_POLICIES[self.remat_policy]
        if self.scan_layers:
            def layer(x, block):
                return constrain(block(x, mod, cos, sin, segment_ids, ctx, text_segment_ids, img, img_seg),
                                 token_axes)

            if self.remat:
                layer = nnx.remat(layer, policy=policy)
            x = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                         transform_metadata={nnx.PARTITION_NAME: LAYERS})(x, self.blocks)
        else:
            for block in self.blocks:
                args = (x, mod, cos, sin, segment_ids, ctx, text_segment_ids, img, img_seg)
                x = (nnx.remat(_apply_block, policy=policy)(block, *args) if self.remat
                     else block(*args))
                x = constrain(x, token_axes)
        return self.final(x, c).astype(jnp.float32)


def dit_param_count(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param``) in ``model``."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def dit_param_count_analytic(*, in_dim: int, hidden_size: int, depth: int, num_heads: int,
                             mlp_ratio: float = 4.0, text_dim: int = 384, qk_norm: bool | str = True,
                             num_classes: int = 0, adaln: str = "per_block", text_null_token: bool = True,
                             pooled_text: bool = True, final_modulation: str = "linear",
                             context_flag: bool = True, out_dim: int | None = None, image_dim: int | None = None,
                             image_pos_len: int | None = None, **_unused) -> int:
    """Parameters of :class:`DiT` in closed form (equals :func:`dit_param_count` exactly).

    Per block: self-attention qkv + out (4h^2 + 4h), MLP (2hm + m + h), adaLN-Zero
    (6h^2 + 6h), QK-norm scales (2 h/heads per head, 2h across heads), and for text models
    cross-attention (4h^2 + 4h, a null token h, a LayerNorm 2h, QK-norm as above). Outside: patch
    embedding, context flag h, timestep MLP (256h + h^2 + 2h), final adaLN (2h^2 + 2h; a (2, h)
    table with ``final_modulation="table"``) and linear, plus the text projections (text models:
    the caption MLP, and the pooled-text Linear) or the (num_classes + 1) x h label table (class
    models). ``adaln="single"``: per block a (6, h) table instead of the adaLN Linear, and one
    shared Linear (6h^2 + 6h). ``text_null_token`` / ``pooled_text`` / ``context_flag`` False
    drop those parameters (Wan 2.1). ``out_dim`` (default ``in_dim``) sizes the output Linear.
    ``image_dim`` (Wan 2.1 I2V): the image embedder (two affine LayerNorms 2 i + 2h, Linears
    i^2 + i and i h + h, a position table ``image_pos_len`` x i) and per block the image k/v
    (2h^2 + 2h) and its k-norm.
    """
    h, m, hd = hidden_size, mlp_width(hidden_size, mlp_ratio), hidden_size // num_heads
    out_dim = out_dim or in_dim
    scope = qk_norm_scope(qk_norm)
    norm = 0 if scope is None else 2 * (hd if scope == "per_head" else h)
    modulation = 6 * h if adaln == "single" else 6 * h * h + 6 * h
    block = 4 * h * h + 4 * h + 2 * h * m + m + h + modulation + norm
    if not num_classes:
        block += 4 * h * h + 4 * h + (h if text_null_token else 0) + 2 * h + norm
    if image_dim:
        block += 2 * h * h + 2 * h + norm // 2
    final = 2 * h if final_modulation == "table" else 2 * h * h + 2 * h
    outer = (in_dim * h + h + (h if context_flag else 0) + (256 * h + h + h * h + h) + final
             + (h * out_dim + out_dim))
    if image_dim:
        i = image_dim
        outer += 2 * i + (i * i + i) + (i * h + h) + 2 * h + (image_pos_len or 0) * i
    if adaln == "single":
        outer += 6 * h * h + 6 * h
    if num_classes:
        outer += (num_classes + 1) * h
    else:
        outer += (text_dim * h + h + h * h + h) + ((text_dim * h + h) if pooled_text else 0)
    return int(depth * block + outer)


def dit_flops_per_token(*, in_dim: int, hidden_size: int, depth: int, mlp_ratio: float = 4.0,
                        text_dim: int = 384, seq_len: int, text_len: int,
                        cross_attention: bool = True, adaln: str = "per_block",
                        condition_groups: int = 0, distinct_conditions: int = 1, out_dim: int | None = None,
                        image_dim: int = 0, image_len: int = 0) -> float:
    """Analytic forward FLOPs per latent token (2 per multiply-add; matmuls only).

    Counts the patch / timestep / pooled-text embeddings, per block the qkv, self-attention
    scores and values over ``seq_len`` keys (an upper bound for packed rows, whose tokens
    only attend within their segment but are computed dense by the xla backend), output
    projection, cross-attention q / out (per token) and its k/v + text MLP over
    ``text_len`` tokens amortised over ``seq_len``, the MLP and adaLN, and the final layer.
    ``cross_attention=False`` (class-conditional models) drops the text terms. Training
    costs about 3x this (forward + backward), 4x with remat. ``adaln="single"`` computes the
    modulation Linear once instead of per block.

    ``condition_groups`` = K > 0 (the model's ``condition_groups``): the conditioning (timestep
    MLP, pooled text, every adaLN Linear) runs on ``distinct_conditions`` values per row,
    amortised over ``seq_len``, and each per-token modulation is a one-hot gather from K
    group rows (2 K width FLOPs per token). 0: all of it per token.

    ``out_dim`` (default ``in_dim``): the output token width. ``image_dim`` / ``image_len``
    (Wan 2.1 I2V): per block the scores and values over ``image_len`` image tokens, and the image
    k/v and embedder amortised over ``seq_len``.
    """
    h, m = hidden_size, mlp_width(hidden_size, mlp_ratio)
    out_dim = out_dim or in_dim
    per_token = 1.0
    gather = 0.0  # one-hot matmul FLOPs per token for each per-token modulation of width w
    if 0 < condition_groups < seq_len:
        per_token = distinct_conditions / seq_len
        gather = 2 * condition_groups
    adaln_flops = 2 * h * 6 * h * per_token + gather * 6 * h
    per_block = (2 * h * 3 * h + 2 * 2 * seq_len * h + 2 * h * h  # self-attention
                 + 2 * 2 * h * m  # MLP
                 + (0 if adaln == "single" else adaln_flops))
    embed = 2 * in_dim * h + 2 * (256 * h + h * h) * per_token + (adaln_flops if adaln == "single" else 0)
    if cross_attention:
        per_block += 2 * h * h + 2 * 2 * (text_len + 1) * h + 2 * h * h  # cross q, scores, out
        per_block += 2 * (text_len + 1) * h * 2 * h / seq_len  # cross k/v, amortised
        embed += 2 * text_dim * h * per_token  # pooled text
        embed += (2 * text_dim * h + 2 * h * h) * text_len / seq_len  # text MLP, amortised
    if cross_attention and image_dim and image_len:
        per_block += 2 * 2 * image_len * h + 2 * image_len * h * 2 * h / seq_len  # image scores; k/v
        embed += (2 * image_dim * image_dim + 2 * image_dim * h) * image_len / seq_len  # image embedder
    final = 2 * h * 2 * h * per_token + gather * 2 * h + 2 * h * out_dim
    return float(embed + depth * per_block + final)
