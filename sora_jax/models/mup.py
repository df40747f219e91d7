"""μP (maximal update parametrization) for the DiT, Adam variant: per-parameter roles, init
rescaling, learning-rate multipliers and the forward multipliers.

μP (Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer", Table 3 for Adam; its multiplier form for the output layer is the one
of the ``mup`` package's ``MuReadout`` / ``MuAdam``, TP5 Table 8; for diffusion transformers:
Zheng et al. 2025, "Scaling Diffusion Transformers Efficiently via μP") makes every layer's
activations, and their change under training, independent of the width to first order, so the
learning rate (and the other hyperparameters) tuned on a narrow model transfer to a wide one.

Everything here is relative to a base width: with ``dit.parameterization = "mup"`` and
``dit.mup_base_width`` = b, the width multiplier is m = hidden_size / b, and at m = 1 the μP
model equals the standard-parametrized (SP) one exactly (same init, same forward, same
updates: every factor below is exactly 1.0). ``"sp"`` (the default) is the code as it was:
no factor of this module is applied anywhere.

Per-parameter rules (paths are the DiT's ``nnx.Param`` paths; block indices and the scanned
``layers`` axis are ignored; "fi", "fo": a kernel's fan-in / fan-out; "init" is the factor on the
SP initial value; "LR" the Adam learning-rate multiplier):

==========================================  ======  ==================================  =====  ===============
parameters                                  role    μP init                             LR     forward
==========================================  ======  ==================================  =====  ===============
x_embed, text_embed.fc1, pooled_text_embed, input   xavier: std held at its base-width  1      --
image_embed.fc2 (kernels)                           value, x sqrt((fi + fo)/(fi + fo/m))
t_embed.fc1, image_embed.fc1 (kernels),     input   width-independent (normal 0.02,     1      --
label_embed.embedding                               xavier over fixed widths): x 1
every bias, LayerNorm / QK-norm scale and   vector  zeros / ones / normal 0.02: x 1     1      --
bias, cond_embed, null_token, modulation
(adaLN-single table), final.table,
image_embed.pos
blocks' attn.qkv, attn.proj,                hidden  xavier: x 1 (on an h x kh kernel    1/m    --
cross_attn.q / kv / proj / image_kv,                2/(fi + fo) is already its base
mlp.fc1 / fc2; text_embed.fc2 (kernels)             value / m: var ~ 1/fan_in)
t_embed.fc2.kernel                          hidden  normal(0.02): x 1/sqrt(m)           1/m    --
blocks' adaln.linear, t_modulation,         hidden  zero (adaLN-Zero): stays zero       1/m    --
final.adaln.linear (kernels)
final.linear.kernel                         output  zero (DiT): stays zero              1      input x 1/m
final.linear.bias                           vector  zero                                1      not scaled
==========================================  ======  ==================================  =====  ===============

Attention: the logits are q.k * sqrt(d_base) / d_head instead of q.k / sqrt(d_head) (TP5's 1/d
attention, scaled so that it equals SP at the base head dimension), with d_base = the base
model's head dimension. The base model is the same architecture at width b with the same
number of heads, so d_base = b / num_heads = d_head / m and the multiplier on the logits is
sqrt(d_base / d_head) = 1/sqrt(m); it is applied to the queries after QK-norm and RoPE (every
attention backend keeps its 1/sqrt(d_head)), in self- and cross-attention alike. A sweep that
widens the model by adding heads at a fixed head dimension is not what this rule assumes
(there 1/d_head is a constant and no extra factor is due): it sets ``mup_base_head_dim`` to that
dimension, and the factor becomes sqrt(mup_base_head_dim / d_head) = 1.

The output rule: TP5 Table 3 gives the output weights init var 1/fan_in^2 and Adam LR
1/fan_in; we use its multiplier form (the ``mup`` package's ``MuReadout``): the output layer's
input is multiplied by 1/m (so its kernel's contribution is, its bias's is not) and the kernel
keeps the base Adam LR. With Adam the two give the same updates of the effective output weights
(Adam's step ignores the gradient's scale, up to eps), except that here the kernel decays at the
base rate lr * weight_decay and adds 1/m of its Table-3 gradient to the clipping norm; DiT
zero-initialises the kernel either way.

Weight decay: the multipliers scale the whole AdamW update, decoupled decay included (they act
as a per-parameter learning rate, as ``mup.MuAdamW`` and torch's per-group ``lr`` do), so a
hidden weight decays by lr / m * weight_decay per step. Global-norm clipping is applied to the
raw gradients before Adam, as in SP.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import optax
from flax import nnx

__all__ = ["PARAMETERIZATIONS", "ROLES", "attention_query_scale", "init_factor", "lr_multiplier",
           "lr_multipliers", "output_multiplier", "param_role", "rescale_init", "scale_by_multipliers",
           "width_multiplier"]

PARAMETERIZATIONS = ("sp", "mup")
ROLES = ("input", "hidden", "output", "vector")

# Kernels whose fan-in is not the width (role "input"); their initialiser: "xavier" (std
# depends on the fan-out, i.e. the width) or "fixed" (width-independent std).
_INPUT_KERNELS = {
    ("x_embed", "kernel"): "xavier",
    ("text_embed", "fc1", "kernel"): "xavier",
    ("pooled_text_embed", "kernel"): "xavier",
    ("image_embed", "fc2", "kernel"): "xavier",
    ("t_embed", "fc1", "kernel"): "fixed",  # normal(0.02)
    ("image_embed", "fc1", "kernel"): "fixed",  # image_dim x image_dim: no width in it
    ("label_embed", "embedding"): "fixed",  # normal(0.02)
}
# Hidden (width x width) kernels whose initialiser is not xavier: normal(0.02), or zero (any
# factor leaves zero at zero). Every other hidden kernel is xavier.
_FIXED_STD_HIDDEN = {("t_embed", "fc2", "kernel")}
_OUTPUT_KERNELS = {("final", "linear", "kernel")}
# Width-sized vectors that are not called bias / scale
_VECTORS = {("cond_embed",), ("null_token",), ("modulation",), ("table",), ("pos",)}
_HIDDEN_MODULES = {"attn", "cross_attn", "mlp", "adaln", "t_modulation", "t_embed", "text_embed"}


def width_multiplier(hidden_size: int, base_width: int) -> float:
    """m = hidden_size / base_width (a float; 1.0 exactly when they are equal).

    Raises:
      ValueError: base_width is not a positive integer.
    """
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"mup_base_width must be a positive integer, got {base_width!r}")
    return hidden_size / base_width


def _names(path: Sequence[Any]) -> tuple[str, ...]:
    """The string keys of an NNX path (list indices and jax key objects unwrapped, ints dropped)."""
    out = []
    for k in path:
        k = getattr(k, "key", getattr(k, "idx", k))
        if not isinstance(k, int):
            out.append(str(k))
    return tuple(out)


def param_role(path: Sequence[Any]) -> str:
    """The μP role of the DiT parameter at ``path`` (its ``nnx.state`` path, e.g.
    ``('blocks', 0, 'attn', 'qkv', 'kernel')``): "input", "hidden", "output" or "vector" (see the
    module's table).

    Raises:
      ValueError: a path this module does not know (a new parameter must be given a role here).
    """
    names = _names(path)
    if names in _OUTPUT_KERNELS:
        return "output"
    if names in _INPUT_KERNELS:
        return "input"
    leaf = names[-1] if names else ""
    if leaf in ("bias", "scale") or names[-1:] in _VECTORS:
        return "vector"
    if leaf == "kernel" and set(names[:-1]) & _HIDDEN_MODULES:
        return "hidden"
    raise ValueError(f"no μP role for parameter {'/'.join(names)!r} (sora_jax.models.mup.param_role)")


def lr_multiplier(role: str, width_mult: float) -> float:
    """Adam learning-rate multiplier of a role: 1/m for hidden weights, 1 otherwise."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return 1.0 / width_mult if role == "hidden" else 1.0


def init_factor(path: Sequence[Any], shape: Sequence[int], width_mult: float) -> float:
    """The factor that turns the SP initial value of the parameter at ``path`` (of ``shape``;
    a scanned block's leading layers axis is ignored) into its μP one (module table); 1.0
    for every parameter at m = 1."""
    role, names = param_role(path), _names(path)
    if role == "input" and _INPUT_KERNELS[names] == "xavier":
        fan_in, fan_out = shape[-2], shape[-1]
        return math.sqrt((fan_in + fan_out) / (fan_in + fan_out / width_mult))
    if role == "hidden" and names in _FIXED_STD_HIDDEN:
        return 1.0 / math.sqrt(width_mult)
    return 1.0  # xavier hidden kernels, zero-initialised kernels, width-independent inits, vectors


def _param_state(model_or_state):
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    return model_or_state


def lr_multipliers(model_or_state, width_mult: float):
    """Per-parameter Adam learning-rate multipliers: a tree of Python floats with the structure of
    ``nnx.as_pure(nnx.state(model, nnx.Param))`` (what ``nnx.Optimizer`` hands its transformation),
    1/m on hidden weights and 1 elsewhere.

    Args:
      model_or_state: the DiT, or its ``nnx.state(model, nnx.Param)`` (pure or not).
      width_mult: m (:func:`width_multiplier`).

    Raises:
      ValueError: a parameter without a role (:func:`param_role`).
    """
    pure = nnx.as_pure(_param_state(model_or_state))
    return jax.tree_util.tree_map_with_path(lambda p, _: lr_multiplier(param_role(p), width_mult), pure)


def rescale_init(model: nnx.Module, width_mult: float) -> None:
    """Turns a freshly built SP DiT into its μP initialisation in place (:func:`init_factor` per
    parameter; parameters whose factor is 1 are not touched, so at m = 1 nothing changes)."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.as_pure(state)

    def rescale(path, x):
        f = init_factor(path, x.shape, width_mult)
        return x if f == 1.0 else x * jax.numpy.asarray(f, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(rescale, pure))


def output_multiplier(width_mult: float) -> float:
    """The factor on the output layer's input (``final.linear``): 1/m (MuReadout)."""
    return 1.0 / width_mult


def attention_query_scale(width_mult: float, head_dim: int | None = None,
                          base_head_dim: int | None = None) -> float:
    """The factor on the queries: sqrt(d_base / d_head), so the logits are q.k sqrt(d_base) / d_head
    (module doc). ``base_head_dim`` None: the base model has the same heads, d_base = d_head / m
    and the factor is 1/sqrt(m); given (a family with heads of fixed width sets it to that width):
    sqrt(base_head_dim / head_dim).

    Raises:
      ValueError: ``base_head_dim`` given without ``head_dim``, or not positive.
    """
    if base_head_dim is None:
        return 1.0 / math.sqrt(width_mult)
    if head_dim is None or base_head_dim <= 0:
        raise ValueError(f"base_head_dim {base_head_dim} needs a positive value and the head_dim")
    return math.sqrt(base_head_dim / head_dim)


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's multiplier (a tree of Python floats with the
    structure of the updates, e.g. :func:`lr_multipliers`). Chained after AdamW it acts as a
    per-parameter learning rate on the whole AdamW step, decoupled weight decay included.
    Stateless. A multiplier of 1.0 leaves its update bitwise unchanged.

    Raises:
      ValueError: (at update) the updates' tree structure differs from the multipliers'.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda m, u: u * m if m != 1.0 else u, multipliers, updates), state

    return optax.GradientTransformation(init_fn, update_fn)
