"""Loop seams of a trained run over several prompts and seeds (the ``loop`` mode's target).

For every prompt x seed x solver, runs ``sora_jax.inference.modes.run_mode(..., "loop", ...)`` at the
run's ``sample`` settings (frames, size, steps, text CFG) and reports, per solver:

- ``loop_seam_ratio``: the list, and its ``median`` / ``mean`` / ``max`` and ``fraction_le_1``
  (the target is a ratio <= 1: the last-to-first step no larger than the median step).
- ``clip_seam_ratio_mean``: the same measure for the loops' clips decoded once, for contrast.
- ``loop_period_psnr_min``: the worst agreement of the last two decoded copies of a period
  (:func:`sora_jax.inference.modes.periodic_decode`; 100 = exactly periodic).

Run: ``python benchmarks/loops.py --workdir runs/quickstart`` (about a minute on 2 CPU cores
for the quickstart model). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

PROMPTS = ("the digit 5 moves up", "the digit 2 moves left", "the digit 7 moves right",
           "the digit 4 moves down", "the digit 3 moves left and the digit 7 moves up",
           "a clip from bikes")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run folder (vae/ and dit/)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per prompt")
    p.add_argument("--solvers", default="euler,dpmpp_2m", help="comma-separated")
    p.add_argument("--prompt", action="append", help="replaces the default prompts; repeatable")
    args = p.parse_args(argv)

    from sora_jax import config as config_lib
    from sora_jax.inference.generate import Generator
    from sora_jax.inference.modes import run_mode
    from sora_jax.train.run_folder import paths

    cfg = config_lib.from_json(open(paths(args.workdir)["config"]).read())
    gen = Generator(cfg, args.workdir)
    s = cfg.sample
    prompts = args.prompt or list(PROMPTS)
    out = {"workdir": args.workdir, "prompts": prompts, "seeds": args.seeds,
           "frames": int(s.frames), "height": int(s.height), "width": int(s.width),
           "steps": int(s.steps), "guidance": float(s.guidance)}
    for solver in args.solvers.split(","):
        seams, clips, periods = [], [], []
        for seed in range(args.seeds):
            for prompt in prompts:
                info = run_mode(gen, "loop", prompt, frames=s.frames, height=s.height, width=s.width,
                                seed=seed, guidance=s.guidance, steps=s.steps, solver=solver).info
                seams.append(info["loop_seam_ratio"])
                clips.append(info["clip_seam_ratio"])
                periods.append(info["loop_period_psnr"])
        a = np.asarray(seams)
        out[solver] = {"loop_seam_ratio": [round(float(v), 3) for v in a],
                       "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max()),
                       "fraction_le_1": float(np.mean(a <= 1.0)),
                       "clip_seam_ratio_mean": float(np.mean(clips)),
                       "loop_period_psnr_min": float(np.min(periods))}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
