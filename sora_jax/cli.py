"""``sora-jax``: the command line.

Subcommands: prepare-data, train-vae, evaluate-vae, train-dit, generate, evaluate, quickstart,
model-info, aot-compile.
Every subcommand takes ``--config path/to/config.py[:arg]`` (default: the quickstart config),
``--workdir DIR`` and any number of ``--config.a.b=value`` overrides.

Users' data: ``sora-jax ingest`` (a folder of videos / images + captions -> ArrayRecord clips,
``data_pipelines.ingest``) and ``sora-jax encode`` (clips -> latents + text states with a
trained VAE, ``data_pipelines.encode``); each has its own flags (``sora-jax ingest --help``).
Train on the result with ``sora-jax train-dit --config.dit_train.data=PREFIX[:weight],...``.
"""

from __future__ import annotations

import argparse
import json
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
        if name in _DISTRIBUTED_COMMANDS:  # multi-host: see sora_jax.parallel.distributed, launch/
            s.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                           help="process 0's address (default: SORA_JAX_COORDINATOR, SLURM, TPU)")
            s.add_argument("--num-processes", type=int, default=None, help="processes in the job")
            s.add_argument("--process-id", type=int, default=None, help="this process, 0-based")
        return s

    add("prepare-data", "build the offline real-data datasets (ArrayRecord)")
    add("train-vae", "train the autoencoder (vae.kind: causal VAE, or identity = pixel mode); "
                     "stores latent statistics in its checkpoint, runs evaluate-vae")
    e = add("evaluate-vae", "autoencoder PSNR/SSIM on the named held-out video and image sets "
                            "(config section vae_eval)")
    e.add_argument("--out", default=None,
                   help="output JSON file (default: <workdir>/vae/evaluate_vae.json)")
    add("train-dit", "encode latents and train the packed DiT with rectified flow")
    g = add("generate", "samples from a trained run: text, image and video prompts "
                        "(--mode); writes media + provenance JSON per sample")
    g.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    g.add_argument("--mode", default="t2v", help="t2v (default), t2i, i2v, extend-forward, "
                   "extend-backward, connect, loop, edit (see sora_jax.modes)")
    g.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="image or video file: one for i2v / extend-* / edit, two (A then B) "
                        "for connect; scaled to cover the output size and centre-cropped")
    g.add_argument("--frames", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--shape", action="append", default=None, metavar="FxHxW",
                   help="t2v only: frames x height x width per prompt (repeat once per prompt, "
                        "or give once for all); overrides --frames/--height/--width. Requests "
                        "of different shapes are packed into one sampler call.")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale on text")
    g.add_argument("--visual-cfg", type=float, default=None,
                   help="guidance scale on the context frames (1 = none)")
    g.add_argument("--strength", type=float, default=None, help="edit: SDEdit strength in [0, 1]")
    g.add_argument("--steps", type=int, default=None, help="sampler steps")
    g.add_argument("--solver", default=None, help="euler, heun or dpmpp_2m")
    g.add_argument("--extender", default=None,
                   help="prompt extender: caption_style, none or module.path:function")
    g.add_argument("--out", default=None, help="output folder (default: <workdir>/samples)")
    add("evaluate", "prompt adherence (digit and direction accuracy) on held-out prompts")
    add("quickstart", "all stages end to end; writes quickstart_metrics.json")
    ac = add("aot-compile", "compile the DiT train step for a named topology on simulated CPU "
                            "devices: per-device memory and FLOPs; exit 4 when it would not fit")
    ac.add_argument("--topology", required=True,
                    help="v5p-64, v5e-256, v6e-8, h100x8, h100x8x16 (hosts) ... (sora_jax.parallel.topologies)")
    ac.add_argument("--rows", type=int, default=None,
                    help="global packed rows per step (default: dit_train.batch_size)")
    ac.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: dit_train.row_length)")
    ac.add_argument("--hbm-gib", type=float, default=None,
                    help="memory budget per device in GiB (default: the chip's; lower it for headroom)")
    mi = add("model-info", "the config's DiT: parameter count and FLOPs per token (no training, "
                           "no weights in memory)")
    mi.add_argument("--json", action="store_true", help="print JSON only (the default output too)")
    mi.add_argument("--xla", action="store_true",
                    help="cross-check FLOPs with XLA's cost analysis (compiles the forward pass)")
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


# subcommands that may run as one process of a multi-host job (jax.distributed)
_DISTRIBUTED_COMMANDS = ("train-vae", "evaluate-vae", "train-dit", "generate", "evaluate", "quickstart")

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
    if argv and argv[0] == "aot-compile":
        code = _aot_child(argv)
        if code is not None:
            return code
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
    if args.command in _DISTRIBUTED_COMMANDS:  # before any JAX use
        from sora_jax.parallel import distributed

        try:
            distributed.initialize(distributed.resolve(
                {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}))
        except ValueError as e:
            print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
            return 2
        if not distributed.is_main_process():  # one logger: process 0
            logging.getLogger().setLevel(logging.WARNING)

    from sora_jax import stages
    from sora_jax.config import ConfigError
    from sora_jax.modes import ModeError
    from sora_jax.parallel.distributed import main_process_first
    from sora_jax.prompts import PromptRefused
    from sora_jax.train.trainer import Preempted

    try:
        cfg = _load(args, overrides)
        progress = not args.no_progress
        wd = args.workdir
        if args.command == "prepare-data":
            out = stages.prepare_data(cfg, wd, progress)
        elif args.command == "train-vae":  # process-local work: on process 0 of a job
            out = main_process_first(lambda: stages.train_vae(cfg, wd, progress), args.command)
        elif args.command == "evaluate-vae":
            out = main_process_first(lambda: stages.evaluate_vae(cfg, wd, out=args.out), args.command)
        elif args.command == "train-dit":
            out = stages.train_dit(cfg, wd, progress)
        elif args.command == "generate":
            out = main_process_first(lambda: _generate(cfg, args), args.command)
        elif args.command == "aot-compile":
            out = _aot_compile(cfg, args)
            if not out["fits"]:
                print(json.dumps(out, indent=2, sort_keys=True, default=str))
                print(f"sora-jax aot-compile: error: {out['bytes_per_device'] / 2**30:.2f} GiB per device "
                      f"does not fit the {out['hbm_bytes'] / 2**30:.1f} GiB of {args.topology}", file=sys.stderr)
                return 4
        elif args.command == "model-info":
            from sora_jax.model_info import model_info

            out = model_info(cfg, xla=args.xla)
        elif args.command == "evaluate":
            out = main_process_first(lambda: stages.evaluate(cfg, wd, progress=progress), args.command)
            out = out and {k: out[k] for k in ("digit_accuracy", "direction_accuracy", "num_samples")}
        else:
            out = stages.quickstart(cfg, wd, progress)
            out = out and {k: v for k, v in out.items() if k != "samples"}
    except PromptRefused as e:
        print(f"sora-jax {args.command}: refused: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # SIGTERM: checkpoint saved; 128 + 15 as a killed process would
        print(f"sora-jax {args.command}: {e}", file=sys.stderr)
        return 143
    except (stages.StageError, ConfigError, ModeError, FileNotFoundError) as e:
        print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as e:  # bad input met mid-stage: one line, no traceback
        print(f"sora-jax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if out is not None:  # None: a process other than 0 of a job, which reports nothing
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


def _aot_child(argv: list[str]) -> int | None:
    """Re-runs ``aot-compile`` in a child JAX with as many CPU devices as the topology has chips
    (the device count is fixed when JAX starts); None when this process is that child."""
    if os.environ.get("SORA_JAX_AOT_CHILD") == "1":
        return None
    import subprocess

    from sora_jax.parallel.topologies import parse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--topology", required=True)
    known, _ = p.parse_known_args(argv[1:])
    try:
        topo = parse(known.topology)
    except ValueError as e:
        print(f"sora-jax aot-compile: error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ, SORA_JAX_AOT_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={topo.num_devices}")
    return subprocess.call([sys.executable, "-m", "sora_jax.cli", *argv], env=env)


def _aot_compile(cfg, args) -> dict:
    import jax

    from sora_jax.model_info import model_info
    from sora_jax.parallel.aot import compile_dit_train_step
    from sora_jax.parallel.mesh import create_mesh, describe
    from sora_jax.parallel.topologies import parse

    topo = parse(args.topology)
    if jax.device_count() != topo.num_devices:
        raise ValueError(f"{jax.device_count()} devices, {args.topology} has {topo.num_devices}")
    mesh = create_mesh(cfg.mesh)
    rows = args.rows or int(cfg.dit_train.batch_size)
    seq_len = args.seq_len or int(cfg.dit_train.row_length)
    text_len = int(cfg.dit_train.text_length)
    out = compile_dit_train_step(cfg, mesh, cfg.mesh.rules, rows=rows,
                                 seq_len=seq_len, text_len=text_len)
    info = model_info(cfg, seq_len=seq_len)
    tokens = rows * seq_len
    budget = int(args.hbm_gib * 2**30) if args.hbm_gib else topo.chip.hbm_bytes
    out.update(topology=args.topology, devices=topo.num_devices, mesh=describe(mesh), rows=rows,
               seq_len=seq_len, params=info["params"], hbm_bytes=budget,
               fits=out["bytes_per_device"] <= budget,
               model_flops_per_step=3.0 * info["flops_per_token"] * tokens,
               peak_bf16_flops_per_device=topo.chip.peak_bf16_flops)
    return out


def _read_media(path: str):
    """An image file as (H, W, 3) or a video file as (T, H, W, 3), uint8."""
    from sora_jax.io import read_image, read_video

    if os.path.splitext(path)[1].lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"):
        return read_image(path)
    return read_video(path)


def _generate(cfg, args) -> dict:
    from sora_jax import stages
    from sora_jax.generate import Generator, Request, provenance_fields, write_sample
    from sora_jax.io import write_contact_sheet, write_json
    from sora_jax.modes import MODES, NUM_INPUTS, run_mode
    from sora_jax.prompts import make_extender, make_filter
    from sora_jax.provenance import file_sha256

    s = cfg.sample
    pick = lambda flag, key, default=None: flag if flag is not None else s.get(key, default)  # noqa: E731
    frames, height, width = pick(args.frames, "frames"), pick(args.height, "height"), pick(args.width, "width")
    seed, guidance, steps = pick(args.seed, "seed"), pick(args.cfg, "cfg"), pick(args.steps, "steps")
    solver, strength = pick(args.solver, "solver", "euler"), pick(args.strength, "strength", 0.6)
    visual = pick(args.visual_cfg, "visual_cfg", 1.0)
    visual = None if visual == 1.0 else visual  # 1 is the plain conditional prediction
    mode = args.mode
    if mode not in MODES:
        raise stages.StageError(f"--mode must be one of {MODES}, got {mode!r}")
    if steps < 1:
        raise stages.StageError(f"--steps must be >= 1, got {steps}")
    if len(args.input) != NUM_INPUTS[mode]:
        raise stages.StageError(f"--mode {mode} takes {NUM_INPUTS[mode]} --input file(s), got {len(args.input)}")
    if args.shape and mode != "t2v":
        raise stages.StageError("--shape is for --mode t2v; use --frames/--height/--width")
    pcfg = cfg.get("prompt") or {}
    prompt_filter = make_filter(pcfg.get("filter"))
    try:
        extender = make_extender(args.extender or pcfg.get("extender", "caption_style"))
    except ValueError as e:
        raise stages.StageError(f"--extender: {e}") from None
    for p in args.prompt:  # refuse before loading anything
        prompt_filter.check(p)
    extended = [extender(p) for p in args.prompt]
    for p in extended:  # an extender (e.g. a user's LLM) may add words of its own
        prompt_filter.check(p)
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
    if mode == "t2i":
        shapes = [(1, h, w) for _, h, w in shapes]
    for sh in shapes:
        stages.latent_shape(cfg, *sh)  # fail before loading anything
    inputs = [_read_media(p) for p in args.input]
    gen = Generator(cfg, args.workdir)
    kw = dict(seed=seed, guidance=guidance, steps=steps, solver=solver)
    if mode in ("t2v", "t2i"):  # one packed sampler call for every prompt and shape
        videos = gen.generate([Request(p, *sh) for p, sh in zip(extended, shapes)], **kw)
        infos = [{"mode": mode, "frames": int(v.shape[0])} for v in videos]
    else:
        results = [run_mode(gen, mode, p, frames=frames, height=height, width=width,
                            visual_guidance=visual, inputs=inputs, strength=strength, **kw)
                   for p in extended]
        videos, infos = [r.video for r in results], [r.info for r in results]
    fields = provenance_fields(gen, solver=solver, steps=steps, guidance=guidance, visual_guidance=visual,
                               inputs=[{"path": os.path.abspath(p), "sha256": file_sha256(p)}
                                       for p in args.input])
    out = args.out or os.path.join(args.workdir, "samples")
    samples = [write_sample(os.path.join(out, f"sample_{i:02d}"), video, prompt=prompt,
                            extended_prompt=ext, seed=seed, fields=fields, info=info, fps=s.fps)
               for i, (prompt, ext, video, info) in enumerate(zip(args.prompt, extended, videos, infos))]
    scale = max(1, 128 // max(videos[0].shape[1:3]))
    write_contact_sheet(os.path.join(out, "contact_sheet.png"), videos, labels=extended,
                        scale=max(1, scale // 2))
    summary = {"mode": mode, "seed": seed, "cfg": guidance, "visual_cfg": visual, "steps": steps,
               "sampler": solver, "checkpoint_step": gen.dit_step,
               "workdir": os.path.abspath(args.workdir), "config": cfg.to_dict(), "samples": samples}
    write_json(os.path.join(out, "samples.json"), summary)
    return {"samples": samples, "contact_sheet": os.path.join(out, "contact_sheet.png")}


def _in_multi_process_job() -> bool:
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def main():
    # A failed process of a multi-process job exits at once: a normal exit would wait in JAX's
    # shutdown barrier (5 minutes) for the others, which may be waiting for it in a collective.
    try:
        code = run()
    except SystemExit:
        raise
    except BaseException:
        if not _in_multi_process_job():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if code and _in_multi_process_job():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
