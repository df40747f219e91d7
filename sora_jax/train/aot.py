"""Ahead-of-time compile of the DiT train step for a topology we do not have.

``sora-jax aot-compile --config ... --topology v5p-64`` builds the model and optimizer
abstractly (``nnx.eval_shape``: no weights in memory), lays them out on a mesh of as many
simulated CPU devices as the topology has chips (``--xla_force_host_platform_device_count``),
compiles one training step for an abstract packed batch, and reports what XLA planned per
device: memory (``compiled.memory_analysis()``: arguments + outputs - donated aliases +
temporaries; the parameters' EMA included when ``dit_train.ema`` keeps one) and FLOPs
(``compiled.cost_analysis()``), next to the analytic model FLOPs. It
exits non-zero when the per-device bytes exceed the chip's memory, before any pod time is
spent (the idea of MaxText's ``train_compile``).

The plan is the CPU compiler's: TPU / GPU compilers fuse and lay out differently, so treat
the bytes as an estimate of the same sharding (parameters, optimizer state and the batch
are exact; activations and temporaries are close when remat and the attention backend are
the same). Attention is compiled with the config's backend, except ``auto``, which
becomes ``chunked`` (memory-efficient on every platform).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from sora_jax.models.factory import build_dit, dit_in_dim
from sora_jax.models.info import compiled_flops, model_info
from sora_jax.parallel.mesh import create_mesh, describe
from sora_jax.parallel.sharding import batch_spec
from sora_jax.parallel.topologies import parse
from sora_jax.train.steps import dit_loss_fn
from sora_jax.train.ema import EMA
from sora_jax.train.trainer import TrainStep, make_optimizer, skip_nonfinite


def abstract_batch(mesh, rules, *, rows: int, seq_len: int, text_len: int, in_dim: int,
                   text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a packed DiT batch (``sora_jax.data.packing.pack``'s keys), laid out
    over the mesh's batch axes."""
    shapes = {
        "tokens": ((rows, seq_len, in_dim), jnp.float32),
        "segment_ids": ((rows, seq_len), jnp.int32),
        "positions": ((rows, seq_len, 3), jnp.int32),
        "timesteps": ((rows, seq_len), jnp.float32),
        "loss_mask": ((rows, seq_len), jnp.float32),
        "text": ((rows, text_len, text_dim), jnp.float32),
        "text_segment_ids": ((rows, text_len), jnp.int32),
    }
    return {k: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, batch_spec(s, mesh, rules)))
            for k, (s, d) in shapes.items()}


def compile_dit_train_step(cfg: ml_collections.ConfigDict, mesh, rules, *, rows: int,
                           seq_len: int, text_len: int) -> dict[str, Any]:
    """Compiles one DiT training step on ``mesh`` from abstract state and batch.

    Returns:
      ``bytes_per_device`` (arguments + outputs - aliased + temporaries), its parts
      (``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``temp_bytes``),
      ``xla_flops_per_device`` (None where the backend reports none; loops such as the
      block-sparse attention's are counted once by XLA) and ``compile_seconds``.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.dit.attention_backend == "auto":
        cfg.dit.attention_backend = "chunked"
    tx, schedule = make_optimizer(cfg.dit_train)

    with_ema = cfg.dit_train.ema.profile != "none"

    def build():
        model = build_dit(cfg)
        # the EMA is one more copy of the parameters, sharded like them
        ema = EMA(model, cfg.dit_train.ema) if with_ema else None
        return model, nnx.Optimizer(model, skip_nonfinite(tx), wrt=nnx.Param), ema

    model, optimizer, ema = nnx.eval_shape(build)
    step = TrainStep(model, optimizer, dit_loss_fn(cfg.flow, cfg.conditioning), schedule,
                     int(cfg.dit_train.seed), mesh=mesh, rules=rules, ema=ema)
    batch = abstract_batch(mesh, rules, rows=rows, seq_len=seq_len, text_len=text_len,
                           in_dim=dit_in_dim(cfg), text_dim=int(cfg.dit.text_dim))
    t0 = time.time()
    compiled = step.lower(batch).compile()
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    return {
        "bytes_per_device": parts["argument"] + parts["output"] - parts["alias"] + parts["temp"],
        **{f"{k}_bytes": v for k, v in parts.items()},
        "xla_flops_per_device": compiled_flops(compiled),
        "compile_seconds": seconds,
    }


def aot_compile(cfg: ml_collections.ConfigDict, topology: str, *, rows: int | None = None,
                seq_len: int | None = None, hbm_gib: float | None = None) -> dict[str, Any]:
    """``sora-jax aot-compile``: the DiT train step compiled for ``topology`` on this process's
    simulated CPU devices (as many as the topology has chips), with what it costs per device.

    Args:
      cfg: the run config (its ``mesh``, ``dit``, ``dit_train``).
      topology: a name :func:`sora_jax.parallel.topologies.parse` knows (``v5p-64``, ``h100x8``).
      rows / seq_len: global packed rows per step and tokens per row (default
        ``dit_train.batch_size`` / ``dit_train.row_length``).
      hbm_gib: memory budget per device in GiB (default: the chip's).

    Returns:
      :func:`compile_dit_train_step`'s numbers plus ``topology``, ``devices``, ``mesh``,
      ``rows``, ``seq_len``, ``params``, ``hbm_bytes``, ``fits`` (bytes per device within the
      budget), ``model_flops_per_step`` and ``peak_bf16_flops_per_device``.

    Raises:
      ValueError: an unknown topology, or this process has another number of devices.
    """
    topo = parse(topology)
    if jax.device_count() != topo.num_devices:
        raise ValueError(f"{jax.device_count()} devices, {topology} has {topo.num_devices}")
    mesh = create_mesh(cfg.mesh)
    rows = rows or int(cfg.dit_train.batch_size)
    seq_len = seq_len or int(cfg.dit_train.row_length)
    out = compile_dit_train_step(cfg, mesh, cfg.mesh.rules, rows=rows, seq_len=seq_len,
                                 text_len=int(cfg.dit_train.text_length))
    info = model_info(cfg, seq_len=seq_len)
    budget = int(hbm_gib * 2**30) if hbm_gib else topo.chip.hbm_bytes
    out.update(topology=topology, devices=topo.num_devices, mesh=describe(mesh), rows=rows,
               seq_len=seq_len, params=info["params"], hbm_bytes=budget,
               fits=out["bytes_per_device"] <= budget,
               model_flops_per_step=3.0 * info["flops_per_token"] * rows * seq_len,
               peak_bf16_flops_per_device=topo.chip.peak_bf16_flops)
    return out
