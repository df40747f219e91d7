"""Causal VAE encode / decode speed and the memory of decoding long videos, chunked vs. whole.

Builds the ``vae`` section of a config (random initial weights: speed and memory do not
depend on trained values) and measures, for a short video of ``--frames`` frames and a long
one 4x longer (1 + 4 * (frames - 1) frames, so both are 1 + td*k):

- ``encode_frames_per_s`` / ``decode_frames_per_s``: frames per second of
  ``sora_jax.models.vae_streaming.StreamingVAE`` (time chunks of ``--chunk`` latent frames with
  the feature cache, optional ``--tile`` / ``--overlap`` spatial tiling) on the long video, after
  compiling on the short one (compilation excluded). ``*_whole_pass`` keys: one jitted
  ``CausalVAE.encode`` / ``decode`` over the whole long video, for contrast.
- ``decode_memory_ratio_4x_length``: peak memory of decoding the long video over that of the
  short one, with chunking, streaming the frames out (``iter_decode``: what a writer of an mp4
  does). Measured with XLA: max over the compiled chunk programs (first and later chunks) of
  argument + output + temporary - aliased bytes (``compiled.memory_analysis()``), plus the host
  buffers the driver holds: the input latents and one chunk of output frames. Target <= 1.2.
  ``*_with_output_array``: the same plus the whole decoded video held on the host
  (``decode()``'s return value, which necessarily grows with length).
  ``*_whole_pass``: the same XLA measure for one jitted whole-video decode.
- ``decode_rss_*``: the same comparison measured, not estimated: in fresh subprocesses, after
  compiling, the peak resident set size reached during the decode (Linux VmHWM after resetting
  it through /proc/self/clear_refs) minus the RSS before it, with glibc's mmap threshold fixed
  so that freed buffers leave the RSS. ``--rss-repeats`` subprocesses per (mode, length), short
  and long alternating; the medians are reported (``decode_rss_peak_increase_bytes``), every run
  in ``decode_rss_runs``, and ``decode_memory_ratio_4x_length`` is the ratio of the medians.
  The children run XLA:CPU with synchronous dispatch (``jax_cpu_enable_async_dispatch`` False).
  With JAX's default asynchronous dispatch, XLA:CPU marks a chunk's outputs ready before its
  worker thread frees that chunk's temporaries; on a busy machine the next chunk can start
  before they are gone, so the peak briefly holds about two chunks' working memory (observed:
  up to ~20 MB over ~49 MB for configs/vae_4x8x8_c16.py). That overlap depends on thread
  scheduling, not on the video's length (a longer video, with more chunks, only has more
  chances to hit it), so it is kept out of the headline and reported on its own:
  ``decode_rss_*_async_dispatch`` (stream mode, default dispatch, same repeats).
  Skipped with ``--no-rss`` or where /proc is unavailable.

Run: ``python benchmarks/vae.py --config configs/quickstart.py`` (a few minutes on 2 CPU
cores, most of it the 6 x ``--rss-repeats`` RSS subprocesses of about 8 s each for
``configs/vae_4x8x8_c16.py``; ``--height``, ``--width``, ``--frames``, ``--chunk`` scale it).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sora_jax.config import load_config  # noqa: E402
from sora_jax.models.vae import CausalVAE  # noqa: E402
from sora_jax.models.vae_streaming import StreamingVAE  # noqa: E402


def vae_kwargs(config_path: str) -> dict:
    """CausalVAE kwargs from a config's ``vae`` section.

    Raises:
      ValueError: if the section names a ``kind`` other than "causal" (no causal VAE to time).
    """
    kw = dict(load_config(config_path).vae)
    kind = kw.pop("kind", "causal")
    if kind != "causal":
        raise ValueError(f"{config_path}: vae.kind={kind!r}; this benchmark times the causal VAE")
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    return kw


def program_bytes(compiled) -> int:
    """Peak bytes XLA plans for one program: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def _nbytes(*shape: int) -> int:
    return int(np.prod(shape)) * 4


def _peak_rss_child(args) -> dict:
    """Runs in a subprocess: the RSS increase of one decode (see module docstring)."""
    if not args.child_async:
        # Read when the CPU client is created (first use below), so set before anything runs.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    vae = CausalVAE(**vae_kwargs(args.config), rngs=nnx.Rngs(0))
    sv = StreamingVAE(vae, chunk=args.chunk, tile=args.tile, overlap=args.overlap)
    z = np.random.default_rng(0).standard_normal(
        (args.batch, args.child_latent_frames, args.height // vae.spatial_downsample,
         args.width // vae.spatial_downsample, vae.latent_channels)).astype(np.float32)
    gd, state = nnx.split(vae)
    if args.child_mode == "whole":
        compiled = jax.jit(lambda st, z: nnx.merge(gd, st).decode(z)).lower(
            state, jax.ShapeDtypeStruct(z.shape, jnp.float32)).compile()
    else:
        for _ in sv.iter_decode(z[:, :2]):  # compiles the first- and later-chunk programs
            pass

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    # XLA:CPU frees a program's buffers asynchronously: let the warm-up's go before the baseline.
    jax.effects_barrier()
    gc.collect()
    time.sleep(0.5)
    before = status("VmRSS:")
    traces = sum(sv.trace_counts.values())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    if args.child_mode == "whole":
        out = np.asarray(compiled(state, jnp.asarray(z)))
        total = float(out[0, 0, 0, 0, 0])
    elif args.child_mode == "stream":
        total = 0.0
        for y in sv.iter_decode(z):
            total += float(y[0, 0, 0, 0, 0])
    else:
        out = sv.decode(z)
        total = float(out[0, 0, 0, 0, 0])
    peak = status("VmHWM:")
    # nothing may compile during the measured decode (the chunk programs serve every length)
    compiled = sum(sv.trace_counts.values()) - traces
    return {"peak_increase_bytes": peak - before, "checksum": total, "compiled_during_decode": compiled}


def rss_increase(args, mode: str, latent_frames: int, async_dispatch: bool = False) -> int:
    """Peak RSS increase of one decode in a fresh subprocess (see ``_peak_rss_child``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config,
           "--height", str(args.height), "--width", str(args.width), "--batch", str(args.batch),
           "--child-mode", mode, "--child-latent-frames", str(latent_frames)]
    if async_dispatch:
        cmd += ["--child-async"]
    if args.chunk is not None:
        cmd += ["--chunk", str(args.chunk)]
    if args.tile is not None:
        cmd += ["--tile", str(args.tile), "--overlap", str(args.overlap)]
    # A fixed mmap threshold makes glibc map every large buffer on its own and unmap it when
    # freed, so RSS follows live memory; glibc's default (a threshold that rises after each
    # large free) keeps freed XLA temporaries in the heap and makes peaks depend on chunk count.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["compiled_during_decode"]:
        raise RuntimeError(f"{mode} decode of {latent_frames} latent frames compiled "
                           f"{res['compiled_during_decode']} program(s) while measured")
    return res["peak_increase_bytes"]


def rss_runs(args, mode: str, lengths: dict, async_dispatch: bool = False) -> dict:
    """{name: [peak RSS increase of each of ``args.rss_repeats`` fresh subprocesses]}, the
    lengths alternating so that a change in the machine's load falls on both."""
    runs = {name: [] for name in lengths}
    for _ in range(args.rss_repeats):
        for name, t in lengths.items():
            runs[name].append(rss_increase(args, mode, t, async_dispatch))
    return runs


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frames", type=int, default=17,
                   help="frames of the short video (1 + td*k); the long one has 1 + 4*(frames-1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1, help="latent frames per time chunk")
    p.add_argument("--tile", type=int, default=None, help="spatial tile in pixels (default: none)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported)")
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    p.add_argument("--rss-repeats", type=int, default=5,
                   help="fresh subprocesses per (mode, length) for the RSS measurement (median reported)")
    p.add_argument("--child-mode", choices=("whole", "stream", "array"), help=argparse.SUPPRESS)
    p.add_argument("--child-latent-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-async", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_repeats < 1:
        p.error("--rss-repeats must be >= 1")
    if args.child_mode:
        print(json.dumps(_peak_rss_child(args)))
        return

    wall0 = time.perf_counter()
    kw = vae_kwargs(args.config)
    vae = CausalVAE(**kw, rngs=nnx.Rngs(0))
    td, s = vae.temporal_downsample, vae.spatial_downsample
    T_short = args.frames
    vae.latent_shape(T_short, args.height, args.width)  # raises a clear ValueError for bad sizes
    T_long = 1 + 4 * (T_short - 1)
    t_short, t_long = (T_short - 1) // td + 1, (T_long - 1) // td + 1
    B, H, W, C, c = args.batch, args.height, args.width, vae.in_channels, vae.latent_channels
    h, w = H // s, W // s
    sv = StreamingVAE(vae, chunk=args.chunk, tile=args.tile, overlap=args.overlap)
    rng = np.random.default_rng(0)
    video = {T: rng.uniform(-1, 1, (B, T, H, W, C)).astype(np.float32) for T in (T_short, T_long)}

    # ---- speed (chunked), compiling on the short video first
    t0 = time.perf_counter()
    z_short = sv.encode(video[T_short])
    sv.decode(z_short)
    compile_s = time.perf_counter() - t0
    z_long = sv.encode(video[T_long])
    enc_s = _time(lambda: sv.encode(video[T_long]), args.repeats)
    dec_s = _time(lambda: sv.decode(z_long), args.repeats)

    # ---- speed (whole pass), compiled ahead of time for the long video
    gd, state = nnx.split(vae)
    enc_whole = jax.jit(lambda st, x: nnx.merge(gd, st).encode(x)[0])
    dec_whole = jax.jit(lambda st, z: nnx.merge(gd, st).decode(z))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    whole_bytes = {}
    for name, T, t in (("short", T_short, t_short), ("long", T_long, t_long)):
        whole_bytes[name] = {
            "encode": program_bytes(enc_whole.lower(state, spec(B, T, H, W, C)).compile()),
            "decode": program_bytes(dec_whole.lower(state, spec(B, t, h, w, c)).compile()),
        }
    x_long, zl = jnp.asarray(video[T_long]), jnp.asarray(z_long)
    jax.block_until_ready(enc_whole(state, x_long))
    jax.block_until_ready(dec_whole(state, zl))
    enc_whole_s = _time(lambda: np.asarray(enc_whole(state, x_long)), args.repeats)
    dec_whole_s = _time(lambda: np.asarray(dec_whole(state, zl)), args.repeats)

    # ---- memory (XLA analysis of the chunk programs + host buffers)
    chunk_frames = td * (args.chunk or 1)
    mem = {}
    for name, T, t in (("short", T_short, t_short), ("long", T_long, t_long)):
        latents, frames = _nbytes(B, t, h, w, c), _nbytes(B, T, H, W, C)
        # compiled per length; the chunk programs come out the same because chunking makes
        # them independent of the length (the whole-pass programs, above, do not)
        dec_dev = max(program_bytes(c_) for c_ in sv.compiled_steps("decode", (B, t, h, w, c)).values())
        enc_dev = max(program_bytes(c_) for c_ in sv.compiled_steps("encode", (B, T, H, W, C)).values())
        mem[name] = {
            "decode_stream": dec_dev + latents + _nbytes(B, chunk_frames, H, W, C),
            "decode_array": dec_dev + latents + frames,
            "encode_stream": enc_dev + _nbytes(B, chunk_frames, H, W, C) + latents,
        }
    ratio = lambda a, b: round(b / a, 4)  # noqa: E731
    out = {
        "config": args.config,
        "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        "weights": "random init (speed and memory do not depend on trained values)",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "batch": B, "height": H, "width": W,
        "frames_short": T_short, "frames_long": T_long,
        "chunk_latent_frames": args.chunk, "tile": args.tile, "overlap": sv.overlap[0] if args.tile else None,
        "encode_frames_per_s": round(B * T_long / enc_s, 2),
        "decode_frames_per_s": round(B * T_long / dec_s, 2),
        "encode_frames_per_s_whole_pass": round(B * T_long / enc_whole_s, 2),
        "decode_frames_per_s_whole_pass": round(B * T_long / dec_whole_s, 2),
        "decode_memory_ratio_4x_length": ratio(mem["short"]["decode_stream"], mem["long"]["decode_stream"]),
        "decode_memory_ratio_4x_length_xla": ratio(mem["short"]["decode_stream"], mem["long"]["decode_stream"]),
        "decode_memory_measure": (
            "XLA compiled.memory_analysis(): max over the jitted first-chunk and later-chunk "
            "programs of argument+output+temp-alias bytes, plus host buffers: input latents and "
            "one chunk of decoded frames (frames streamed out by iter_decode)"),
        "decode_memory_bytes": {k: v["decode_stream"] for k, v in mem.items()},
        "decode_memory_ratio_4x_length_with_output_array": ratio(
            mem["short"]["decode_array"], mem["long"]["decode_array"]),
        "decode_memory_ratio_4x_length_whole_pass": ratio(
            whole_bytes["short"]["decode"], whole_bytes["long"]["decode"]),
        "decode_memory_bytes_whole_pass": {k: v["decode"] for k, v in whole_bytes.items()},
        "encode_memory_ratio_4x_length": ratio(mem["short"]["encode_stream"], mem["long"]["encode_stream"]),
        "encode_memory_ratio_4x_length_whole_pass": ratio(
            whole_bytes["short"]["encode"], whole_bytes["long"]["encode"]),
        "compile_s_chunked": round(compile_s, 2),
    }
    if not args.no_rss and os.path.exists("/proc/self/clear_refs"):
        lengths = {"short": t_short, "long": t_long}
        runs = {mode: rss_runs(args, mode, lengths) for mode in ("stream", "whole")}
        runs_async = rss_runs(args, "stream", lengths, async_dispatch=True)
        med = lambda v: int(np.median(v))  # noqa: E731
        rss = {mode: {k: med(v) for k, v in r.items()} for mode, r in runs.items()}
        rss_async = {k: med(v) for k, v in runs_async.items()}
        out["decode_rss_measure"] = (
            f"peak RSS increase during one decode in a fresh subprocess, after compiling (nothing "
            f"compiles during it), median of {args.rss_repeats} subprocesses per (mode, length) "
            f"(VmHWM reset via /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072 so freed "
            f"buffers leave RSS; XLA:CPU synchronous dispatch, so each chunk's temporaries are "
            f"freed before the next chunk starts); stream = chunked iter_decode, whole = one "
            f"jitted whole-video decode. *_async_dispatch: stream mode with JAX's default "
            f"asynchronous dispatch, where a chunk's temporaries may still be held when the next "
            f"chunk starts (thread scheduling, not the length; more chunks only give it more chances)")
        out["decode_rss_peak_increase_bytes"] = rss
        out["decode_rss_runs"] = runs
        out["decode_rss_ratio_4x_length"] = ratio(rss["stream"]["short"], rss["stream"]["long"])
        out["decode_rss_ratio_4x_length_runs"] = [
            ratio(a, b) for a, b in zip(runs["stream"]["short"], runs["stream"]["long"])]
        out["decode_rss_ratio_4x_length_whole_pass"] = ratio(
            rss["whole"]["short"], rss["whole"]["long"])
        out["decode_rss_peak_increase_bytes_async_dispatch"] = rss_async
        out["decode_rss_runs_async_dispatch"] = runs_async
        out["decode_rss_ratio_4x_length_async_dispatch"] = ratio(rss_async["short"], rss_async["long"])
        # the headline key is the measured one where RSS can be measured (Linux)
        out["decode_memory_ratio_4x_length"] = out["decode_rss_ratio_4x_length"]
        out["decode_memory_measure"] = (
            "measured RSS, median of fresh subprocesses (see decode_rss_measure); XLA estimate in *_xla")
    out["wall_s"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
