"""The umT5-XXL text encoder of Wan 2.1 in Flax NNX, with its checkpoint key map and Wan's prompt
encoding.

Wan 2.1 cross-attends to the per-token states of the encoder half of umT5-XXL (5.7B parameters:
24 layers, width 4096, 64 heads of 64, gated-GELU FFN of 10240, 256384 tokens), prompts padded
to 512 tokens and the states beyond each prompt's length set to zero.

Sources:
  * Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer" (T5, JMLR 21): pre-norm residual layers with an RMS layer norm (no mean
    subtraction, no bias), attention without the 1/sqrt(d) scaling and without biases, learned
    relative position biases over log-spaced buckets (§2.1).
  * Shazeer 2020, "GLU Variants Improve Transformer" (the gated-GELU FFN of T5 v1.1 / mT5 / umT5).
  * Chung et al. 2023, "UniMax: Fairer and More Effective Language Sampling for Large-Scale
    Multilingual Pretraining" (umT5): unlike T5, EVERY layer has its own relative position bias.
  * transformers ``UMT5EncoderModel`` (models/umt5/modeling_umt5.py, v5.25): the reference this
    module is tested against (tests/test_umt5.py, fixtures from tests/fixtures/wan/ref_umt5.py).
  * diffusers ``WanPipeline._get_t5_prompt_embeds`` / ``prompt_clean`` (pipelines/wan/pipeline_wan.py,
    v0.42): prompt cleaning, padding to ``max_sequence_length`` and zeroing beyond the length.

Layout of our parameters (``nnx.to_flat_state`` paths): ``shared.embedding`` (vocab, d_model);
``layers.{i}.attn_norm.scale``; ``layers.{i}.attn.{q,k,v,o}.kernel`` (in, out);
``layers.{i}.attn.relative_attention_bias.embedding`` (buckets, heads); ``layers.{i}.ffn_norm.scale``;
``layers.{i}.ffn.{wi_0,wi_1,wo}.kernel``; ``final_norm.scale``. :func:`umt5_key_map` maps the
transformers keys onto them.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from sora_jax.models import weight_map
from sora_jax.parallel.axes import EMBED, HEADS, MLP, NORM
from sora_jax.parallel.sharding import partitioned
from sora_jax.safetensors_files import SafetensorsReader

__all__ = [
    "UMT5Config",
    "UMT5Encoder",
    "UMT5_IGNORED_KEYS",
    "WanPromptEncoder",
    "clean_prompt",
    "embedding_key",
    "load_umt5",
    "load_umt5_state",
    "read_safetensors",
    "relative_position_bucket",
    "umt5_ignored_keys",
    "umt5_key_map",
]

# The encoder's embedding table is tied to ``shared.weight`` in transformers (UMT5EncoderModel.
# _tied_weights_keys); checkpoints may carry the copy. load_umt5_state checks the two are equal.
UMT5_IGNORED_KEYS: tuple[str, ...] = ("encoder.embed_tokens.weight",)
_SHARED, _EMBED_TOKENS = "shared.weight", "encoder.embed_tokens.weight"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Hyper-parameters of a umT5 encoder; the defaults are umT5-XXL's (Wan 2.1's text encoder).

    Attributes:
      vocab_size: rows of the token embedding (256384).
      d_model: residual width (4096).
      d_kv: width of one attention head (64); the attention's inner width is num_heads * d_kv.
      d_ff: hidden width of the gated FFN (10240).
      num_layers: encoder layers (24).
      num_heads: attention heads (64).
      relative_attention_num_buckets: relative-position buckets, both directions together (32).
      relative_attention_max_distance: distance from which all positions share a bucket (128).
      layer_norm_epsilon: added to the mean square in the RMS norms (1e-6).
      feed_forward_proj: only "gated-gelu" (wi_0 -> tanh-GELU, times wi_1, then wo) is implemented.
      pad_token_id: the id of <pad> (0).
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(
                f"unsupported feed_forward_proj {self.feed_forward_proj!r}; only 'gated-gelu' (umT5, T5 v1.1) "
                "is implemented")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4 (two directions, exact and log "
                             f"buckets), got {self.relative_attention_num_buckets}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "UMT5Config":
        """Reads a transformers ``config.json`` (of ``UMT5EncoderModel`` / ``UMT5Model``).

        Keys that are not fields here (dropout, decoder settings, ...) are ignored.

        Raises:
          FileNotFoundError: no such file.
          ValueError: the file describes another model type (e.g. plain T5, whose layers share one
            position bias) or a variant this implementation does not compute.
        """
        raw = json.loads(pathlib.Path(path).read_text())
        model_type = raw.get("model_type", "umt5")
        if model_type != "umt5":
            raise ValueError(f"{path} describes model_type {model_type!r}, not 'umt5'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads, num_heads * d_kv (4096 for XXL)."""
        return self.num_heads * self.d_kv


# --------------------------------------------------------------------------------------------
# Relative positions
# --------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
    """T5's relative-position bucket of each ``memory_position - query_position``.

    Raffel et al. 2020 (T5) §2.1, as Mesh TensorFlow and transformers
    (``UMT5Attention._relative_position_bucket``) compute it. Bidirectional: half the buckets,
    ``nb = num_buckets // 2``, are for keys after the query (r > 0 adds ``nb``), half for the rest,
    and with ``n = |r|`` and ``me = nb // 2``::

        bucket = n                                                      if n < me
        bucket = min(me + trunc(log(n / me) / log(max_distance / me) * (nb - me)), nb - 1)  otherwise

    (unidirectional: ``nb = num_buckets``, ``n = max(-r, 0)``, no offset). The logarithm is taken
    in float32, as transformers does, so bucket boundaries agree with the reference bit for bit.

    Args:
      relative_position: integer array of any shape (key index minus query index). A numpy array
        or list is computed with numpy (the model uses this: positions are static); a jax array
        with jax.numpy.
      bidirectional: encoder (True) or causal decoder (False) bucketing.
      num_buckets: buckets in all (32 for umT5).
      max_distance: distances from here on share the last bucket of their direction (128).

    Returns:
      int array of the input's shape (int64 for numpy, int32 for jax), values in [0, num_buckets).

    Raises:
      ValueError: too few buckets for an exact and a logarithmic range, or ``max_distance`` not
        beyond the exact range.
    """
    xp = jnp if isinstance(relative_position, jax.Array) else np
    rel = xp.asarray(relative_position)
    rel = rel.astype(jnp.int32 if xp is jnp else np.int64)
    buckets = xp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(rel.dtype) * num_buckets
        n = xp.abs(rel)
    else:
        n = -xp.minimum(rel, 0)
    max_exact = num_buckets // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(f"num_buckets={num_buckets * (2 if bidirectional else 1)} / max_distance={max_distance} "
                         "leave no exact and logarithmic ranges")
    is_small = n < max_exact
    # Distances below max_exact never use the log branch; clamping them keeps log() finite.
    ratio = xp.maximum(n, max_exact).astype(xp.float32) / xp.float32(max_exact)
    log_ratio = xp.log(ratio) / xp.float32(math.log(max_distance / max_exact))
    log_ratio = log_ratio * xp.float32(num_buckets - max_exact)
    large = max_exact + log_ratio.astype(rel.dtype)  # >= 0, so truncation == floor, as torch's .to(long)
    large = xp.minimum(large, num_buckets - 1)
    return buckets + xp.where(is_small, n, large)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class T5LayerNorm(nnx.Module):
    """T5's RMS layer norm: y = x / sqrt(mean(x^2) + eps) * scale (no mean, no bias).

    Statistics and the normalisation run in float32 (as transformers does); with a low-precision
    ``dtype`` the normalised value is rounded to it before the scale multiplies it, as transformers
    does with half-precision weights. Returns ``dtype``.
    """

    def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(NORM,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(var + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class UMT5Attention(nnx.Module):
    """T5 self-attention with this layer's own relative position bias (umT5).

    scores = q k^T (NO 1/sqrt(d_kv) scaling: T5 folds it into the initialisation) + bias[bucket],
    padding keys masked with the most negative float32, softmax in float32; no biases anywhere.
    """

    def __init__(self, cfg: UMT5Config, *, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dtype = dtype
        self.precision = precision
        d, inner = cfg.d_model, cfg.inner_dim
        # Initial values as transformers' UMT5PreTrainedModel._init_weights (Mesh TensorFlow).
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        q_std = (d * cfg.d_kv) ** -0.5
        self.q = nnx.Linear(d, inner, kernel_init=partitioned(_normal(q_std), (EMBED, HEADS)), **linear)
        self.k = nnx.Linear(d, inner, kernel_init=partitioned(_normal(d ** -0.5), (EMBED, HEADS)), **linear)
        self.v = nnx.Linear(d, inner, kernel_init=partitioned(_normal(d ** -0.5), (EMBED, HEADS)), **linear)
        self.o = nnx.Linear(inner, d, kernel_init=partitioned(_normal(inner ** -0.5), (HEADS, EMBED)), **linear)
        self.relative_attention_bias = nnx.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=param_dtype,
            embedding_init=partitioned(_normal(d ** -0.5), (None, None)), rngs=rngs)

    def __call__(self, x: jax.Array, buckets: np.ndarray, key_mask: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.num_heads, self.d_kv)
        k = self.k(x).reshape(b, length, self.num_heads, self.d_kv)
        v = self.v(x).reshape(b, length, self.num_heads, self.d_kv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)  # (buckets, heads)
        bias = jnp.take(table, jnp.asarray(buckets), axis=0)  # (L, L, heads)
        scores = scores + jnp.transpose(bias, (2, 0, 1))[None]
        # The most negative finite float, not -inf: a row whose keys are all masked gets uniform
        # weights (as the reference's additive mask gives), never NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
        return self.o(ctx.reshape(b, length, self.num_heads * self.d_kv))


class UMT5GatedFFN(nnx.Module):
    """Gated-GELU FFN (Shazeer 2020): wo(gelu_tanh(wi_0 x) * wi_1 x), no biases.

    The GELU is the tanh approximation (transformers' "gelu_new"). ``wo`` always runs in float32,
    as transformers keeps it (``UMT5PreTrainedModel._keep_in_fp32_modules = ["wo"]``).
    """

    def __init__(self, cfg: UMT5Config, *, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        common = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = nnx.Linear(d, f, dtype=dtype, precision=precision,
                               kernel_init=partitioned(_normal(d ** -0.5), (EMBED, MLP)), **common)
        self.wi_1 = nnx.Linear(d, f, dtype=dtype, precision=precision,
                               kernel_init=partitioned(_normal(d ** -0.5), (EMBED, MLP)), **common)
        self.wo = nnx.Linear(f, d, dtype=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST if precision is None else precision,
                             kernel_init=partitioned(_normal(f ** -0.5), (MLP, EMBED)), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
        return self.wo(h.astype(jnp.float32))


class UMT5Layer(nnx.Module):
    """One pre-norm encoder layer: x += Attn(LN(x)); x += FFN(LN(x)) (residual kept in float32)."""

    def __init__(self, cfg: UMT5Config, *, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        block = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.attn_norm = T5LayerNorm(cfg.d_model, **norm)
        self.attn = UMT5Attention(cfg, **block)
        self.ffn_norm = T5LayerNorm(cfg.d_model, **norm)
        self.ffn = UMT5GatedFFN(cfg, **block)

    def __call__(self, x: jax.Array, buckets: np.ndarray, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), buckets, key_mask).astype(jnp.float32)
        return x + self.ffn(self.ffn_norm(x)).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
    """The umT5 encoder (transformers ``UMT5EncoderModel``), returning the last hidden state.

    Token embedding -> ``num_layers`` pre-norm layers, each with its own relative position bias
    -> final RMS norm. No dropout (inference only).

    Precision: with ``dtype`` float32 (the default) the outputs match transformers' float32 run to
    ~1e-6. With bfloat16 the matmuls run in bfloat16, while — as transformers does with bf16
    weights — norms' statistics, the softmax and ``wo`` stay float32; the residual stream is kept
    float32 throughout (transformers' becomes float32 after the first FFN, because ``wo`` is float32).

    Args:
      cfg: the architecture (default umT5-XXL: build it with ``nnx.eval_shape``, 5.7B parameters).
      dtype: computation dtype of the matmuls.
      param_dtype: storage dtype of the parameters (bfloat16 halves XXL's 23 GB).
      precision: matmul precision; by default ``HIGHEST`` for float32 (no TF32 / bf16 passes on
        accelerators) and the backend default otherwise (``wo`` is always ``HIGHEST`` by default).
      rngs: for the initial values (transformers' initialisation); the loaders never compute them.
    """

    def __init__(self, cfg: UMT5Config = UMT5Config(), *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        if precision is None and jnp.dtype(dtype) == jnp.float32:
            precision = jax.lax.Precision.HIGHEST
        self.config = cfg
        self.dtype = dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                                embedding_init=partitioned(_normal(1.0), (None, EMBED)), rngs=rngs)
        self.layers = nnx.List([
            UMT5Layer(cfg, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
            for _ in range(cfg.num_layers)
        ])
        self.final_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Encodes a padded batch of token ids.

        Args:
          input_ids: int (B, L) token ids in [0, vocab_size) (out-of-range ids are not checked
            inside jit; :class:`WanPromptEncoder` checks them).
          attention_mask: (B, L), non-zero / True on real tokens. Masked tokens are hidden as keys
            from every query; their own rows still get (meaningless) states, as in transformers.

        Returns:
          float32 (B, L, d_model): ``last_hidden_state``.

        Raises:
          ValueError: the inputs are not 2-D with equal shapes.
        """
        if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError("input_ids and attention_mask must both be (B, L); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        cfg = self.config
        length = input_ids.shape[1]
        positions = np.arange(length)
        # (L, L) bucket of key position - query position; static (L is a shape), so numpy.
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None], bidirectional=True,
            num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance,
        ).astype(np.int32)
        key_mask = jnp.asarray(attention_mask) != 0
        x = self.shared(jnp.asarray(input_ids)).astype(jnp.float32)
        for layer in self.layers:
            x = layer(x, buckets, key_mask)
        return self.final_norm(x).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _copy_split(a: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a)]


def _linear_split(k: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.asarray(k).T)]


def umt5_key_map(cfg: UMT5Config, *, embedding_key: str = _SHARED) -> list[weight_map.Target]:
    """Targets filling every parameter of :class:`UMT5Encoder` from transformers' keys.

    transformers ``UMT5EncoderModel`` keys -> our paths: ``shared.weight`` -> ``shared.embedding``;
    ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`` -> ``layers.{i}.attn.{q,k,v,o}.kernel``
    (transposed); ``...SelfAttention.relative_attention_bias.weight`` -> ``layers.{i}.attn.
    relative_attention_bias.embedding``; ``...layer.0.layer_norm.weight`` -> ``layers.{i}.attn_norm.scale``;
    ``...layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` -> ``layers.{i}.ffn.{...}.kernel`` (transposed);
    ``...layer.1.layer_norm.weight`` -> ``layers.{i}.ffn_norm.scale``; ``encoder.final_layer_norm.weight``
    -> ``final_norm.scale``. Keys of the checkpoint that are not ours: :data:`UMT5_IGNORED_KEYS`.
    ``embedding_key``: the tied embedding's key to read (``encoder.embed_tokens.weight`` when a
    checkpoint holds only that copy).

    Returns:
      ``2 + 10 * num_layers`` targets, each with an inverse (``split``) for export.
    """
    def copy(path, key):
        return weight_map.Target(path, (key,), weight_map.copy, _copy_split)

    def linear(path, key):
        return weight_map.Target(path, (key,), weight_map.linear_kernel, _linear_split)

    targets = [copy(("shared", "embedding"), embedding_key)]
    for i in range(cfg.num_layers):
        src = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v", "o"):
            targets.append(linear(("layers", i, "attn", name, "kernel"), f"{src}.0.SelfAttention.{name}.weight"))
        targets.append(copy(("layers", i, "attn", "relative_attention_bias", "embedding"),
                            f"{src}.0.SelfAttention.relative_attention_bias.weight"))
        targets.append(copy(("layers", i, "attn_norm", "scale"), f"{src}.0.layer_norm.weight"))
        for name in ("wi_0", "wi_1", "wo"):
            targets.append(linear(("layers", i, "ffn", name, "kernel"), f"{src}.1.DenseReluDense.{name}.weight"))
        targets.append(copy(("layers", i, "ffn_norm", "scale"), f"{src}.1.layer_norm.weight"))
    targets.append(copy(("final_norm", "scale"), "encoder.final_layer_norm.weight"))
    return targets


def _arrays_equal(a, b, rows: int = 4096) -> bool:
    """Whether two (possibly memory-mapped) arrays are equal, compared a block of rows at a time."""
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        return False
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0:
        return bool(a == b)
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def embedding_key(tensors: Mapping[str, Any]) -> str:
    """The key of the token-embedding table to read. transformers ties
    ``encoder.embed_tokens.weight`` to ``shared.weight``: a checkpoint may hold either or both.
    With only the former, it stands in for ``shared.weight`` (transformers ties to whichever is
    present); with both, they must be equal -- otherwise transformers would not tie them and its
    encoder would embed with ``encoder.embed_tokens.weight`` (both are read only in that case,
    to compare them).

    Raises:
      ValueError: both present and different.
    """
    if _EMBED_TOKENS not in tensors:
        return _SHARED
    if _SHARED not in tensors:
        return _EMBED_TOKENS
    if not _arrays_equal(tensors[_SHARED], tensors[_EMBED_TOKENS]):
        raise ValueError(f"{_EMBED_TOKENS} differs from {_SHARED}; transformers would not tie them and its encoder "
                         f"would embed with {_EMBED_TOKENS}, which this loader does not read")
    return _SHARED


def load_umt5_state(model: UMT5Encoder, tensors: Mapping[str, np.ndarray]) -> UMT5Encoder:
    """``model`` with every parameter taken from transformers-layout reference tensors
    (:func:`sora_jax.models.weight_map.load`: every key is checked before any is read, then one
    parameter at a time is converted and cast to the parameter's dtype).

    Args:
      model: an abstract (``nnx.eval_shape``) or concrete :class:`UMT5Encoder`; it is not modified.
      tensors: key -> array in torch layout (a dict, or a lazy
        :class:`~sora_jax.safetensors_files.SafetensorsReader`; any float dtype incl. bfloat16).

    Returns:
      a new :class:`UMT5Encoder` holding the reference's values (parameters keep their sharding
      metadata).

    Raises:
      ValueError: listing every problem: missing / unexpected keys, shape mismatches, parameters
        without a source, or ``encoder.embed_tokens.weight`` present and different from
        ``shared.weight``.
    """
    embedding = embedding_key(tensors)
    targets = umt5_key_map(model.config, embedding_key=embedding)
    return weight_map.load(model, targets, tensors, ignored=umt5_ignored_keys(embedding), what="the umT5 checkpoint")


def umt5_ignored_keys(embedding: str) -> tuple[str, ...]:
    """The checkpoint keys that are not ours when ``embedding`` (:func:`embedding_key`) is read:
    the other name of the tied embedding table."""
    return tuple(k for k in (_SHARED, _EMBED_TOKENS) if k != embedding)


def read_safetensors(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The tensors of a safetensors file or of a transformers / diffusers model folder (one file or
    shards with ``model.safetensors.index.json``), read lazily one tensor at a time, bfloat16
    included (:class:`sora_jax.safetensors_files.SafetensorsReader`).

    Raises:
      FileNotFoundError: no such file, or no (single) safetensors file in the folder.
      ValueError: a malformed header or an unsupported dtype.
    """
    return SafetensorsReader(path)


def load_umt5(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              precision: Any = None) -> UMT5Encoder:
    """A :class:`UMT5Encoder` from a transformers folder (``config.json`` + safetensors), e.g. the
    ``text_encoder/`` of a diffusers Wan 2.1 checkpoint. Built abstractly, so no random values are
    computed; peak host memory is the parameters plus one tensor.

    Args:
      folder: the model folder.
      dtype, param_dtype, precision: as :class:`UMT5Encoder`.

    Raises:
      FileNotFoundError: no config.json / safetensors.
      ValueError: an unsupported config, or the checkpoint does not match it (every problem listed).
    """
    folder = pathlib.Path(folder)
    cfg = UMT5Config.from_json(folder / "config.json")
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                                  precision=precision, rngs=nnx.Rngs(0)))
    return load_umt5_state(abstract, read_safetensors(folder))


# --------------------------------------------------------------------------------------------
# Wan's prompt encoding
# --------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ``ftfy.fix_text`` (only if ftfy is installed), html
    unescaping twice, whitespace runs collapsed to one space, stripped.

    diffusers applies ftfy only when it is importable, and so does this function (ftfy is not a
    dependency of this package); the original Wan code always applies it. Without ftfy, text that
    ftfy would change (curly quotes, mojibake, full-width forms, ligatures, control characters)
    tokenizes differently from a run that has it.
    """
    try:
        import ftfy  # noqa: PLC0415  (optional, as in diffusers)
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanPromptEncoder:
    """Wan 2.1's prompt encoding: clean -> tokenize -> pad / truncate to ``max_length`` -> umT5
    -> zero the states beyond each prompt's length (diffusers ``WanPipeline._get_t5_prompt_embeds``).

    The tokenizer is a ``tokenizers`` tokenizer.json (Wan's ``tokenizer/`` folder); its own padding
    and truncation settings are replaced by: truncate at ``max_length`` tokens (the appended </s>
    kept, as transformers' ``truncation=True``), pad on the right with ``pad_token``.

    Args:
      model: a loaded :class:`UMT5Encoder`.
      tokenizer: a ``tokenizers.Tokenizer`` (copied, never modified), a tokenizer.json path, or a
        folder holding tokenizer.json.
      max_length: tokens per prompt, </s> included (512 in Wan's pipeline call).
      pad_token: the padding token (its id must be the model's pad id for the reference's
        behaviour; masked either way).

    Raises:
      FileNotFoundError: no tokenizer.json at the given path.
      ValueError: ``max_length`` < 1, or ``pad_token`` not in the tokenizer.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: tokenizers.Tokenizer | str | os.PathLike, *,
                 max_length: int = 512, pad_token: str = "<pad>"):
        if not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if isinstance(tokenizer, tokenizers.Tokenizer):
            tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        else:
            path = pathlib.Path(tokenizer)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer.json at {path}")
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=int(max_length))
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.model = model
        self.config: UMT5Config = model.config
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = pad_id
        graphdef, state = nnx.split(model)
        self._state = state

        def forward(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state)(input_ids, attention_mask)

        self._forward = jax.jit(forward)

    @classmethod
    def from_pretrained(cls, text_encoder_dir: str | os.PathLike,  # local files only: allow-network
                        tokenizer: str | os.PathLike, *, max_length: int = 512, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, pad_token: str = "<pad>") -> "WanPromptEncoder":
        """From a diffusers Wan checkpoint's ``text_encoder/`` and ``tokenizer/`` folders.

        Raises:
          FileNotFoundError, ValueError: as :func:`load_umt5` and the constructor.
        """
        model = load_umt5(text_encoder_dir, dtype=dtype, param_dtype=param_dtype)
        return cls(model, tokenizer, max_length=max_length, pad_token=pad_token)

    @property
    def d_model(self) -> int:
        """Width of the returned states (4096 for umT5-XXL)."""
        return self.config.d_model

    def tokenize(self, prompts: str | Sequence[str], *, clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, as the pipeline's tokenizer call produces them
        (``padding="max_length", truncation=True, add_special_tokens=True``).

        Args:
          prompts: one prompt or B prompts.
          clean: apply :func:`clean_prompt` first (the pipeline does).

        Returns:
          (input_ids, attention_mask), int32 (B, max_length); padding has ``pad_id`` and mask 0.

        Raises:
          TypeError: a prompt is not a str.
          ValueError: a token id is outside the model's vocabulary (tokenizer / model mismatch).
        """
        prompts = _as_prompt_list(prompts)
        if clean:
            prompts = [clean_prompt(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=True) if prompts else []
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = enc.attention_mask
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids span [{ids.min()}, {ids.max()}], outside the model's vocabulary of "
                             f"{self.config.vocab_size}: the tokenizer does not belong to this model")
        return ids, mask

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Wan's text conditioning of B prompts.

        Args:
          prompts: one prompt or B prompts (raw: cleaned here).

        Returns:
          (states, lengths): float32 (B, max_length, d_model) with every row zero at and beyond its
          prompt's length; int32 (B,) lengths (real tokens, </s> included).

        Raises:
          TypeError, ValueError: as :meth:`tokenize`.
        """
        ids, mask = self.tokenize(prompts)
        lengths = mask.sum(axis=1).astype(np.int32)
        if ids.shape[0] == 0:
            return np.zeros((0, self.max_length, self.d_model), np.float32), lengths
        states = np.array(self._forward(self._state, ids, mask), dtype=np.float32)
        # diffusers keeps u[:seq_len] and appends zeros: with right padding, position >= length.
        states[np.arange(self.max_length)[None, :] >= lengths[:, None]] = 0.0
        return states, lengths

    __call__ = encode


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    # diffusers accepts one prompt as a bare string.
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be str, got {type(p).__name__}")
    return prompts
