"""``sora-jax``: the command line.

Subcommands: prepare-data, train-vae, evaluate-vae, train-dit, generate, evaluate, quickstart,
model-info, aot-compile, import-weights, export (each runs one function of :mod:`sora_jax.stages`).
Every subcommand takes ``--config path/to/config.py[:arg]`` or a packaged config's name
(``--config dit_ladder:B``; default: ``quickstart``), ``--workdir DIR`` and any number of
``--config.a.b=value`` overrides. The config is checked in full before anything runs or is
written.

Users' data: ``sora-jax ingest`` (a folder of videos / images + captions -> ArrayRecord clips)
and ``sora-jax encode`` (clips -> latents + text states with a trained VAE) are the offline
tools of ``data_pipelines/``, registered as ``sora_jax.tools`` entry points; each has its own
flags (``sora-jax ingest --help``). Train on the result with
``sora-jax train-dit --config.dit_train.data=PREFIX[:weight],...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from importlib import metadata

from sora_jax.errors import ConfigError, StageError
from sora_jax.parallel import distributed
from sora_jax.parallel.topologies import parse as parse_topology

DEFAULT_CONFIG = "quickstart"

# subcommands that may run as one process of a multi-host job (jax.distributed)
_DISTRIBUTED_COMMANDS = ("train-vae", "evaluate-vae", "train-dit", "generate", "evaluate", "quickstart")

# generate's sampler flags: each sets the key of the config's `sample` section (or `prompt`)
_SAMPLE_FLAGS = {"frames": "sample.frames", "height": "sample.height", "width": "sample.width",
                 "seed": "sample.seed", "guidance": "sample.guidance",
                 "visual_guidance": "sample.visual_guidance", "strength": "sample.strength",
                 "steps": "sample.steps", "solver": "sample.solver", "extender": "prompt.extender",
                 "weights": "sample.weights"}


def _tools() -> dict[str, metadata.EntryPoint]:
    """Subcommands registered by other packages (``data_pipelines``'s ingest and encode)."""
    return {ep.name: ep for ep in metadata.entry_points(group="sora_jax.tools")}


def _parser(tools) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default=None,
                       help=f"config file[:arg] or packaged config name (default: {DEFAULT_CONFIG})")
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
                   "extend-backward, connect, loop, edit (see sora_jax.inference.modes)")
    g.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="image or video file: one for i2v / extend-* / edit, two (A then B) "
                        "for connect; scaled to cover the output size and centre-cropped")
    g.add_argument("--shape", action="append", default=None, metavar="FxHxW",
                   help="t2v only: frames x height x width per prompt (repeat once per prompt, "
                        "or give once for all); overrides --frames/--height/--width. Requests "
                        "of different shapes are packed into one sampler call.")
    g.add_argument("--out", default=None, help="output folder (default: <workdir>/samples)")
    flags = {"frames": (int, "video frames (1 + 4k)"), "height": (int, "pixels"),
             "width": (int, "pixels"), "seed": (int, "noise seed"),
             "guidance": (float, "classifier-free guidance scale on text"),
             "visual_guidance": (float, "guidance scale on the context frames (1 = none)"),
             "strength": (float, "edit: SDEdit strength in [0, 1]"),
             "steps": (int, "sampler steps"), "solver": (str, "euler, heun, dpmpp_2m or unipc"),
             "extender": (str, "prompt extender: caption_style, none or module.path:function"),
             "weights": (str, "the DiT's weights: ema (their moving average) or raw")}
    for name, (kind, help_) in flags.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"{help_} (default: the config's {_SAMPLE_FLAGS[name]})")
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
    iw = add("import-weights", "released weights into a new run folder: a diffusers Wan 2.1 T2V folder "
                               "(transformer, vae, text_encoder, tokenizer); --config is the base for the "
                               "run's other sections (default: wan2_1)")
    iw.add_argument("--from", dest="source", nargs=2, required=True, metavar=("FORMAT", "DIR"),
                    help="the checkpoint's format and folder: diffusers DIR")
    iw.add_argument("--dtype", default="float32", help="parameters' dtype in the checkpoints: float32 or bfloat16")
    ex = add("export", "a trained run's weights for serving: safetensors (every model), diffusers (Wan-shaped "
                       "runs) or stablehlo (jax.export programs that sora_jax.serving runs)")
    ex.add_argument("--format", required=True, choices=("safetensors", "diffusers", "stablehlo"))
    ex.add_argument("--out", required=True, help="the export folder to write (must not exist unless --overwrite)")
    ex.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as the checkpoints hold them)")
    ex.add_argument("--step", type=int, default=None, help="the DiT checkpoint's step (default: the latest)")
    ex.add_argument("--weights", default="ema", choices=("ema", "raw"),
                    help="the DiT's EMA weights (default, where the run keeps them) or its raw ones")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.add_argument("--shard", action="store_true",
                    help="safetensors / diffusers: restore onto the config's mesh over this host's devices, "
                         "then write one tensor at a time (no device holds the whole model)")
    ex.add_argument("--platforms", default="cpu",
                    help="stablehlo: comma-separated lowering platforms among cpu, cuda, tpu (one program for all)")
    ex.add_argument("--solvers", default=None,
                    help="stablehlo: comma-separated sampler steps to export (default: the config's sample.solver)")
    sw = add("sweep", "scaling-law sweeps (--config sweep_cpu): plan the IsoFLOP grid, run its points "
                      "(resumable; --point for one cluster job per point), fit the laws, report (plots, table, "
                      "summary.json)")
    sw.add_argument("action", choices=("plan", "run", "fit", "report"))
    sw.add_argument("--point", default=None, help="run: only this point (one cluster job per point)")
    for name, ep in tools.items():  # listed for --help; run() hands them their argv
        sub.add_parser(name, help=f"see `sora-jax {name} --help` ({ep.value})", add_help=False)
    return p


def _parse_shapes(specs: list[str]) -> list[tuple[int, int, int]]:
    try:
        parsed = [tuple(int(v) for v in sh.lower().split("x")) for sh in specs]
    except ValueError:
        parsed = [()]
    if any(len(sh) != 3 for sh in parsed):
        raise StageError(f"--shape must look like 9x32x48 (frames x height x width), got {specs}")
    return parsed


def run(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the subcommand; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tools = _tools()
    if argv and argv[0] in tools:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        return int(tools[argv[0]].load()(argv[1:]) or 0)
    if argv and argv[0] == "aot-compile":
        code = _aot_child(argv)
        if code is not None:
            return code
    parser = _parser(tools)
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
        try:
            distributed.initialize(distributed.resolve(
                {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}))
        except ValueError as e:
            print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
            return 2
        if not distributed.is_main_process():  # one logger: process 0
            logging.getLogger().setLevel(logging.WARNING)

    # Imported here, not at the top, for import speed: the stages pull in every model (seconds),
    # which `sora-jax --help`, the data tools and a refused argument should not wait for.
    from sora_jax import config as config_lib
    from sora_jax import stages
    from sora_jax.config_validation import validate_config
    from sora_jax.inference.modes import ModeError
    from sora_jax.inference.prompts import PromptRefused
    from sora_jax.train.run_folder import paths, read_config
    from sora_jax.train.trainer import Preempted

    try:
        # An existing run continues with its saved config (so data and architecture match)
        # unless --config is given; then the overrides and generate's flags (in memory only:
        # generate never writes the run's config); all checked before any stage runs.
        if args.command == "sweep":  # a sweep config, not a run config: its points' base is checked
            # imported here for import speed: only this command needs the sweep modules
            from sora_jax.sweeps import commands as sweep_commands

            sweep = config_lib.apply_overrides(config_lib.load_config(args.config or "sweep_cpu"), overrides)
            wd = args.workdir or os.path.join("runs", sweep.name)
            if args.action == "plan":
                out = sweep_commands.plan(sweep, wd)
                print("\n".join(out.pop("table")), file=sys.stderr)
                out = {"points": len(out["points"]), "skipped": out["skipped"]}
            elif args.action == "run":
                out = sweep_commands.run(sweep, wd, point=args.point, progress=not args.no_progress)
            elif args.action == "fit":
                out = sweep_commands.fit(sweep, wd)
            else:
                out = sweep_commands.report(sweep, wd)
                out.pop("holdout", None)
            print(json.dumps(out, indent=2, default=str))
            return 0
        if args.command == "import-weights":  # a new run folder: its config comes from the checkpoint
            cfg = config_lib.load_config(args.config or "wan2_1")
        elif args.config is None and args.workdir and os.path.isfile(paths(args.workdir)["config"]):
            cfg = read_config(args.workdir)
        else:
            cfg = config_lib.load_config(args.config or DEFAULT_CONFIG)
        cfg = config_lib.apply_overrides(cfg, overrides)
        if args.command == "generate":
            for flag, key in _SAMPLE_FLAGS.items():
                if getattr(args, flag) is not None:
                    config_lib.set_value(cfg, key, getattr(args, flag))
        validate_config(cfg)
        if args.workdir is None:
            args.workdir = os.path.join("runs", cfg.name)
        progress = not args.no_progress
        wd = args.workdir
        if args.command == "prepare-data":
            out = stages.prepare_data(cfg, wd, progress)
        elif args.command == "train-vae":  # process-local work: on process 0 of a job
            out = distributed.main_process_first(lambda: stages.train_vae(cfg, wd, progress), args.command)
        elif args.command == "evaluate-vae":
            out = distributed.main_process_first(lambda: stages.evaluate_vae(cfg, wd, out=args.out), args.command)
        elif args.command == "train-dit":
            out = stages.train_dit(cfg, wd, progress)
        elif args.command == "generate":
            shapes = _parse_shapes(args.shape) if args.shape else None
            if shapes is not None and len(shapes) == 1:
                shapes = shapes * len(args.prompt)
            out = distributed.main_process_first(lambda: stages.generate(
                cfg, wd, args.prompt, mode=args.mode, inputs=args.input, shapes=shapes,
                out=args.out), args.command)
        elif args.command == "aot-compile":
            out = stages.aot_compile(cfg, args.topology, rows=args.rows, seq_len=args.seq_len,
                                     hbm_gib=args.hbm_gib)
            if not out["fits"]:
                print(json.dumps(out, indent=2, sort_keys=True, default=str))
                print(f"sora-jax aot-compile: error: {out['bytes_per_device'] / 2**30:.2f} GiB per device "
                      f"does not fit the {out['hbm_bytes'] / 2**30:.1f} GiB of {args.topology}", file=sys.stderr)
                return 4
        elif args.command == "import-weights":
            fmt, src = args.source
            if fmt != "diffusers":
                raise StageError(f"--from {fmt!r}: the formats read are: diffusers")
            out = stages.import_weights(cfg, wd, src, dtype=args.dtype)
        elif args.command == "model-info":
            out = stages.model_info(cfg, xla=args.xla)
        elif args.command == "export":
            out = stages.export(cfg, wd, args.format, args.out, dtype=args.dtype, step=args.step, weights=args.weights,
                                overwrite=args.overwrite, platforms=tuple(args.platforms.split(",")),
                                solvers=tuple(args.solvers.split(",")) if args.solvers else None, shard=args.shard)
        elif args.command == "evaluate":
            out = distributed.main_process_first(lambda: stages.evaluate(cfg, wd, progress=progress), args.command)
            out = out and {k: v for k, v in out.items() if k.endswith(("accuracy", "accuracy_se"))
                           or k in ("num_samples", "weights")}
        else:
            out = stages.quickstart(cfg, wd, progress)
            summary = out and stages.summary_line(out)
            out = out and {k: v for k, v in out.items() if k != "samples"}
    except PromptRefused as e:
        print(f"sora-jax {args.command}: refused: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # SIGTERM: checkpoint saved; 128 + 15 as a killed process would
        print(f"sora-jax {args.command}: {e}", file=sys.stderr)
        return 143
    except (StageError, ConfigError, ModeError, FileNotFoundError) as e:
        print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as e:  # bad input met mid-stage: one line, no traceback
        print(f"sora-jax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if out is not None:  # None: a process other than 0 of a job, which reports nothing
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
        if args.command == "quickstart":  # the one line a newcomer reads last
            print(summary)
    return 0


def _aot_child(argv: list[str]) -> int | None:
    """Re-runs ``aot-compile`` in a child JAX with as many CPU devices as the topology has chips
    (the device count is fixed when JAX starts); None when this process is that child."""
    if os.environ.get("SORA_JAX_AOT_CHILD") == "1":
        return None

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--topology", required=True)
    known, _ = p.parse_known_args(argv[1:])
    try:
        topo = parse_topology(known.topology)
    except ValueError as e:
        print(f"sora-jax aot-compile: error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ, SORA_JAX_AOT_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={topo.num_devices}")
    return subprocess.call([sys.executable, "-m", "sora_jax.cli", *argv], env=env)


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
