"""Maps from a reference checkpoint's tensors (PyTorch layout, e.g. diffusers / transformers
safetensors) to this package's NNX parameters: one :class:`Target` per parameter of ours.

A target names our parameter by its NNX state path, the reference keys it is built from (one,
or several for a fused parameter such as our qkv projection from to_q / to_k / to_v) and the
conversion from their layout to ours. The importer (:mod:`sora_jax.interop.diffusers_import`)
reads the sources of one target at a time, so the peak memory is one parameter, not the model;
the exporter (:mod:`sora_jax.interop.weights_export`) inverts each conversion through the
inverse registered next to it (:func:`register_inverse`, :func:`invert`), one target at a time
too.

Layouts: torch ``nn.Linear.weight`` is (out, in), our ``nnx.Linear`` kernel is (in, out);
torch ``nn.Conv3d.weight`` is (out, in, kt, kh, kw), ours (kt, kh, kw, in, out); a Conv3d
whose kernel equals its stride is a Linear over patchified tokens, whose (pt, ph, pw, c) order
is :func:`sora_jax.data.packing.patchify`'s.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Target",
    "check_complete",
    "converted_shape",
    "has_inverse",
    "invert",
    "invert_target",
    "inverse_shapes",
    "register_inverse",
    "register_shape",
    "reference_shapes_for",
    "split_rows",
    "split_sizes",
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
      split: optional inverse of this target alone, our array -> the reference arrays; None:
        the inverse registered for ``convert`` (:func:`register_inverse`), which export uses.
        Where set, :func:`invert_target` uses it for the values and checks them against the
        registered inverse's shapes.
    """

    path: tuple
    sources: tuple[str, ...]
    convert: Convert
    split: Callable[[np.ndarray], Sequence[np.ndarray]] | None = None


# Keyed weakly: key maps make closures per call (e.g. wan_dit's RoPE-permuted q / k converters),
# which should not stay alive for the life of the process once their map is dropped.
_SHAPES: "weakref.WeakKeyDictionary[Callable, Callable[[Sequence[tuple[int, ...]]], tuple[int, ...]]]" = (
    weakref.WeakKeyDictionary())


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


Shapes = Sequence[tuple[int, ...]]
# (our shape, the reference shapes known beforehand, one per source or None) -> reference shapes
InverseShape = Callable[[tuple[int, ...], Sequence[tuple[int, ...] | None]], Shapes]
# (our array, the reference shapes InverseShape gave) -> the reference arrays, in source order
Inverse = Callable[[np.ndarray, Shapes], Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class _Inverse:
    shapes: InverseShape
    values: Inverse


_INVERSES: "weakref.WeakKeyDictionary[Callable, _Inverse]" = weakref.WeakKeyDictionary()


def register_inverse(convert: Convert, shapes: InverseShape):
    """Decorator: records the inverse of ``convert`` for export (our array -> the reference
    arrays it was built from), with its shape rule, so an export plans every file's header (keys,
    shapes) before reading any tensor.

    Args:
      convert: the forward conversion (registered with :func:`register_shape`).
      shapes: (our shape, known) -> the sources' shapes; ``known`` holds, per source, the shape
        the caller knows (None: unknown), for layouts our shape alone does not determine (a patch
        kernel's (pt, ph, pw, c) split); the rule raises ValueError naming what it lacks.

    The decorated function takes (our array, the sources' shapes) and returns the sources'
    arrays, in source order, in our array's dtype; applying ``convert`` to them gives our array
    back bitwise (every registered inverse is a pure re-layout: no arithmetic).
    """
    def wrap(values: Inverse) -> Inverse:
        _INVERSES[convert] = _Inverse(shapes, values)
        return values
    return wrap


def has_inverse(convert: Convert) -> bool:
    """Whether ``convert`` has a registered inverse (:func:`register_inverse`)."""
    return convert in _INVERSES


def inverse_shapes(target: "Target", ours: Sequence[int],
                   known: Mapping[str, Sequence[int]] | None = None) -> list[tuple[int, ...]]:
    """The reference shapes of ``target.sources`` for our parameter of shape ``ours``, checked:
    converting sources of these shapes gives ``ours`` (:func:`converted_shape`).

    Args:
      target: the key-map entry.
      ours: our parameter's shape.
      known: reference key -> shape, for sources whose layout our shape does not determine.

    Raises:
      KeyError: the conversion has no registered inverse.
      ValueError: the inverse needs a shape ``known`` lacks, or the shapes do not convert back
        to ``ours``.
    """
    name = ".".join(map(str, target.path))
    if target.convert not in _INVERSES:
        raise KeyError(f"{name}: conversion {getattr(target.convert, '__name__', target.convert)} has no "
                       "registered inverse")
    known = known or {}
    given = [tuple(int(d) for d in known[s]) if s in known else None for s in target.sources]
    try:
        shapes = [tuple(int(d) for d in s) for s in _INVERSES[target.convert].shapes(tuple(ours), given)]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if len(shapes) != len(target.sources):
        raise ValueError(f"{name}: the inverse gives {len(shapes)} shapes for {len(target.sources)} sources")
    back = converted_shape(target.convert, shapes)
    if back != tuple(ours):
        raise ValueError(f"{name}: reference shapes {shapes} convert to {back}, ours is {tuple(ours)}")
    return shapes


def reference_shapes_for(targets: Iterable["Target"], ours: Mapping[tuple, Sequence[int]],
                         known: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Reference key -> shape that an export of parameters with shapes ``ours`` (path -> shape)
    through ``targets`` writes (:func:`inverse_shapes` of each target); nothing is read.

    Raises:
      ValueError: every problem in one message: targets for paths ``ours`` lacks, conversions
        without an inverse or whose inverse lacks a ``known`` shape, a key written twice.
    """
    out: dict[str, tuple[int, ...]] = {}
    problems = []
    for t in targets:
        name = ".".join(map(str, t.path))
        if t.path not in ours:
            problems.append(f"map target {name} is not a parameter of this model")
            continue
        try:
            shapes = inverse_shapes(t, ours[t.path], known)
        except (KeyError, ValueError) as err:
            problems.append(str(err).strip("'\""))
            continue
        for s, shape in zip(t.sources, shapes):
            if s in out:
                problems.append(f"reference key {s} is written twice (again by {name})")
            out[s] = shape
    if problems:
        raise ValueError(f"cannot invert this key map ({len(problems)} problems):\n  " + "\n  ".join(problems))
    return out


def invert_target(target: "Target", ours: np.ndarray,
                  known: Mapping[str, Sequence[int]] | None = None) -> list[np.ndarray]:
    """The reference arrays (``target.sources`` order, torch layout, our array's dtype) that
    ``target.convert`` turns into ``ours``.

    Raises:
      KeyError, ValueError: as :func:`inverse_shapes`; or an inverse whose output does not have
        the planned shapes.
    """
    ours = np.asarray(ours)
    shapes = inverse_shapes(target, ours.shape, known)
    if target.split is not None:
        arrays = [np.asarray(a) for a in target.split(ours)]
    else:
        arrays = [np.asarray(a) for a in _INVERSES[target.convert].values(ours, shapes)]
    got = [tuple(a.shape) for a in arrays]
    if got != shapes:
        raise ValueError(f"{'.'.join(map(str, target.path))}: the inverse gave {got}, planned {shapes}")
    return arrays


def invert(targets: Iterable["Target"], ours: Mapping[tuple, Any],
           known: Mapping[str, Sequence[int]] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(reference key, array) for every source of ``targets``, built from our parameters: the
    inverse of :func:`load`. One target at a time: each of our arrays is read (``np.asarray``:
    a device array is copied to host then) when its target is reached and dropped after its
    sources are yielded, so the peak memory is one parameter and its reference arrays.

    Args:
      targets: the key map (the one :func:`load` imports with).
      ours: our parameter path -> array (numpy or jax).
      known: reference key -> shape where the layout needs it (see :func:`register_inverse`).

    Raises:
      KeyError: a target's path is not in ``ours``, or its conversion has no inverse.
      ValueError: as :func:`invert_target`.
    """
    for t in targets:
        for key, a in zip(t.sources, invert_target(t, ours[t.path], known)):
            yield key, a


def _given(known: Sequence[tuple[int, ...] | None], what: str) -> list[tuple[int, ...]]:
    if any(k is None for k in known):
        raise ValueError(f"the reference shape is needed to invert {what} (pass it in `known`)")
    return list(known)  # type: ignore[arg-type]


def split_sizes(total: int, known: Sequence[tuple[int, ...] | None], what: str) -> list[int]:
    """Output widths of a fused Linear's parts: the known sources' first dimensions; otherwise
    equal parts (q / k / v and k / v are all our fused Linears)."""
    if all(k is not None for k in known):
        return [int(k[0]) for k in known]  # type: ignore[index]
    if total % len(known):
        raise ValueError(f"{what}: {total} outputs do not split into {len(known)} equal parts; "
                         "pass the reference shapes")
    return [total // len(known)] * len(known)


@register_shape(lambda s: s[0])
def copy(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The one source as it is (biases, norm scales, tables)."""
    (a,) = arrays
    return np.asarray(a)


@register_inverse(copy, lambda ours, known: [known[0] or ours])
def _copy_inverse(a: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    return [np.asarray(a).reshape(shapes[0])]


@register_shape(lambda s: s[0][::-1])
def linear_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch Linear weight (out, in) -> nnx.Linear kernel (in, out)."""
    (w,) = arrays
    return np.ascontiguousarray(np.asarray(w).T)


@register_inverse(linear_kernel, lambda ours, known: [ours[::-1]])
def _linear_kernel_inverse(k: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.asarray(k).T)]


@register_shape(lambda s: (s[0][1], sum(x[0] for x in s)))
def fused_linear_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Several torch Linear weights (out_i, in) over the same input -> one kernel
    (in, sum out_i), outputs in the order given (e.g. to_q, to_k, to_v -> qkv)."""
    return np.ascontiguousarray(np.concatenate([np.asarray(w) for w in arrays], axis=0).T)


def split_rows(a: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """``a`` cut along its first axis into parts of ``sizes`` rows, each its own contiguous array
    (so dropping one part frees it)."""
    edges = np.cumsum([0, *sizes])
    return [np.ascontiguousarray(a[edges[i]:edges[i + 1]]) for i in range(len(sizes))]


@register_inverse(fused_linear_kernel, lambda ours, known: [
    (n, ours[0]) for n in split_sizes(ours[1], known, "fused_linear_kernel")])
def _fused_linear_kernel_inverse(k: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    return split_rows(np.asarray(k).T, [s[0] for s in shapes])


@register_shape(lambda s: (sum(x[0] for x in s),))
def fused_linear_bias(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The biases of :func:`fused_linear_kernel`'s Linears, concatenated in the same order."""
    return np.concatenate([np.asarray(b) for b in arrays], axis=0)


@register_inverse(fused_linear_bias, lambda ours, known: [
    (n,) for n in split_sizes(ours[0], known, "fused_linear_bias")])
def _fused_linear_bias_inverse(b: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    return split_rows(np.asarray(b), [s[0] for s in shapes])


@register_shape(lambda s: (*s[0][2:], s[0][1], s[0][0]))
def conv_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch ConvNd weight (out, in, *k) -> channels-last kernel (*k, in, out)."""
    (w,) = arrays
    w = np.asarray(w)
    return np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2)))


@register_inverse(conv_kernel, lambda ours, known: [(ours[-1], ours[-2], *ours[:-2])])
def _conv_kernel_inverse(k: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    return [np.ascontiguousarray(np.moveaxis(np.asarray(k), (-1, -2), (0, 1)))]


@register_shape(lambda s: (int(np.prod(s[0][1:])), s[0][0]))
def patch_kernel(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """torch Conv3d weight (out, c, pt, ph, pw) with kernel = stride -> the Linear kernel
    (pt * ph * pw * c, out) over patchified tokens in (pt, ph, pw, c) order."""
    (w,) = arrays
    w = np.asarray(w)
    out = w.shape[0]
    return np.ascontiguousarray(np.transpose(w, (2, 3, 4, 1, 0)).reshape(-1, out))


# our (pt * ph * pw * c, out) does not say how its rows factor: the reference shape must be known
@register_inverse(patch_kernel, lambda ours, known: _given(known, "a patch kernel (its (pt, ph, pw, c) split)"))
def _patch_kernel_inverse(k: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    out, c, pt, ph, pw = shapes[0]
    return [np.ascontiguousarray(np.transpose(np.asarray(k).reshape(pt, ph, pw, c, out), (4, 3, 0, 1, 2)))]


def zeros(shape: Sequence[int]) -> Convert:
    """A conversion with no source: a parameter of ours that the reference does not have and
    whose zero value leaves the function unchanged (e.g. an added context-flag embedding)."""
    shape = tuple(int(d) for d in shape)

    @register_shape(lambda _: shape)
    def convert(arrays: Sequence[np.ndarray]) -> np.ndarray:
        if len(arrays):
            raise ValueError(f"a zeros conversion takes no source, got {len(arrays)}")
        return np.zeros(shape, np.float32)

    # a parameter the reference does not have: exported as nothing, which is exact only while
    # it is still zero (training may have moved it)
    @register_inverse(convert, lambda ours, known: [])
    def inverse(a: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
        if np.any(np.asarray(a) != 0):
            raise ValueError("a parameter the reference has no key for is not zero: exporting it would "
                             "change the model")
        return []

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
