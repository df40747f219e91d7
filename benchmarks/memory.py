"""Per-device memory of a DiT training step at long sequence lengths, and FSDP's parameter split.

For a config's DiT (default ``configs/dit_ladder.py:B``, remat on, block-sparse "chunked"
attention: no L x L score matrix on any backend) this compiles one training step ahead of time
(:func:`sora_jax.train.aot.compile_dit_train_step`, abstract weights, nothing allocated) for
one packed row of L tokens on one device and reads XLA's plan (``memory_analysis``: arguments
+ outputs - donated aliases + temporaries), for L = 4k, 16k, 64k:

- ``bytes_per_device``: {L: bytes};
- ``growth_16k_to_64k``: bytes(64k) / bytes(16k); linear memory gives <= 4 plus the fixed
  part's share, quadratic would give 16. Target <= 4.5.
- ``fsdp8_param_fraction``: on a mesh with fsdp = 8, the parameter bytes on the most loaded
  device over all parameter bytes (target <= 1/8 + 5%); norm scales and other vectors too
  small to split stay whole.
- ``ema_bytes``: the parameters' EMA (``dit_train.ema``, one more float32 copy of the
  parameters, sharded like them), part of ``bytes_per_device``; 0 with profile "none".

Run: ``python benchmarks/memory.py [--config configs/dit_ladder.py:B] [--lengths 4096,16384,65536]``
(about 5 minutes on 2 CPU cores, mostly compiling). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# 8 simulated devices for the FSDP part; must be set before JAX starts
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dit_ladder.py:B")
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--text-len", type=int, default=None, help="default: the config's text.max_length")
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    from sora_jax import config as config_lib
    from sora_jax.train.aot import compile_dit_train_step
    from sora_jax.parallel.mesh import create_mesh
    from sora_jax.parallel.sharding import param_bytes_per_device, state_shardings
    from sora_jax.models.factory import build_dit

    cfg = config_lib.load_config(args.config)
    cfg.dit.remat = True
    cfg.dit.attention_backend = "chunked"
    rules = [tuple(r) for r in cfg.mesh.rules]
    text_len = args.text_len or int(cfg.text.max_length)
    one = create_mesh({"ici": {"data": 1}}, devices=jax.devices()[:1])
    out = {"config": args.config, "remat": True, "attention_backend": "chunked", "rows": 1,
           "text_len": text_len, "bytes_per_device": {}, "temp_bytes": {}, "compile_seconds": {}}
    for length in (int(v) for v in args.lengths.split(",")):
        r = compile_dit_train_step(cfg, one, rules, rows=1, seq_len=length, text_len=text_len)
        out["bytes_per_device"][str(length)] = r["bytes_per_device"]
        out["temp_bytes"][str(length)] = r["temp_bytes"]
        out["compile_seconds"][str(length)] = round(r["compile_seconds"], 1)
        print(f"L={length}: {r['bytes_per_device'] / 2**30:.3f} GiB", file=sys.stderr, flush=True)
    b = out["bytes_per_device"]
    if "16384" in b and "65536" in b:
        out["growth_16k_to_64k"] = b["65536"] / b["16384"]

    fsdp = create_mesh({"ici": {"fsdp": 8}})
    state = nnx.state(nnx.eval_shape(lambda: build_dit(cfg)), nnx.Param)
    split = param_bytes_per_device(state, state_shardings(state, fsdp, rules))
    out["param_bytes"] = split["total"]
    # the parameters' EMA (dit_train.ema) is one more float32 copy of them, inside bytes_per_device
    out["ema"] = cfg.dit_train.ema.profile
    out["ema_bytes"] = split["total"] if cfg.dit_train.ema.profile != "none" else 0
    out["fsdp8_param_fraction"] = split["max_per_device"] / split["total"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
