"""The device mesh of a run, sized from its config.

``mesh`` config section (``configs/common.py: mesh_section``)::

    ici = {data, fsdp, context, tensor}   sizes within a slice (TPU ICI / one GPU host's NVLink)
    dcn = {data, fsdp, context, tensor}   sizes across slices / hosts (data-centre network)
    rules = [(logical axis, mesh axes), ...]   see sora_jax.parallel.axes

One entry of ``ici`` (and of ``dcn``) may be -1: it takes every device left. Across slices
the mesh is hybrid (``jax.experimental.mesh_utils.create_hybrid_device_mesh``): each mesh
axis is the product of its DCN and ICI sizes, DCN-major, so collectives over an axis with a
DCN size of 1 stay on the fast interconnect. Slices are TPU slices (``device.slice_index``)
when the devices have them, otherwise processes (one GPU host each).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sora_jax.parallel.axes import MESH_AXES


class MeshError(ValueError):
    """A mesh configuration that does not fit the devices."""


def fill_sizes(sizes: Mapping[str, int], total: int, what: str) -> tuple[int, ...]:
    """Sizes of :data:`MESH_AXES` from a config mapping with at most one -1, multiplying to ``total``.

    Raises:
      MeshError: an unknown axis, more than one -1, a size < 1, or a product that does not
        match ``total`` (the message names the config entry and the device count).
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"mesh.{what} has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    values = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, v in enumerate(values) if v == -1]
    if len(fill) > 1 or any(v < 1 for v in values if v != -1):
        raise MeshError(f"mesh.{what} = {dict(zip(MESH_AXES, values))}: sizes must be >= 1, "
                        "with at most one -1")
    known = int(np.prod([v for v in values if v != -1]))
    if fill:
        if total % known:
            raise MeshError(f"mesh.{what} = {dict(zip(MESH_AXES, values))}: {total} devices are "
                            f"not divisible by the fixed sizes' product {known}")
        values[fill[0]] = total // known
    if int(np.prod(values)) != total:
        raise MeshError(f"mesh.{what} = {dict(zip(MESH_AXES, values))} has "
                        f"{int(np.prod(values))} devices, but there are {total}")
    return tuple(values)


def _granules(devices: Sequence[Any]) -> list[int]:
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        return sorted({d.slice_index for d in devices})
    return sorted({d.process_index for d in devices})


def create_mesh(cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "context", "tensor")``.

    Args:
      cfg: the ``mesh`` config section (mapping-like with ``ici`` and optional ``dcn``).
      devices: defaults to ``jax.devices()`` (all processes' devices).

    Returns:
      A mesh of Auto axis types (sharding is propagated by XLA from the constraints we set).

    Raises:
      MeshError: the sizes do not fit the devices (see :func:`fill_sizes`).
    """
    devices = list(jax.devices() if devices is None else devices)
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    granules = _granules(devices)
    per_granule = len(devices) // len(granules)
    dcn = fill_sizes(dict(get("dcn", None) or {}), len(granules), "dcn")
    if len(granules) == 1:
        ici = fill_sizes(dict(get("ici")), len(devices), "ici")
        return jax.make_mesh(ici, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    from jax.experimental import mesh_utils

    ici = fill_sizes(dict(get("ici")), per_granule, "ici")
    arr = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=getattr(devices[0], "slice_index", None) is None)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """One log line: ``data=2 fsdp=4 context=1 tensor=1 (8 devices, cpu)``."""
    sizes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"{sizes} ({mesh.size} devices, {mesh.devices.flat[0].platform})"
