"""``python -m sora_jax.serving EXPORT --prompt TEXT [--prompt TEXT ...] --out videos.npz``: generate
from a StableHLO export with the serving runtime alone (jax, numpy, safetensors, tokenizers)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from sora_jax.serving.runtime import Request, ServingModel, to_uint8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sora_jax.serving", description=__doc__)
    p.add_argument("export", help="the folder `sora-jax export --format stablehlo` wrote")
    p.add_argument("--prompt", action="append", required=True, help="one per video (repeat)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the export's")
    p.add_argument("--guidance", type=float, default=None, help="default: the export's")
    p.add_argument("--solver", default=None, help="one of the exported sampler steps (default: the export's)")
    p.add_argument("--out", required=True, help=".npz of uint8 (frames, height, width, 3) videos, one per prompt")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = ServingModel(args.export)
        videos = model.generate([Request(q, args.frames, args.height, args.width) for q in args.prompt],
                                seed=args.seed, steps=args.steps, guidance=args.guidance, solver=args.solver)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"python -m sora_jax.serving: error: {e}", file=sys.stderr)
        return 2
    np.savez(args.out, *[to_uint8(v) for v in videos])
    print(json.dumps({"out": args.out, "videos": len(videos), "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
