"""Open weights in: how exactly, how completely and how cheaply ``import-weights`` brings Wan 2.1
into our models.

Prints one JSON object:

- ``transformer_max_abs_err``, ``vae_encode_max_abs_err``, ``vae_decode_max_abs_err``,
  ``umt5_max_abs_err``: the tiny random-weight pipeline of ``tests/fixtures/wan/tiny/`` imported
  into a run folder, each model restored from it as ``generate`` restores it and run on the
  fixture's inputs, against the reference outputs diffusers / transformers computed on the same
  weights (fp32, CPU; ``tests/fixtures/wan/make_reference.py``).
- ``pipeline_latents_max_abs_err``, ``pipeline_video_max_abs_err``: a whole text-to-video sample
  from the imported run (umT5 prompt, CFG 5.0 against the empty negative prompt, 4 Euler steps
  at flow shift 3.0, VAE decode) against diffusers' ``WanPipeline`` from the same starting noise
  on the same time grid (``tests/fixtures/wan/ref_pipeline.py``).
- ``transformer_i2v_max_abs_err``: the same for a tiny image-to-video folder (the I2V
  transformer of ``tests/fixtures/wan/i2v/``: extra input channels, CLIP states through the image
  embedder and added K/V), imported, restored and run against diffusers' output.
- ``manifest_keys_matched_<size>`` / ``manifest_keys_total_<size>`` (1_3b, 14b, i2v_14b): of the
  released transformers' keys (manifests built on PyTorch's meta device), how many the key map reads
  into a parameter of ours of the right shape; ``params_<size>``: our DiT's parameter count
  built from the same config (``reference_params_<size>``: the manifest's); the same for the
  shared VAE and umT5-XXL (``*_vae``, ``*_umt5``).
- With ``--mid DIR`` (a pipeline folder with a large transformer; ``--make-mid`` writes one with
  torch + diffusers, ``tests/fixtures/wan/ref_transformer.py``'s ``make_pipeline``): the import
  run in a child process: ``import_seconds_per_gb``, ``import_peak_rss_mb`` (VmHWM),
  ``import_baseline_rss_mb`` (the child's RSS once its imports are done and JAX's CPU runtime
  is up, before reading any weights), ``checkpoint_bytes`` and
  ``import_peak_rss_over_checkpoint_bytes`` = (peak - baseline) / checkpoint bytes: the memory the
  import itself adds, per byte imported (goal <= 1.3). The ratio with the baseline included is
  ``import_peak_rss_total_over_checkpoint_bytes``.

  python benchmarks/interop.py [--mid DIR | --make-mid [--mid-layers 6]]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "wan"


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def parity() -> dict:
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "tests"))
    from test_import_weights import make_i2v_folder
    from test_wan_dit import _run, run_i2v

    from sora_jax.inference.latents import load_codec
    from sora_jax.interop.diffusers_import import import_diffusers, text_encoder_dir
    from sora_jax.models.factory import build_dit, build_umt5
    from sora_jax.train.run_folder import read_config, restore

    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        import_diffusers(FIX / "tiny", run)
        cfg = read_config(run)
        dit = build_dit(cfg)
        restore(dit, os.path.join(run, "dit"), "dit")
        t = dict(np.load(FIX / "transformer_io.npz"))
        err_t = max(float(np.abs(_run(dit, tuple(cfg.dit.patch), t["x" + c], t["t" + c], t["text" + c])
                                 - t["out" + c]).max()) for c in ("1", "2"))
        codec = load_codec(cfg, run)
        v = dict(np.load(FIX / "vae_io.npz"))
        mean, _ = codec.vae.encode(jnp.asarray(v["video"]))
        dec = codec.vae.decode(jnp.asarray(v["z"]))
        enc = build_umt5(cfg)
        restore(enc, text_encoder_dir(run), "text_encoder")
        u = dict(np.load(FIX / "umt5_io.npz"))
        states = enc(jnp.asarray(u["input_ids"]), jnp.asarray(u["attention_mask"]))
        from sora_jax.inference.generate import Generator, Request

        pio = dict(np.load(FIX / "pipeline_io.npz"))
        gen = Generator(cfg, run)
        (z,) = gen.sample_latents([Request("a red car on a road", 9, 32, 32, noise=pio["noise"])], seed=0,
                                  guidance=5.0, steps=4, solver="euler")
        video = gen.codec.decode(z[None])[0]
        # the image-to-video transformer (36 -> 16 channels at full size, CLIP states, added K/V)
        i2v_run = os.path.join(tmp, "i2v_run")
        import_diffusers(make_i2v_folder(pathlib.Path(tmp) / "i2v"), i2v_run)
        i2v_cfg = read_config(i2v_run)
        i2v = build_dit(i2v_cfg)
        restore(i2v, os.path.join(i2v_run, "dit"), "dit")
        ti = dict(np.load(FIX / "transformer_i2v_io.npz"))
        err_i2v = float(np.abs(run_i2v(i2v, tuple(i2v_cfg.dit.patch), ti, "i2v") - ti["i2v_out"]).max())
        return dict(transformer_max_abs_err=err_t, transformer_i2v_max_abs_err=err_i2v,
                    pipeline_latents_max_abs_err=float(np.abs(z - pio["latents"]).max()),
                    pipeline_video_max_abs_err=float(np.abs(video - pio["video"]).max()),
                    vae_encode_max_abs_err=float(np.abs(np.asarray(mean) - v["enc_mean"]).max()),
                    vae_decode_max_abs_err=float(np.abs(np.asarray(dec) - v["dec_raw"]).max()),
                    umt5_max_abs_err=float(np.abs(np.asarray(states) - u["last_hidden_state"]).max()))


def manifests() -> dict:
    from flax import nnx

    from sora_jax.models import weight_map as wm
    from sora_jax.models.dit import DiT
    from sora_jax.models.umt5 import UMT5_IGNORED_KEYS, UMT5Config, UMT5Encoder, umt5_key_map
    from sora_jax.models.wan_dit import dit_fields, wan_transformer_key_map
    from sora_jax.models.wan_vae import WAN_VAE_IGNORED_KEYS, WanVAE, WanVAEConfig, wan_vae_key_map

    def matched(targets, reference, ours, ignored=()):
        ok = set(ignored) & set(reference)
        for t in targets:
            if all(s in reference for s in t.sources) and t.path in ours and wm.converted_shape(
                    t.convert, [reference[s] for s in t.sources]) == tuple(ours[t.path]):
                ok |= set(t.sources)
        return len(ok & set(reference))

    out = {}
    for size in ("1_3b", "14b", "i2v_14b"):
        m = json.loads((FIX / "manifests" / f"transformer_{size}.json").read_text())
        f = dit_fields(m["config"])
        d = dict(f["dit"])
        patch, in_channels = d.pop("patch"), d.pop("in_channels") or f["latent_channels"]
        model = nnx.eval_shape(lambda: DiT(in_dim=in_channels * int(np.prod(patch)),
                                           out_dim=f["latent_channels"] * int(np.prod(patch)), rngs=nnx.Rngs(0), **d))
        ours = wm.param_shapes(model)
        out[f"manifest_keys_matched_{size}"] = matched(wan_transformer_key_map(f["dit"]), m["shapes"], ours)
        out[f"manifest_keys_total_{size}"] = len(m["shapes"])
        out[f"params_{size}"] = int(sum(np.prod(s) for s in ours.values()))
        out[f"reference_params_{size}"] = m["params"]
    m = json.loads((FIX / "manifests" / "vae.json").read_text())
    cfg = WanVAEConfig.from_dict(m["config"])
    ours = wm.param_shapes(nnx.eval_shape(lambda: WanVAE(cfg)))
    out.update(manifest_keys_matched_vae=matched(wan_vae_key_map(cfg), m["shapes"], ours, WAN_VAE_IGNORED_KEYS),
               manifest_keys_total_vae=len(m["shapes"]), params_vae=int(sum(np.prod(s) for s in ours.values())),
               reference_params_vae=m["params"])
    m = json.loads((FIX / "manifests" / "umt5_xxl.json").read_text())
    ucfg = UMT5Config()
    ours = wm.param_shapes(nnx.eval_shape(lambda: UMT5Encoder(ucfg, rngs=nnx.Rngs(0))))
    out.update(manifest_keys_matched_umt5=matched(umt5_key_map(ucfg), m["shapes"], ours, UMT5_IGNORED_KEYS),
               manifest_keys_total_umt5=len(m["shapes"]), params_umt5=int(sum(np.prod(s) for s in ours.values())),
               reference_params_umt5=m["params"])
    return out


def _child(src: str, run: str) -> None:
    """The measured import, in a process of its own: prints its numbers as JSON."""
    import time

    import jax
    import jax.numpy as jnp

    from sora_jax import config as config_lib
    from sora_jax.interop.diffusers_import import import_weights

    jax.block_until_ready(jnp.zeros(8) + 1)  # the runtime is up: its memory is not the import's
    cfg = config_lib.load_config("wan2_1")
    baseline = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    report = import_weights(cfg, run, src)  # what `sora-jax import-weights` runs
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(seconds=seconds, bytes=report["bytes"], peak_mb=_rss_mb("VmHWM"), baseline_mb=baseline,
                          largest_component_bytes=max(c["bytes"] for c in report["components"].values()))))


def import_cost(mid: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", mid, os.path.join(tmp, "run")],
                             capture_output=True, text=True, check=True, cwd=ROOT)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = r["bytes"] / 1e9
    return dict(checkpoint_bytes=r["bytes"], import_seconds=round(r["seconds"], 2),
                import_seconds_per_gb=round(r["seconds"] / gb, 2), import_peak_rss_mb=round(r["peak_mb"], 1),
                import_baseline_rss_mb=round(r["baseline_mb"], 1),
                import_peak_rss_over_checkpoint_bytes=round((r["peak_mb"] - r["baseline_mb"]) * 2**20 / r["bytes"], 3),
                import_peak_rss_total_over_checkpoint_bytes=round(r["peak_mb"] * 2**20 / r["bytes"], 3))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mid", default=None, help="a pipeline folder to time the import on")
    p.add_argument("--make-mid", action="store_true", help="write one first (needs torch + diffusers)")
    p.add_argument("--mid-layers", type=int, default=6, help="transformer layers of --make-mid (8 x 128 wide)")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return
    result = dict(parity(), **manifests())
    if args.make_mid:
        sys.path.insert(0, str(FIX))
        import ref_transformer

        with tempfile.TemporaryDirectory() as tmp:
            mid = os.path.join(tmp, "mid")
            ref_transformer.make_pipeline(mid, FIX / "tiny", heads=8, layers=args.mid_layers, ffn=4096)
            result.update(import_cost(mid), mid_layers=args.mid_layers)
    elif args.mid:
        result.update(import_cost(args.mid))
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
