"""Maps from a reference checkpoint's tensors (PyTorch layout, e.g. diffusers / transformers
safetensors) to this package's NNX parameters: one :class:`Target` per parameter of ours.

A target names our parameter by its NNX state path, the reference keys it is built from (one,
or several for a fused parameter such as our qkv projection from to_q / to_k / to_v) and the
conversion from their layout to ours. The importer (:mod:`sora_jax.interop.importer`) reads the
sources of one target at a time, so the peak memory is one parameter, not the model; the
exporter inverts each conversion (``Target.split``).

Layouts: torch ``nn.Linear.weight`` is (out, in), our ``nnx.Linear`` kernel is (in, out);
torch ``nn.Conv3d.weight`` is (out, in, kt, kh, kw), ours (kt, kh, kw, in, out); a Conv3d
whose kernel equals its stride is a Linear over patchified tokens, whose (pt, ph, pw, c) order
is :func:`sora_jax.data.packing.patchify`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Target",
    "check_complete",
    "converted_shape",
    "register_shape",
    "conv_kernel",
    "copy",
    "fused_linear_bias",
    "fused_linear_kernel",
    "linear_kernel",
    "load",
    "reference_shapes",
    "param_shapes",
    "patch_kernel",
]

Convert = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Target:
    """One parameter of ours and how to build it from reference tensors.

    Attributes:
      path: the parameter's NNX state path (as ``nnx.to_flat_state`` yields it), e.g.
        ``("blocks", 0, "attn", "qkv", "kernel")``.
      sources: the reference keys, in the order ``convert`` takes them.
      convert: reference arrays (torch layout, numpy) -> our array.
      split: optional inverse, our array -> the reference arrays (for export); None where the
        conversion is not invertible or export is not needed.
    """

    path: tuple
    sources: tuple[str, ...]
    convert: Convert
    split: Callable[[np.ndarray], Sequence[np.ndarray]] | None = None


_SHAPES: dict[Callable, Callable[[Sequence[tuple[int, ...]]], tuple[int, ...]]] = {}


def register_shape(shape_fn: Callable[[Sequence[tuple[int, ...]]], tuple[int, ...]]):
    """Decorator: records how a conversion maps source shapes to our shape, so key maps can be
    checked against shape manifests without reading (or allocating) any tensor."""
    def wrap(convert: Convert) -> Convert:
        _SHAPES[convert] = shape_fn
        return convert
    return wrap


def converted_shape(convert: Convert, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Our shape after ``convert`` of sources with ``shapes``.

    Raises:
      KeyError: ``convert`` was not registered with :func:`register_shape`.
    """
    if convert not in _SHAPES:
        raise KeyError(f"conversion {getattr(convert, '__name__', convert)} has no registered shape rule")
    return tuple(int(d) for d in _SHAPES[convert]([tuple(s) for s in shapes]))


@register_shape(lambda s: s[0])
def copy(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The one source as it is (biases, norm scales, tables)."""
    (a,) = arrays
    return np.asarray(a)


@register_shape(lambda s: s[0][::-1])
def linear_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch Linear weight (out, in) -> nnx.Linear kernel (in, out)."""
    (w,) = arrays
    return np.ascontiguousarray(np.asarray(w).T)


@register_shape(lambda s: (s[0][1], sum(x[0] for x in s)))
def fused_linear_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Several torch Linear weights (out_i, in) over the same input -> one kernel
    (in, sum out_i), outputs in the order given (e.g. to_q, to_k, to_v -> qkv)."""
    return np.ascontiguousarray(np.concatenate([np.asarray(w) for w in arrays], axis=0).T)


@register_shape(lambda s: (sum(x[0] for x in s),))
def fused_linear_bias(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The biases of :func:`fused_linear_kernel`'s Linears, concatenated in the same order."""
    return np.concatenate([np.asarray(b) for b in arrays], axis=0)


@register_shape(lambda s: (*s[0][2:], s[0][1], s[0][0]))
def conv_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch ConvNd weight (out, in, *k) -> channels-last kernel (*k, in, out)."""
    (w,) = arrays
    w = np.asarray(w)
    return np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2)))


@register_shape(lambda s: (int(np.prod(s[0][1:])), s[0][0]))
def patch_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch Conv3d weight (out, c, pt, ph, pw) with kernel = stride -> the Linear kernel
    (pt * ph * pw * c, out) over patchified tokens in (pt, ph, pw, c) order."""
    (w,) = arrays
    w = np.asarray(w)
    out = w.shape[0]
    return np.ascontiguousarray(np.transpose(w, (2, 3, 4, 1, 0)).reshape(-1, out))


def zeros(shape: Sequence[int]) -> Convert:
    """A conversion with no source: a parameter of ours that the reference does not have and
    whose zero value leaves the function unchanged (e.g. an added context-flag embedding)."""
    shape = tuple(int(d) for d in shape)

    @register_shape(lambda _: shape)
    def convert(arrays: Sequence[np.ndarray]) -> np.ndarray:
        if len(arrays):
            raise ValueError(f"a zeros conversion takes no source, got {len(arrays)}")
        return np.zeros(shape, np.float32)

    return convert


def check_complete(targets: Iterable[Target], ours: Mapping[tuple, tuple[int, ...]],
                   reference: Mapping[str, tuple[int, ...]], *, ignored: Iterable[str] = (),
                   check_shapes: bool = True) -> list[str]:
    """Every problem between a key map and a pair of models, as readable lines (empty: none).

    Args:
      targets: the key map.
      ours: our parameters' paths -> shapes.
      reference: the reference checkpoint's keys -> shapes.
      ignored: reference keys that are known not to be parameters of ours (buffers, unused
        heads); anything else the map does not read is reported as unexpected.
      check_shapes: compare our shapes with :func:`converted_shape` of the sources' (no
        tensor is read).

    Returns:
      lines naming missing reference keys, unexpected reference keys, our parameters no
      target fills (or fills twice), targets for parameters we do not have, and shape
      mismatches.
    """
    problems, used, filled = [], set(), {}
    ignored = set(ignored)
    for t in targets:
        if t.path not in ours:
            problems.append(f"map target {'.'.join(map(str, t.path))} is not a parameter of this model")
        if t.path in filled:
            problems.append(f"parameter {'.'.join(map(str, t.path))} is filled twice")
        filled[t.path] = t
        for s in t.sources:
            if s not in reference:
                problems.append(f"missing reference key {s} (for {'.'.join(map(str, t.path))})")
            used.add(s)
        if check_shapes and t.path in ours and all(s in reference for s in t.sources):
            got = converted_shape(t.convert, [reference[s] for s in t.sources])
            if got != tuple(ours[t.path]):
                problems.append(f"shape mismatch for {'.'.join(map(str, t.path))}: reference "
                                f"{[tuple(reference[s]) for s in t.sources]} -> {got}, ours {tuple(ours[t.path])}")
    for p in ours:
        if p not in filled:
            problems.append(f"parameter {'.'.join(map(str, p))} has no reference key")
    for k in reference:
        if k not in used and k not in ignored:
            problems.append(f"unexpected reference key {k}")
    return problems


def param_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
    """Our parameters' NNX state paths -> shapes (``nnx.Param`` only; works on abstract
    models from ``nnx.eval_shape``)."""
    return {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def reference_shapes(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """key -> shape of reference tensors; a lazy reader
    (:class:`sora_jax.safetensors_files.SafetensorsReader`) answers from its headers, without
    reading any tensor."""
    if hasattr(tensors, "shapes"):
        return {k: tuple(v) for k, v in tensors.shapes().items()}
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


def load(model: nnx.Module, targets: Sequence[Target], tensors: Mapping[str, np.ndarray], *,
         ignored: Iterable[str] = (), what: str = "checkpoint",
         place: Callable[[tuple, np.ndarray, nnx.Variable], object] | None = None) -> nnx.Module:
    """``model`` with every parameter built from reference ``tensors`` through ``targets``.

    Every key is checked first (:func:`check_complete`, shapes from :func:`reference_shapes`),
    so a mismatch is reported whole before anything is read; then one target at a time is read,
    converted, cast to the parameter's dtype and placed, so the peak memory beyond the result
    is one parameter's sources.

    Args:
      model: a concrete model or an abstract one (``nnx.eval_shape``: nothing is allocated
        before the real values arrive); it is not modified.
      targets: the key map.
      tensors: reference key -> array in torch layout (a dict, or a lazy reader).
      ignored: reference keys that are known not to be parameters of ours.
      what: the checkpoint's name for error messages.
      place: optional (path, converted array, our variable) -> array, e.g. a
        ``jax.device_put`` onto the parameter's sharding (each host then holds only its
        shards); None: ``jnp.asarray`` on the default device.

    Returns:
      a new model of the same graph holding the reference's values.

    Raises:
      ValueError: every problem :func:`check_complete` finds, in one message; or a converted
        array whose shape is not our parameter's.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    shapes = {tuple(path): tuple(var.shape) for path, var in flat.items()}
    problems = check_complete(targets, shapes, reference_shapes(tensors), ignored=ignored)
    if problems:
        raise ValueError(f"{what} does not match this model ({len(problems)} problems):\n  " + "\n  ".join(problems))
    filled = []
    for t in targets:
        var = flat[t.path]
        value = t.convert([tensors[s] for s in t.sources])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{what}: {'.'.join(map(str, t.path))} converts to {value.shape}, ours is {var.shape}")
        value = np.asarray(value).astype(var.dtype, copy=False)
        filled.append((t.path, var.replace(place(t.path, value, var) if place else jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)
