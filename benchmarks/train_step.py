"""Training throughput and MFU of the DiT train step for a config and mesh.

Times ``sora_jax.train.trainer.TrainStep`` (the loop's own jitted step: loss, backward,
AdamW, the non-finite guard) on packed rows of ``--seq-len`` tokens, one example per row (so
dense attention FLOPs are exactly the model's), after a compiling warm-up step, and reports:

- ``tokens_per_s``: latent tokens trained per second (all devices);
- ``model_flops_per_step``: 3 x analytic forward FLOPs (:func:`sora_jax.models.dit.
  dit_flops_per_token`: matmuls, 2 per multiply-add) x tokens; remat's recomputation is not
  counted (MFU, not hardware FLOPs utilisation; Chowdhery et al. 2022, PaLM, App. B);
- ``peak_flops``: on CPU, measured in the same run: the best float32 matmul throughput of a
  jitted n x n x n product (n = ``--matmul-n``) on all cores; on GPU / TPU, the chip's dense
  bf16 peak from :mod:`sora_jax.parallel.topologies` (``--chip``, e.g. h100) times devices;
- ``mfu``: model_flops_per_step / step time / peak_flops.

Run: ``python benchmarks/train_step.py`` (DiT-B of ``configs/dit_ladder.py`` at L = 4096,
float32 on CPU: several minutes on 2 cores); ``--config``, ``--seq-len``, ``--rows``,
``--steps``, ``--dtype bfloat16``, ``--remat``, ``--mesh fsdp=8 --devices 8`` (simulated CPU
devices) change it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dit_ladder.py:B")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--attention", default="chunked", help="attention backend")
    p.add_argument("--remat", action="store_true", help="rematerialise blocks (saves memory, costs compute)")
    p.add_argument("--mesh", default="", help="e.g. fsdp=8 or data=2,fsdp=4 (default: all devices on data)")
    p.add_argument("--devices", type=int, default=0, help="simulated CPU devices (sets XLA_FLAGS)")
    p.add_argument("--chip", default="", help="accelerator for the peak (h100, v5p, ...); CPU: measured")
    p.add_argument("--matmul-n", type=int, default=2048)
    return p.parse_args(argv)


def one_example_rows(rows: int, seq_len: int, text_len: int, in_dim: int, text_dim: int, seed: int = 0):
    """Packed rows holding one seq_len-token example each (a (t, 16, 16)-grid layout)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.arange(seq_len)
    pos = np.stack([idx // 256, (idx // 16) % 16, idx % 16], -1).astype(np.int32)
    return {
        "tokens": rng.standard_normal((rows, seq_len, in_dim)).astype(np.float32),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(pos, (rows, seq_len, 3)).copy(),
        "timesteps": np.zeros((rows, seq_len), np.float32),
        "loss_mask": np.ones((rows, seq_len), np.float32),
        "text": rng.standard_normal((rows, text_len, text_dim)).astype(np.float32),
        "text_segment_ids": np.ones((rows, text_len), np.int32),
    }


def main(argv=None) -> dict:
    args = _parse_args(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    from flax import nnx

    from sora_jax import config as config_lib
    from sora_jax.models.info import model_info
    from sora_jax.parallel.mesh import create_mesh, describe
    from sora_jax.parallel.topologies import CHIPS
    from sora_jax.models.factory import build_dit, dit_in_dim
    from sora_jax.train.steps import dit_loss_fn
    from sora_jax.train.throughput import measured_matmul_peak
    from sora_jax.train.trainer import TrainStep, make_optimizer, skip_nonfinite

    cfg = config_lib.load_config(args.config)
    cfg.dit.update(remat=bool(args.remat), attention_backend=args.attention, dtype=args.dtype)
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(",") if kv)}
    mesh = create_mesh({"ici": sizes or {"data": -1}})
    text_len = int(cfg.text.max_length)
    model = build_dit(cfg)
    tx, schedule = make_optimizer(cfg.dit_train)
    step = TrainStep(model, nnx.Optimizer(model, skip_nonfinite(tx), wrt=nnx.Param),
                     dit_loss_fn(cfg.flow, None), schedule, 0, mesh=mesh,
                     rules=[tuple(r) for r in cfg.mesh.rules])
    batch = one_example_rows(args.rows, args.seq_len, text_len, dit_in_dim(cfg),
                             int(cfg.dit.text_dim))
    t0 = time.perf_counter()
    jax.block_until_ready(step(batch, 0)["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(step(batch, i)["loss"])
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median
    info = model_info(cfg, seq_len=args.seq_len)
    tokens = args.rows * args.seq_len
    model_flops = 3.0 * info["flops_per_token"] * tokens
    platform = jax.devices()[0].platform
    if args.chip:
        peak, peak_source = CHIPS[args.chip].peak_bf16_flops * jax.device_count(), f"{args.chip} bf16 data sheet"
    elif platform == "cpu":
        peak, peak_source = measured_matmul_peak(args.matmul_n), f"measured f32 {args.matmul_n}^3 matmul"
    else:
        raise SystemExit(f"on {platform}, name the chip for its peak: --chip h100 / v5p / ...")
    out = {"config": args.config, "params": info["params"], "seq_len": args.seq_len, "rows": args.rows,
           "dtype": args.dtype, "attention": args.attention, "remat": bool(args.remat),
           "mesh": describe(mesh), "platform": platform, "compile_s": compile_s,
           "step_s": step_s, "step_s_all": times, "tokens_per_s": tokens / step_s,
           "model_flops_per_step": model_flops, "peak_flops": peak, "peak_source": peak_source,
           "mfu": model_flops / step_s / peak}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
