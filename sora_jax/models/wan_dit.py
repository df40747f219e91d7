"""Wan 2.1's transformer (diffusers ``WanTransformer3DModel``) as our :class:`~sora_jax.models.dit.DiT`:
the config translation and the key map from its checkpoint to our parameters.

Wan 2.1 (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models") is a
DiT with adaLN-single (one shared ``time_proj`` plus a (6, D) ``scale_shift_table`` per block),
RMS QK-norm across all heads, an affine LayerNorm before an ungated cross-attention to umT5
states (no null token), no pooled text, an output head modulated by its own (2, D) table plus
the timestep embedding, and 3D RoPE on interleaved feature pairs with the head dimension split
t / h / w = d - 4(d // 6), 2(d // 6), 2(d // 6). :class:`DiT` has each of these as an option
(see its docstring); :func:`dit_fields` sets them from a diffusers ``config.json``.

RoPE: Wan rotates pairs (2i, 2i + 1) of each head's features by angle i; our
:func:`~sora_jax.models.layers.apply_rope` rotates (i, i + d/2) by angle i, with the same
per-axis angle list. Reordering each head's query and key features as (0, 2, 4, ..., 1, 3,
5, ...) turns one into the other, and attention scores q.k are unchanged by a permutation
applied to both q and k; the across-heads RMS norm is permutation-equivariant once its scale
is permuted too. The key map applies that permutation to to_q / to_k (weights and biases) and
norm_q / norm_k of the self-attention; cross-attention has no RoPE and is copied as it is.

The image-to-video models (I2V-14B; FLF2V-14B adds image positions) take 36 input channels
(noisy latent, mask, first-frame latent) and predict 16, and attend CLIP ViT-H/14 states
through an image embedder and added key / value projections in every cross-attention: the DiT
options ``out_dim``, ``image_dim`` and ``image_pos_len``
(:mod:`sora_jax.models.image_context`), mapped here like the rest.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sora_jax.models import weight_map as wm
from sora_jax.models.layers import default_rope_axes_dims

__all__ = [
    "WAN_QK_NORM",
    "dit_fields",
    "wan_transformer_ignored_keys",
    "rope_pair_permutation",
    "wan_rope_axes_dims",
    "wan_transformer_config",
    "wan_transformer_incompatibilities",
    "wan_transformer_key_map",
]

WAN_QK_NORM = "rms_norm_across_heads"


def wan_rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.1's split of the head dimension over (t, h, w): d - 4(d // 6), 2(d // 6), 2(d // 6)
    (diffusers ``WanRotaryPosEmbed``); 128 -> (44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_pair_permutation(num_heads: int, head_dim: int) -> np.ndarray:
    """Indices p (num_heads * head_dim,) with ours[..., k] = wan[..., p[k]]: within each head the
    even features, then the odd ones (interleaved pairs -> rotate-half pairs)."""
    within = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def dit_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``dit`` config fields (and ``patch``, ``latent_channels``) for a diffusers
    ``WanTransformer3DModel`` ``config.json``.

    Returns:
      dict with ``dit`` (the fields of our ``dit`` config section; ``in_channels`` is None
      unless the model takes more channels than it predicts, as I2V's 36 for 16) and
      ``latent_channels`` (the output channels: the VAE's).

    Raises:
      ValueError: a setting our DiT cannot express (fewer input than output channels, a
        QK-norm other than across heads, no cross-attention norm, a timestep width other than
        256, an epsilon other than 1e-6, added K/V projections without an image embedder or of
        another width than the model), naming it.
    """
    c = dict(config)
    problems = []
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    hidden = heads * head_dim
    in_ch, out_ch = int(c["in_channels"]), int(c.get("out_channels") or c["in_channels"])
    if in_ch < out_ch:
        problems.append(f"in_channels {in_ch} < out_channels {out_ch} (extra input channels are conditioning; "
                        "fewer than the output has no meaning here)")
    if c.get("qk_norm", WAN_QK_NORM) != WAN_QK_NORM:
        problems.append(f"qk_norm {c.get('qk_norm')!r} (only {WAN_QK_NORM!r})")
    if not c.get("cross_attn_norm", True):
        problems.append("cross_attn_norm False (our cross-attention always has its LayerNorm)")
    if int(c.get("freq_dim", 256)) != 256:
        problems.append(f"freq_dim {c.get('freq_dim')} (our timestep embedding is 256 wide)")
    if abs(float(c.get("eps", 1e-6)) - 1e-6) > 1e-12:
        problems.append(f"eps {c.get('eps')} (our norms use 1e-6)")
    image_dim, added_kv, pos_len = (c.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"))
    if added_kv is not None and int(added_kv) != hidden:
        problems.append(f"added_kv_proj_dim {added_kv} != model width {hidden} (the added K/V read the image "
                        "embedder's output, which is model-wide)")
    if (added_kv is None) != (image_dim is None):
        problems.append(f"image_dim {image_dim} with added_kv_proj_dim {added_kv}: the image branch needs both")
    if pos_len is not None and image_dim is None:
        problems.append(f"pos_embed_seq_len {pos_len} without image_dim")
    if problems:
        raise ValueError("this Wan transformer config cannot be expressed by our DiT: " + "; ".join(problems))
    patch = tuple(int(p) for p in c["patch_size"])
    dit = dict(
        patch=patch, hidden_size=hidden, depth=int(c["num_layers"]), num_heads=heads,
        mlp_ratio=int(c["ffn_dim"]) / hidden, qk_norm="across_heads", text_dim=int(c["text_dim"]),
        adaln="single", rope_axes_dims=wan_rope_axes_dims(head_dim), rope_theta=10000.0,
        pos_embed="rope", num_classes=0, text_null_token=False, pooled_text=False,
        final_modulation="table", context_flag=False,
        in_channels=in_ch if in_ch != out_ch else None,
        image_dim=int(image_dim) if image_dim is not None else None,
        image_pos_len=int(pos_len) if pos_len is not None else None,
    )
    return dict(dit=dit, latent_channels=out_ch)


# DiT.from_config's defaults for the fields configs saved before the Wan options lack
_DIT_DEFAULTS = dict(text_null_token=True, pooled_text=True, final_modulation="linear", context_flag=True,
                     image_dim=None, image_pos_len=None, in_channels=None)
# diffusers' WanTransformer3DModel default (and every released Wan 2.1's): the length of the RoPE
# table it precomputes; our RoPE has no table, so a run does not record it
WAN_ROPE_MAX_SEQ_LEN = 1024


def wan_transformer_incompatibilities(dit: Mapping[str, Any], latent_channels: int) -> list[str]:
    """The settings of our ``dit`` config section (and the VAE's ``latent_channels``) that a
    diffusers ``WanTransformer3DModel`` cannot express, one line each, named ``dit.<field>``
    (empty: a Wan-shaped DiT, e.g. one :func:`dit_fields` made). ``scan_layers``, ``remat``,
    ``dtype`` and the attention backend change no weight and are not checked."""
    d = {**_DIT_DEFAULTS, **dict(dit)}
    problems = []
    for key, want in (("adaln", "single"), ("qk_norm", "across_heads"), ("text_null_token", False),
                      ("pooled_text", False), ("final_modulation", "table"), ("context_flag", False),
                      ("pos_embed", "rope"), ("num_classes", 0)):
        if d.get(key) != want:
            problems.append(f"dit.{key} is {d.get(key)!r}, Wan needs {want!r}")
    heads, hidden = int(d["num_heads"]), int(d["hidden_size"])
    if hidden % heads:
        problems.append(f"dit.hidden_size {hidden} is not a multiple of dit.num_heads {heads}")
        return problems
    head_dim = hidden // heads
    if float(d.get("rope_theta", 10000.0)) != 10000.0:
        problems.append(f"dit.rope_theta is {d.get('rope_theta')}, Wan's RoPE uses 10000")
    axes = d.get("rope_axes_dims")
    try:
        axes = tuple(int(a) for a in axes) if axes else default_rope_axes_dims(head_dim)
    except ValueError as err:
        axes = str(err)
    if axes != wan_rope_axes_dims(head_dim):
        problems.append(f"dit.rope_axes_dims is {axes}, Wan splits a head of {head_dim} as "
                        f"{wan_rope_axes_dims(head_dim)}")
    ffn = float(d["mlp_ratio"]) * hidden
    if abs(ffn - round(ffn)) > 1e-6 * max(1.0, ffn):
        problems.append(f"dit.mlp_ratio {d['mlp_ratio']} x hidden_size {hidden} = {ffn} is not a whole FFN width")
    if len(tuple(d["patch"])) != 3:
        problems.append(f"dit.patch {tuple(d['patch'])} is not a (t, h, w) patch")
    in_ch = d.get("in_channels") or latent_channels
    if int(in_ch) < int(latent_channels):
        problems.append(f"dit.in_channels {in_ch} < the latent channels {latent_channels}")
    if d.get("image_pos_len") and not d.get("image_dim"):
        problems.append(f"dit.image_pos_len {d.get('image_pos_len')} without dit.image_dim")
    return problems


def wan_transformer_config(dit: Mapping[str, Any], latent_channels: int, *,
                           rope_max_seq_len: int = WAN_ROPE_MAX_SEQ_LEN) -> dict[str, Any]:
    """The diffusers ``WanTransformer3DModel`` ``config.json`` fields of our ``dit`` section: the
    inverse of :func:`dit_fields` (``dit_fields(wan_transformer_config(d, c))`` gives ``d``'s
    model fields back, and ``latent_channels`` = c). The I2V fields (``in_channels`` > the
    output's, ``image_dim``, ``added_kv_proj_dim`` = the model width, ``pos_embed_seq_len``) are
    set from ``dit.in_channels`` / ``image_dim`` / ``image_pos_len``; ``rope_max_seq_len`` is
    not a setting of ours (our RoPE has no table): Wan's 1024 unless given. No ``_class_name``.

    Raises:
      ValueError: every setting :func:`wan_transformer_incompatibilities` names, in one message.
    """
    problems = wan_transformer_incompatibilities(dit, latent_channels)
    if problems:
        raise ValueError("this DiT is not a Wan transformer: " + "; ".join(problems))
    d = {**_DIT_DEFAULTS, **dict(dit)}
    heads, hidden = int(d["num_heads"]), int(d["hidden_size"])
    image_dim = int(d["image_dim"]) if d.get("image_dim") else None
    return {
        "added_kv_proj_dim": hidden if image_dim else None,
        "attention_head_dim": hidden // heads,
        "cross_attn_norm": True,
        "eps": 1e-6,
        "ffn_dim": int(round(float(d["mlp_ratio"]) * hidden)),
        "freq_dim": 256,
        "image_dim": image_dim,
        "in_channels": int(d.get("in_channels") or latent_channels),
        "num_attention_heads": heads,
        "num_layers": int(d["depth"]),
        "out_channels": int(latent_channels),
        "patch_size": [int(p) for p in d["patch"]],
        "pos_embed_seq_len": int(d["image_pos_len"]) if d.get("image_pos_len") else None,
        "qk_norm": WAN_QK_NORM,
        "rope_max_seq_len": int(rope_max_seq_len),
        "text_dim": int(d["text_dim"]),
    }


def _permuted_converters(perm: np.ndarray):
    """(qkv kernel, qkv bias, norm scale) conversions that reorder q / k features by ``perm``."""
    def qkv_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
        q, k, v = (np.asarray(a) for a in arrays)
        return wm.fused_linear_kernel([q[perm], k[perm], v])

    def qkv_bias(arrays: Sequence[np.ndarray]) -> np.ndarray:
        q, k, v = (np.asarray(a) for a in arrays)
        return wm.fused_linear_bias([q[perm], k[perm], v])

    def norm_scale(arrays: Sequence[np.ndarray]) -> np.ndarray:
        (w,) = arrays
        return np.asarray(w)[perm]

    # export: split the fused q / k / v and undo the permutation (ours[k] = wan[perm[k]], so
    # wan = ours[argsort(perm)]); q, k and v of a self-attention are all model-wide
    unperm = np.argsort(perm)

    @wm.register_inverse(qkv_kernel, lambda ours, known: [(n, ours[0]) for n in wm.split_sizes(
        ours[1], known, "a self-attention qkv kernel")])
    def qkv_kernel_inverse(a: np.ndarray, shapes) -> list[np.ndarray]:
        q, k, v = wm.split_rows(np.asarray(a).T, [s[0] for s in shapes])
        return [np.ascontiguousarray(q[unperm]), np.ascontiguousarray(k[unperm]), v]

    @wm.register_inverse(qkv_bias, lambda ours, known: [(n,) for n in wm.split_sizes(
        ours[0], known, "a self-attention qkv bias")])
    def qkv_bias_inverse(a: np.ndarray, shapes) -> list[np.ndarray]:
        q, k, v = wm.split_rows(np.asarray(a), [s[0] for s in shapes])
        return [q[unperm], k[unperm], v]

    @wm.register_inverse(norm_scale, lambda ours, known: [ours])
    def norm_scale_inverse(a: np.ndarray, shapes) -> list[np.ndarray]:
        return [np.asarray(a)[unperm]]

    return (wm.register_shape(lambda s: (s[0][1], s[0][0] + s[1][0] + s[2][0]))(qkv_kernel),
            wm.register_shape(lambda s: (s[0][0] + s[1][0] + s[2][0],))(qkv_bias),
            wm.register_shape(lambda s: s[0])(norm_scale))


def _self_attention_targets(prefix: str, ours: tuple, converters) -> list[wm.Target]:
    qkv_kernel, qkv_bias, norm_scale = converters
    a = f"{prefix}.attn1"
    return [
        wm.Target((*ours, "attn", "qkv", "kernel"), (f"{a}.to_q.weight", f"{a}.to_k.weight", f"{a}.to_v.weight"),
                  qkv_kernel),
        wm.Target((*ours, "attn", "qkv", "bias"), (f"{a}.to_q.bias", f"{a}.to_k.bias", f"{a}.to_v.bias"), qkv_bias),
        wm.Target((*ours, "attn", "q_norm", "scale"), (f"{a}.norm_q.weight",), norm_scale),
        wm.Target((*ours, "attn", "k_norm", "scale"), (f"{a}.norm_k.weight",), norm_scale),
        wm.Target((*ours, "attn", "proj", "kernel"), (f"{a}.to_out.0.weight",), wm.linear_kernel),
        wm.Target((*ours, "attn", "proj", "bias"), (f"{a}.to_out.0.bias",), wm.copy),
    ]


def _linear(path: tuple, key: str) -> list[wm.Target]:
    return [wm.Target((*path, "kernel"), (f"{key}.weight",), wm.linear_kernel),
            wm.Target((*path, "bias"), (f"{key}.bias",), wm.copy)]


def _norm(path: tuple, key: str) -> list[wm.Target]:
    return [wm.Target((*path, "scale"), (f"{key}.weight",), wm.copy),
            wm.Target((*path, "bias"), (f"{key}.bias",), wm.copy)]


def _image_targets(dit: Mapping[str, Any]) -> list[wm.Target]:
    """The I2V extras: the image embedder, and per block the added K/V and their k-norm."""
    e = "condition_embedder.image_embedder"
    t = [*_norm(("image_embed", "norm1"), f"{e}.norm1"), *_linear(("image_embed", "fc1"), f"{e}.ff.net.0.proj"),
         *_linear(("image_embed", "fc2"), f"{e}.ff.net.2"), *_norm(("image_embed", "norm2"), f"{e}.norm2")]
    if dit.get("image_pos_len"):
        t.append(wm.Target(("image_embed", "pos"), (f"{e}.pos_embed",), _table))
    for i in range(int(dit["depth"])):
        a, ours = f"blocks.{i}.attn2", ("blocks", i, "cross_attn")
        t += [
            wm.Target((*ours, "image_kv", "kernel"), (f"{a}.add_k_proj.weight", f"{a}.add_v_proj.weight"),
                      wm.fused_linear_kernel),
            wm.Target((*ours, "image_kv", "bias"), (f"{a}.add_k_proj.bias", f"{a}.add_v_proj.bias"),
                      wm.fused_linear_bias),
            wm.Target((*ours, "image_k_norm", "scale"), (f"{a}.norm_added_k.weight",), wm.copy),
        ]
    return t


def wan_transformer_ignored_keys(dit: Mapping[str, Any]) -> tuple[str, ...]:
    """Checkpoint keys the import skips: the ``norm_added_q`` scales some I2V checkpoints carry,
    which diffusers itself ignores (Wan's image branch has no query norm of its own)."""
    if not dit.get("image_dim"):
        return ()
    return tuple(f"blocks.{i}.attn2.norm_added_q.weight" for i in range(int(dit["depth"])))


def _table(arrays: Sequence[np.ndarray]) -> np.ndarray:
    (t,) = arrays  # (1, n, D) -> (n, D)
    t = np.asarray(t)
    return t.reshape(t.shape[-2], t.shape[-1])


wm.register_shape(lambda s: (s[0][-2], s[0][-1]))(_table)


# Wan's tables (scale_shift_table, pos_embed) are (1, n, D)
@wm.register_inverse(_table, lambda ours, known: [known[0] or (1, *ours)])
def _table_inverse(a: np.ndarray, shapes) -> list[np.ndarray]:
    return [np.asarray(a).reshape(shapes[0])]


def wan_transformer_key_map(dit: Mapping[str, Any]) -> list[wm.Target]:
    """The key map from a diffusers ``WanTransformer3DModel`` checkpoint to our DiT built with
    ``dit`` (the fields :func:`dit_fields` returns; blocks unrolled, ``scan_layers`` False).

    Returns:
      one :class:`~sora_jax.models.weight_map.Target` per parameter of ours.

    Raises:
      ValueError: ``dit`` is not a Wan-shaped config (see :func:`dit_fields`).
    """
    if dit.get("scan_layers"):
        raise ValueError("the Wan key map targets unrolled blocks: build the DiT with scan_layers=False")
    for key, want in (("adaln", "single"), ("qk_norm", "across_heads"), ("text_null_token", False),
                      ("pooled_text", False), ("final_modulation", "table"), ("context_flag", False)):
        if dit.get(key) != want:
            raise ValueError(f"not a Wan-shaped DiT config: dit.{key} is {dit.get(key)!r}, Wan needs {want!r}")
    heads, hidden = int(dit["num_heads"]), int(dit["hidden_size"])
    converters = _permuted_converters(rope_pair_permutation(heads, hidden // heads))
    t = [
        wm.Target(("x_embed", "kernel"), ("patch_embedding.weight",), wm.patch_kernel),
        wm.Target(("x_embed", "bias"), ("patch_embedding.bias",), wm.copy),
        *_linear(("t_embed", "fc1"), "condition_embedder.time_embedder.linear_1"),
        *_linear(("t_embed", "fc2"), "condition_embedder.time_embedder.linear_2"),
        *_linear(("t_modulation",), "condition_embedder.time_proj"),
        *_linear(("text_embed", "fc1"), "condition_embedder.text_embedder.linear_1"),
        *_linear(("text_embed", "fc2"), "condition_embedder.text_embedder.linear_2"),
        wm.Target(("final", "table"), ("scale_shift_table",), _table),
        *_linear(("final", "linear"), "proj_out"),
    ]
    for i in range(int(dit["depth"])):
        b, ours = f"blocks.{i}", ("blocks", i)
        t += _self_attention_targets(b, ours, converters)
        t += [
            wm.Target((*ours, "modulation"), (f"{b}.scale_shift_table",), _table),
            wm.Target((*ours, "norm_cross", "scale"), (f"{b}.norm2.weight",), wm.copy),
            wm.Target((*ours, "norm_cross", "bias"), (f"{b}.norm2.bias",), wm.copy),
            *_linear((*ours, "cross_attn", "q"), f"{b}.attn2.to_q"),
            wm.Target((*ours, "cross_attn", "kv", "kernel"), (f"{b}.attn2.to_k.weight", f"{b}.attn2.to_v.weight"),
                      wm.fused_linear_kernel),
            wm.Target((*ours, "cross_attn", "kv", "bias"), (f"{b}.attn2.to_k.bias", f"{b}.attn2.to_v.bias"),
                      wm.fused_linear_bias),
            wm.Target((*ours, "cross_attn", "q_norm", "scale"), (f"{b}.attn2.norm_q.weight",), wm.copy),
            wm.Target((*ours, "cross_attn", "k_norm", "scale"), (f"{b}.attn2.norm_k.weight",), wm.copy),
            *_linear((*ours, "cross_attn", "proj"), f"{b}.attn2.to_out.0"),
            *_linear((*ours, "mlp", "fc1"), f"{b}.ffn.net.0.proj"),
            *_linear((*ours, "mlp", "fc2"), f"{b}.ffn.net.2"),
        ]
    if dit.get("image_dim"):
        t += _image_targets(dit)
    return t
