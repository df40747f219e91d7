"""``sora-jax``: the command line.

Subcommands: prepare-data, train-vae, evaluate-vae, train-dit, generate, evaluate, quickstart.
Every subcommand takes ``--config path/to/config.py[:arg]`` (default: the quickstart config),
``--workdir DIR`` and any number of ``--config.a.b=value`` overrides.

Users' data: ``sora-jax ingest`` (a folder of videos / images + captions -> ArrayRecord clips,
``data_pipelines.ingest``) and ``sora-jax encode`` (clips -> latents + text states with a
trained VAE, ``data_pipelines.encode``); each has its own flags (``sora-jax ingest --help``).
Train on the result with ``sora-jax train-dit --config.dit_train.data=PREFIX[:weight],...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = "quickstart.py"


def _default_config_path() -> str:
    import configs

    return os.path.join(os.path.dirname(configs.__file__), DEFAULT_CONFIG)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default=None, help="config file[:arg] (default: configs/quickstart.py)")
        s.add_argument("--workdir", default=None, help="run folder (default: runs/<config name>)")
        s.add_argument("--no-progress", action="store_true", help="hide progress bars")
        return s

    add("prepare-data", "build the offline real-data datasets (ArrayRecord)")
    add("train-vae", "train the autoencoder (vae.kind: causal VAE, or identity = pixel mode); "
                     "stores latent statistics in its checkpoint, runs evaluate-vae")
    e = add("evaluate-vae", "autoencoder PSNR/SSIM on the named held-out video and image sets "
                            "(config section vae_eval)")
    e.add_argument("--out", default=None,
                   help="output JSON file (default: <workdir>/vae/evaluate_vae.json)")
    add("train-dit", "encode latents and train the packed DiT with rectified flow")
    g = add("generate", "text-to-video samples from a trained run")
    g.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    g.add_argument("--frames", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--shape", action="append", default=None, metavar="FxHxW",
                   help="frames x height x width per prompt (repeat once per prompt, or give "
                        "once for all); overrides --frames/--height/--width. Requests of "
                        "different shapes are packed into one sampler call.")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--steps", type=int, default=None, help="sampler steps")
    g.add_argument("--out", default=None, help="output folder (default: <workdir>/samples)")
    add("evaluate", "prompt adherence (digit and direction accuracy) on held-out prompts")
    add("quickstart", "all stages end to end; writes quickstart_metrics.json")
    for name, module in _DATA_TOOLS.items():  # listed for --help; run() hands them their argv
        sub.add_parser(name, help=f"see `sora-jax {name} --help` ({module})", add_help=False)
    return p


def _load(args, overrides):
    from sora_jax import config as config_lib
    from sora_jax import stages
    from sora_jax.config import ConfigError
    from sora_jax.stages import paths

    run_config = paths(args.workdir)["config"] if args.workdir else None
    if args.config is None and run_config and os.path.isfile(run_config):
        # an existing run continues with its own config, so data and architecture match
        try:
            with open(run_config) as f:
                cfg = config_lib.from_json(f.read())
        except ValueError as e:
            raise ConfigError(f"unreadable run config {run_config}: {e}") from None
    else:
        cfg = config_lib.load_config(args.config or _default_config_path())
    cfg = config_lib.apply_overrides(cfg, overrides)
    stages.validate_config(cfg)
    if args.workdir is None:
        args.workdir = os.path.join("runs", cfg.name)
    return cfg


# subcommands that own their flags: the data tools under data_pipelines/
_DATA_TOOLS = {"ingest": "data_pipelines.ingest", "encode": "data_pipelines.encode"}


def run(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the subcommand; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DATA_TOOLS:
        import importlib

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        return int(importlib.import_module(_DATA_TOOLS[argv[0]]).main(argv[1:]) or 0)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for a in rest:
        (overrides if a.startswith("--config.") else unknown).append(a)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    overrides = [a[len("--config."):] for a in overrides]

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from sora_jax import stages
    from sora_jax.config import ConfigError

    try:
        cfg = _load(args, overrides)
        progress = not args.no_progress
        wd = args.workdir
        if args.command == "prepare-data":
            out = stages.prepare_data(cfg, wd, progress)
        elif args.command == "train-vae":
            out = stages.train_vae(cfg, wd, progress)
        elif args.command == "evaluate-vae":
            out = stages.evaluate_vae(cfg, wd, out=args.out)
        elif args.command == "train-dit":
            out = stages.train_dit(cfg, wd, progress)
        elif args.command == "generate":
            out = _generate(cfg, args)
        elif args.command == "evaluate":
            out = stages.evaluate(cfg, wd, progress=progress)
            out = {k: out[k] for k in ("digit_accuracy", "direction_accuracy", "num_samples")}
        else:
            out = stages.quickstart(cfg, wd, progress)
            out = {k: v for k, v in out.items() if k != "samples"}
    except (stages.StageError, ConfigError, FileNotFoundError) as e:
        print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as e:  # bad input met mid-stage: one line, no traceback
        print(f"sora-jax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    import json

    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


def _generate(cfg, args) -> dict:
    import datetime

    from sora_jax import stages

    s = cfg.sample
    frames = args.frames if args.frames is not None else s.frames
    height = args.height if args.height is not None else s.height
    width = args.width if args.width is not None else s.width
    seed = args.seed if args.seed is not None else s.seed
    guidance = args.cfg if args.cfg is not None else s.cfg
    steps = args.steps if args.steps is not None else s.steps
    if steps < 1:
        raise stages.StageError(f"--steps must be >= 1, got {steps}")
    shapes = [(frames, height, width)] * len(args.prompt)
    if args.shape:
        if len(args.shape) not in (1, len(args.prompt)):
            raise stages.StageError(f"give --shape once or once per prompt ({len(args.prompt)}), "
                                    f"got {len(args.shape)}")
        try:
            parsed = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shape]
        except ValueError:
            parsed = [()]
        if any(len(sh) != 3 for sh in parsed):
            raise stages.StageError(f"--shape must look like 9x32x48 (frames x height x width), "
                                    f"got {args.shape}")
        shapes = parsed * len(args.prompt) if len(parsed) == 1 else parsed
    for sh in shapes:
        stages.latent_shape(cfg, *sh)  # fail before loading anything
    gen = stages.Generator(cfg, args.workdir)
    videos = gen.generate([stages.Request(p, *sh) for p, sh in zip(args.prompt, shapes)],
                          seed=seed, guidance=guidance, steps=steps)
    info = {
        "seed": seed, "cfg": guidance, "steps": steps, "frames": shapes[0][0],
        "height": shapes[0][1], "width": shapes[0][2], "shapes": [list(sh) for sh in shapes],
        "checkpoint_step": gen.dit_step, "workdir": os.path.abspath(args.workdir),
        "sampler": "euler", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config": cfg.to_dict(),
    }
    out = args.out or os.path.join(args.workdir, "samples")
    samples = stages.write_samples(out, args.prompt, videos, info, fps=s.fps)
    return {"samples": samples, "contact_sheet": os.path.join(out, "contact_sheet.png")}


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
