"""Named accelerator topologies: device count, memory per device and peak FLOP/s.

Used by the ahead-of-time compile check (:mod:`sora_jax.train.aot`) to size a simulated
mesh and to say whether a run fits, and by MFU (model FLOPs / (step time x devices x peak)).

Peak dense bf16 FLOP/s per device (chip) and memory, from the vendors' data sheets:
Cloud TPU v4 275 TFLOP/s, 32 GiB HBM; v5e 197 TFLOP/s, 16 GiB; v5p 459 TFLOP/s, 95 GiB;
v6e (Trillium) 918 TFLOP/s, 32 GiB; NVIDIA A100 SXM 312 TFLOP/s, 80 GB; H100 SXM 989 TFLOP/s
(without sparsity), 80 GB; H200 989 TFLOP/s, 141 GB. TPU slice names count TensorCores for
v4 / v5p (two per chip: ``v5p-64`` is 32 chips) and chips for v5e / v6e, as Google names them.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024 ** 3
GB = 1000 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind: memory in bytes, peak dense bf16 FLOP/s, cores per chip in names."""

    platform: str
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip_in_name: int = 1


CHIPS = {
    "v4": Chip("tpu", 32 * GIB, 275e12, 2),
    "v5e": Chip("tpu", 16 * GIB, 197e12, 1),
    "v5litepod": Chip("tpu", 16 * GIB, 197e12, 1),
    "v5p": Chip("tpu", 95 * GIB, 459e12, 2),
    "v6e": Chip("tpu", 32 * GIB, 918e12, 1),
    "a100": Chip("gpu", 80 * GB, 312e12),
    "h100": Chip("gpu", 80 * GB, 989e12),
    "h200": Chip("gpu", 141 * GB, 989e12),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: ``num_devices`` chips of kind ``chip``."""

    name: str
    chip: Chip
    num_devices: int


def parse(name: str) -> Topology:
    """``v5p-64`` (TPU slice), ``h100x8`` / ``h100-8`` (GPUs), ``h100x8x16`` (16 hosts of 8 GPUs).

    Raises:
      ValueError: an unknown chip or malformed name (the message lists the chips).
    """
    m = re.fullmatch(r"([a-z0-9]+?)[-x](\d+)(?:x(\d+))?", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"unknown topology {name!r}: use <chip>-<n> or <chip>x<n>[x<hosts>], "
                         f"chip one of {sorted(CHIPS)} (e.g. v5p-64, h100x8)")
    chip = CHIPS[m.group(1)]
    n = int(m.group(2)) * int(m.group(3) or 1)
    if chip.platform == "tpu":
        if n % chip.cores_per_chip_in_name:
            raise ValueError(f"{name}: {m.group(1)} slices count {chip.cores_per_chip_in_name} cores per chip")
        n //= chip.cores_per_chip_in_name
    if n < 1:
        raise ValueError(f"{name}: no devices")
    return Topology(name, chip, n)
