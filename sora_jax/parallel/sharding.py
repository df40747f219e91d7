"""Placing parameters, optimizer state, batches and activations on a mesh by logical names.

Parameters carry their logical axis names as ``out_sharding`` metadata
(:func:`partitioned`, Flax's ``nnx.with_partitioning`` without eager placement); optimizer
state inherits them. :func:`state_shardings` resolves them with the run's rules
(:mod:`sora_jax.parallel.axes`). Inside :func:`activate`, :func:`constrain` pins activations
to their logical layout; outside it (one device, tests, sampling) it does nothing, so model
code runs unchanged everywhere.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sora_jax.parallel.axes import BATCH, logical_to_spec, normalize_rules


def partitioned(init, names: Sequence[str | None]):
    """An initializer whose Variable carries logical axis ``names`` (one per dimension).

    ``nnx.with_partitioning`` with ``eager_sharding=False``: the value is created where it is
    computed and placed later by :func:`state_shardings`, so models build identically on
    one device and inside a mesh.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


class _Active(threading.local):
    mesh: Mesh | None = None
    rules: dict[str, tuple[str, ...]] | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Any) -> Iterator[None]:
    """Makes :func:`constrain` pin activations on ``mesh`` with ``rules`` (while tracing)."""
    prev = (_ACTIVE.mesh, _ACTIVE.rules)
    _ACTIVE.mesh, _ACTIVE.rules = mesh, normalize_rules(rules)
    try:
        yield
    finally:
        _ACTIVE.mesh, _ACTIVE.rules = prev


def active_mesh() -> tuple[Mesh | None, dict[str, tuple[str, ...]] | None]:
    """The (mesh, rules) of the innermost :func:`activate`, or (None, None)."""
    return _ACTIVE.mesh, _ACTIVE.rules


def spec(names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec | None:
    """The active PartitionSpec of an array with logical ``names``; None outside :func:`activate`."""
    if _ACTIVE.mesh is None:
        return None
    return logical_to_spec(names, _ACTIVE.rules, shape, dict(_ACTIVE.mesh.shape))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical layout inside :func:`activate`;
    the identity outside it.

    Args:
      x: array with ``len(names)`` dimensions.
      names: one logical name (or None) per dimension.
    """
    s = spec(names, x.shape)
    if s is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVE.mesh, s))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_spec(v: nnx.Variable, rules: Mapping[str, tuple[str, ...]], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of a Variable from its ``out_sharding`` names (replicated without)."""
    names = v.get_metadata().get("out_sharding")
    value = v.get_value()
    shape = value.shape if hasattr(value, "shape") else np.shape(value)
    if not names:
        return PartitionSpec()
    return logical_to_spec(names, rules, shape, dict(mesh.shape))


def state_shardings(state: Any, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for an NNX state tree (model, optimizer), Variable for Variable.

    Args:
      state: ``nnx.state(...)`` / the state half of ``nnx.split``.
      mesh: the run's mesh.
      rules: logical-axis rules (see :func:`sora_jax.parallel.axes.normalize_rules`).

    Returns:
      The same tree with each Variable's value replaced by its ``NamedSharding``: usable as
      ``jax.jit`` in/out shardings and with ``jax.device_put``.
    """
    rules = normalize_rules(rules)
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, variable_spec(v, rules, mesh)))
                        if _is_var(v) else NamedSharding(mesh, PartitionSpec()), state, is_leaf=_is_var)


def place(tree: Any, shardings: Any) -> Any:
    """Puts every value of ``tree`` on its sharding in ``shardings`` (a matching tree).

    Works across processes: each process passes the same values (e.g. a model initialised
    from the same seed) and supplies the shards of its own devices
    (``jax.make_array_from_callback``). A value already on its sharding is kept as it is.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def create_sharded(build: Callable[[], Any], mesh: Mesh, rules: Any) -> Any:
    """Builds an NNX module (``build()``) with every value created on its own shards.

    The initialisation runs under ``jax.jit`` with ``out_shardings`` from the parameters'
    logical axis names (:func:`state_shardings`), so no host or device ever holds the whole
    model: how a 14B-parameter model starts on a pod. Every process calls it alike. The
    values are those ``build()`` makes eagerly, up to the compiler's floating-point rounding
    of the initialisers.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def place_objects(objects: Any, mesh: Mesh, rules: Any) -> None:
    """Moves the state of NNX objects (a model, an optimizer, or a tuple of them) onto ``mesh``
    in place, each Variable by its logical axis names (:func:`state_shardings`)."""
    state = nnx.state(objects)
    nnx.update(objects, place(state, state_shardings(state, mesh, rules)))


def batch_spec(global_shape: Sequence[int], mesh: Mesh, rules: Any) -> PartitionSpec:
    """Rows (dim 0) over the mesh axes of ``batch``; other dimensions replicated."""
    names = (BATCH,) + (None,) * (len(global_shape) - 1)
    return logical_to_spec(names, normalize_rules(rules), global_shape, dict(mesh.shape))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (``jax.make_array_from_process_local_data``).

    Every process passes its own rows (the same number each); the global batch stacks
    them in process order along dim 0, sharded by :func:`batch_spec`. Scalars (e.g. a
    packer's ``num_dropped`` count) pass through unchanged.

    Raises:
      ValueError: arrays of different row counts.
    """
    rows = {np.shape(v)[0] for v in batch.values() if np.ndim(v)}
    if len(rows) > 1:
        raise ValueError(f"batch arrays have different row counts: { {k: np.shape(v) for k, v in batch.items()} }")
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v
            continue
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        sharding = NamedSharding(mesh, batch_spec(global_shape, mesh, rules))
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def param_bytes_per_device(state: Any, shardings: Any) -> dict[str, float]:
    """Bytes of ``state`` held by the most loaded device, and in total.

    Returns ``{"total": bytes of all values, "max_per_device": the largest per-device sum}``
    (computed from the shardings' shard shapes, without placing anything).
    """
    leaves = jax.tree.leaves(state, is_leaf=_is_var)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding) or _is_var(x))
    total, per_device = 0.0, {}
    for v, s in zip(leaves, shard_leaves):
        value = v.get_value() if _is_var(v) else v
        s = s.get_value() if _is_var(s) else s
        shape, itemsize = np.shape(value), np.dtype(value.dtype).itemsize
        total += float(np.prod(shape)) * itemsize
        shard = s.shard_shape(shape)
        for d in s.mesh.devices.flat:
            per_device[d.id] = per_device.get(d.id, 0.0) + float(np.prod(shard)) * itemsize
    return {"total": total, "max_per_device": max(per_device.values()) if per_device else 0.0}
