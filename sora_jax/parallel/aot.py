"""Ahead-of-time compile of the DiT train step for a topology we do not have.

``sora-jax aot-compile --config ... --topology v5p-64`` builds the model and optimizer
abstractly (``nnx.eval_shape``: no weights in memory), lays them out on a mesh of as many
simulated CPU devices as the topology has chips (``--xla_force_host_platform_device_count``),
compiles one training step for an abstract packed batch, and reports what XLA planned per
device: memory (``compiled.memory_analysis()``: arguments + outputs - donated aliases +
temporaries) and FLOPs (``compiled.cost_analysis()``), next to the analytic model FLOPs. It
exits non-zero when the per-device bytes exceed the chip's memory, before any pod time is
spent (the idea of MaxText's ``train_compile``).

The plan is the CPU compiler's: TPU / GPU compilers fuse and lay out differently, so treat
the bytes as an estimate of the same sharding (parameters, optimizer state and the batch
are exact; activations and temporaries are close when remat and the attention backend are
the same). Attention is compiled with the config's backend, except ``auto``, which
becomes ``chunked`` (memory-efficient on every platform).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from sora_jax.parallel.sharding import batch_spec


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
    import time

    from sora_jax.stages import build_dit, dit_in_dim
    from sora_jax.train.steps import dit_loss_fn
    from sora_jax.train.trainer import TrainStep, make_optimizer

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.dit.get("attention_backend", "xla") == "auto":
        cfg.dit.attention_backend = "chunked"
    tx, schedule = make_optimizer(cfg.dit_train)

    def build():
        model = build_dit(cfg)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(build)
    step = TrainStep(model, optimizer, dit_loss_fn(cfg.flow, cfg.get("conditioning")), schedule,
                     int(cfg.dit_train.seed), mesh=mesh, rules=rules)
    batch = abstract_batch(mesh, rules, rows=rows, seq_len=seq_len, text_len=text_len,
                           in_dim=dit_in_dim(cfg), text_dim=int(cfg.dit.get("text_dim", 384)))
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


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA counts for one run of a compiled program (per device), or None where the
    backend reports none. A loop body is counted once, whatever its trip count."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
