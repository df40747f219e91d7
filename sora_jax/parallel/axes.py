"""Logical axis names of parameters and activations, and their resolution to mesh axes.

Models name the dimensions of their parameters and of the activations they constrain with
the names below and nothing else (they know no mesh); a run's config maps each name to mesh
axes (``mesh.rules``, see :data:`DEFAULT_RULES` and ``configs/common.py``). This is the
scheme of t5x / MaxText ("logical axis rules"), written here in one place.

Mesh axes (:data:`MESH_AXES`): ``data`` (pure data parallelism: parameters replicated),
``fsdp`` (data parallelism with parameters and optimizer state sharded, gathered per layer:
ZeRO-3 / FSDP, Rajbhandari et al. 2020), ``context`` (the sequence split across devices,
attention gathers keys / values), ``tensor`` (Megatron tensor parallelism over heads and
MLP width, Shoeybi et al. 2019).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Activations.
BATCH = "batch"  # packed rows
LENGTH = "length"  # latent tokens of a row
TEXT_LENGTH = "text_length"  # text tokens of a row
# Parameters (and activations' feature axes).
EMBED = "embed"  # model width
MLP = "mlp"  # MLP hidden width, adaLN modulation outputs
HEADS = "heads"  # attention heads x head_dim, flattened
IN_FEATURES = "in_features"  # widths owned by the outside world: patch, text encoder, frequencies
NORM = "norm"  # per-feature vectors of norms and learned tokens: replicated
LAYERS = "layers"  # the stacked layer axis of scanned blocks: replicated (each device runs all)

LOGICAL_AXES = (BATCH, LENGTH, TEXT_LENGTH, EMBED, MLP, HEADS, IN_FEATURES, NORM, LAYERS)

# MaxText-style defaults: batch over both data axes, parameters' model width over fsdp,
# heads and MLP width over tensor, the sequence over context. Names without a rule (and
# every activation feature axis, which models leave as None) are replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, ("context",)),
    (EMBED, ("fsdp",)),
    (HEADS, ("tensor",)),
    (MLP, ("tensor",)),
)


def normalize_rules(rules: Iterable[Sequence] | Mapping[str, Sequence[str] | str | None]) -> dict[str, tuple[str, ...]]:
    """Rules as ``{logical name: (mesh axis, ...)}``.

    Accepts pairs ``(name, axes)`` or a mapping, where axes is a mesh axis name, a sequence
    of them, or None / empty (replicated), as they come out of a config.

    Raises:
      ValueError: an unknown logical name or mesh axis, or a name given twice.
    """
    items = rules.items() if isinstance(rules, Mapping) else [tuple(r) for r in rules]
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"a sharding rule is (logical name, mesh axes), got {item!r}")
        name, axes = item
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r} in sharding rules; known: {LOGICAL_AXES}")
        if name in out:
            raise ValueError(f"logical axis {name!r} has two sharding rules")
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {bad}; "
                             f"mesh axes are {MESH_AXES}")
        out[name] = axes
    return out


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, tuple[str, ...]],
                    shape: Sequence[int] | None = None,
                    axis_sizes: Mapping[str, int] | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry logical ``names``.

    Each dimension takes the mesh axes of its rule that no earlier dimension took (a mesh
    axis shards at most one dimension); with ``shape`` and ``axis_sizes``, mesh axes of
    size 1 are dropped, and so are trailing axes that would not divide the dimension
    (that dimension is then split over fewer devices, or replicated).

    Args:
      names: one logical name (or None: replicated) per dimension.
      rules: from :func:`normalize_rules`.
      shape: the array's shape (optional).
      axis_sizes: mesh axis name -> size (optional; ``dict(mesh.shape)``).

    Returns:
      ``PartitionSpec`` with one entry per dimension: None, a mesh axis, or a tuple of them.

    Raises:
      ValueError: ``shape`` given with a different number of dimensions than ``names``.
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for d, name in enumerate(names):
        axes = [a for a in rules.get(name, ()) if a not in used] if name is not None else []
        if axis_sizes is not None:
            axes = [a for a in axes if axis_sizes.get(a, 1) > 1]
            if shape is not None:
                while axes and shape[d] % _product(axis_sizes[a] for a in axes):
                    axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
