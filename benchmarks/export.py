"""Weights out: what ``sora-jax export`` writes, how exactly it reproduces the run, and what it costs.

Prints one JSON object:

- ``formats``: the formats written here: ``safetensors`` and ``stablehlo`` of a tiny trained
  run (configs/tiny.py, trained by this script through the CLI unless ``--workdir`` names one),
  ``diffusers`` of the tiny Wan 2.1 run that ``import-weights`` makes from
  ``tests/fixtures/wan/tiny/``.
- ``safetensors_roundtrip``: "bitwise" when every exported tensor equals the restored model's
  (else the largest difference); ``diffusers_roundtrip``: the same for export -> import-weights.
- ``stablehlo_max_abs_err``: :mod:`sora_jax.serving` in a fresh process against ``generate``'s
  float video on the same run, seed, prompts and sampler, over ``stablehlo_shapes_tested``
  (distinct (frames, height, width) served together from one artifact);
  ``stablehlo_custom_calls``: the custom-call targets in the programs (all on jax.export's
  stable list, ``stablehlo_custom_calls_stable``).
- ``serving_first_video_seconds``: the fresh process from its start (imports, loading the
  programs and weights, compiling) to its first video; ``serving_steady_seconds_per_video``: a
  second batch in the same process, per video.
- ``export_seconds``, ``export_peak_rss_over_checkpoint_bytes`` (goal <= 1.3): ``sora-jax export
  --format safetensors`` of a mid-size run (a random-weight DiT of ``--mid-width`` x
  ``--mid-depth``, about 0.4 GB), in a child process: (VmHWM - the child's RSS once its imports
  and JAX's runtime are up) / checkpoint bytes; with the baseline:
  ``export_peak_rss_total_over_checkpoint_bytes``.

  python benchmarks/export.py [--workdir RUN] [--mid-width 768 --mid-depth 8]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from interop import _rss_mb  # benchmarks/interop.py, beside this script: /proc/self/status fields in MB

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [(9, 32, 32), (1, 32, 48), (5, 16, 32)]
PROMPTS = ["a digit 7 moves left", "the digit 3", "two digits bounce"]

SERVE = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from sora_jax.serving import ServingModel
from sora_jax.serving.runtime import Request
spec = json.loads(sys.argv[2])
m = ServingModel(sys.argv[1])
reqs = [Request(p, *s) for p, s in zip(spec["prompts"], spec["shapes"])]
kw = dict(seed=spec["seed"], steps=spec["steps"], guidance=spec["guidance"], solver=spec["solver"])
first = m.generate(reqs[:1], **kw)
t_first = time.perf_counter() - t0
videos = m.generate(reqs, **kw)
t1 = time.perf_counter()
m.generate(reqs, **kw)
steady = (time.perf_counter() - t1) / len(reqs)
np.savez(sys.argv[3], *videos)
print(json.dumps({"first": t_first, "steady": steady}))
"""


def _cli(*args: str) -> None:
    import contextlib

    from sora_jax.cli import run

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries this script's JSON only
        code = run(list(args))
    if code != 0:
        raise SystemExit(f"sora-jax {' '.join(args)} exited with {code}")


def _tensors_equal(folder: str, models: dict) -> str:
    from safetensors.numpy import load_file

    from sora_jax.interop.run_weights import flat_arrays

    worst = 0.0
    for name, rm in models.items():
        files = sorted(pathlib.Path(folder, name).glob("*.safetensors"))
        exported = {}
        for f in files:
            exported.update(load_file(str(f)))
        ours = dict((k, np.asarray(v)) for k, v in flat_arrays(rm.model))
        if set(exported) != set(ours):
            return f"key sets differ for {name}"
        for k, v in ours.items():
            if v.dtype != exported[k].dtype or not np.array_equal(v, exported[k]):
                worst = max(worst, float(np.abs(v.astype(np.float64) - exported[k].astype(np.float64)).max()))
    return "bitwise" if worst == 0.0 else f"max abs diff {worst:.3g}"


def formats_and_serving(run: str, tmp: str) -> dict:
    from sora_jax.inference.generate import Generator, Request
    from sora_jax.interop.export import export_run
    from sora_jax.interop.run_weights import load_run_models
    from sora_jax.interop.stablehlo_export import stable_custom_calls
    from sora_jax.train.run_folder import read_config

    cfg = read_config(run)
    out = {}
    st = export_run(cfg, run, "safetensors", os.path.join(tmp, "st"))
    out["safetensors_roundtrip"] = _tensors_equal(os.path.join(tmp, "st"), load_run_models(cfg, run))
    out["export_seconds_tiny_safetensors"] = st["export_seconds"]
    sh = export_run(cfg, run, "stablehlo", os.path.join(tmp, "shlo"), platforms=("cpu", "cuda", "tpu"))
    out["export_seconds_tiny_stablehlo"] = sh["export_seconds"]
    out["stablehlo_custom_calls"] = sh["custom_calls"]
    out["stablehlo_custom_calls_stable"] = set(sh["custom_calls"]) <= stable_custom_calls()
    out["stablehlo_platforms"] = ["cpu", "cuda", "tpu"]

    gen = Generator(cfg, run)
    kw = dict(seed=11, steps=int(cfg.sample.steps), guidance=float(cfg.sample.guidance), solver=cfg.sample.solver)
    want = [gen.codec.decode(z[None])[0]
            for z in gen.sample_latents([Request(p, *s) for p, s in zip(PROMPTS, SHAPES)], **kw)]
    spec = dict(prompts=PROMPTS, shapes=SHAPES, **kw)
    res = subprocess.run([sys.executable, "-c", SERVE, os.path.join(tmp, "shlo"), json.dumps(spec),
                          os.path.join(tmp, "v.npz")], capture_output=True, text=True, check=True, cwd=ROOT)
    t = json.loads(res.stdout.strip().splitlines()[-1])
    got = np.load(os.path.join(tmp, "v.npz"))
    out.update(stablehlo_max_abs_err=max(float(np.abs(got[f"arr_{i}"] - w).max()) for i, w in enumerate(want)),
               stablehlo_shapes_tested=[list(s) for s in SHAPES], serving_solver=kw["solver"],
               serving_steps=kw["steps"], serving_first_video_seconds=round(t["first"], 2),
               serving_steady_seconds_per_video=round(t["steady"], 3))
    return out


def diffusers_roundtrip(tmp: str) -> str:
    from sora_jax.interop.diffusers_import import import_diffusers
    from sora_jax.interop.export import export_run
    from sora_jax.interop.run_weights import flat_arrays, load_run_models
    from sora_jax.train.run_folder import read_config

    first, back = os.path.join(tmp, "wan"), os.path.join(tmp, "wan_back")
    import_diffusers(ROOT / "tests" / "fixtures" / "wan" / "tiny", first)
    cfg = read_config(first)
    export_run(cfg, first, "diffusers", os.path.join(tmp, "wan_diffusers"))
    import_diffusers(os.path.join(tmp, "wan_diffusers"), back)
    a, b = load_run_models(cfg, first), load_run_models(read_config(back), back)
    for name in a:
        xa, xb = dict(flat_arrays(a[name].model)), dict(flat_arrays(b[name].model))
        if set(xa) != set(xb) or any(not np.array_equal(np.asarray(xa[k]), np.asarray(xb[k])) for k in xa):
            return f"differs in {name}"
    return "bitwise"


def make_mid_run(run: str, width: int, depth: int) -> None:
    """A run folder with an untrained VAE and a random-weight DiT of width x depth (no training)."""
    from sora_jax import config as config_lib
    from sora_jax.models.factory import build_dit, build_vae
    from sora_jax.models.vae_gan import VAETrainModel
    from sora_jax.train.checkpoint import Checkpointer
    from sora_jax.train.run_folder import paths, save_config

    overrides = [f"dit.hidden_size={width}", f"dit.depth={depth}", f"dit.num_heads={width // 64}",
                 "dit_train.ema.profile='none'"]
    cfg = config_lib.apply_overrides(config_lib.load_config("tiny"), overrides)
    save_config(cfg, run)
    for name, model in (("vae", VAETrainModel(build_vae(cfg))), ("dit", build_dit(cfg))):
        ck = Checkpointer(os.path.join(paths(run)[name], "checkpoints"), async_save=False, compress=False)
        ck.save(0, model, None, {"note": "random weights, for the export benchmark"})
        ck.wait()
        ck.close()


def _child(run: str, out: str) -> None:
    import jax
    import jax.numpy as jnp

    from sora_jax.interop.export import export_command
    from sora_jax.train.run_folder import read_config

    jax.block_until_ready(jnp.zeros(8) + 1)  # the runtime is up: its memory is not the export's
    cfg = read_config(run)
    baseline = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    report = export_command(cfg, run, "safetensors", out)  # what `sora-jax export` runs
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in pathlib.Path(out).rglob("*.safetensors"))
    print(json.dumps(dict(seconds=seconds, peak_mb=_rss_mb("VmHWM"), baseline_mb=baseline, bytes=written,
                          report_keys=sorted(report))))


def export_cost(tmp: str, width: int, depth: int) -> dict:
    run = os.path.join(tmp, "mid")
    make_mid_run(run, width, depth)
    res = subprocess.run([sys.executable, __file__, "--child", run, os.path.join(tmp, "mid_st")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(export_seconds=round(r["seconds"], 2), checkpoint_bytes=r["bytes"],
                export_seconds_per_gb=round(r["seconds"] / (r["bytes"] / 1e9), 2),
                export_peak_rss_mb=round(r["peak_mb"], 1), export_baseline_rss_mb=round(r["baseline_mb"], 1),
                export_peak_rss_over_checkpoint_bytes=round((r["peak_mb"] - r["baseline_mb"]) * 2**20 / r["bytes"], 3),
                export_peak_rss_total_over_checkpoint_bytes=round(r["peak_mb"] * 2**20 / r["bytes"], 3),
                mid_width=width, mid_depth=depth)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="a trained run to export (default: train configs/tiny.py)")
    p.add_argument("--mid-width", type=int, default=768)
    p.add_argument("--mid-depth", type=int, default=8)
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = args.workdir
        if run is None:
            run = os.path.join(tmp, "tiny")
            for cmd in ("prepare-data", "train-vae", "train-dit"):
                _cli(cmd, "--config", "configs/tiny.py", "--no-progress", "--workdir", run)
        result = formats_and_serving(run, tmp)
        result["diffusers_roundtrip"] = diffusers_roundtrip(tmp)
        result["formats"] = ["safetensors", "stablehlo", "diffusers"]
        result.update(export_cost(tmp, args.mid_width, args.mid_depth))
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
