"""Our DiT against diffusers' Wan 2.1 transformer on the same machine and shape.

Builds our DiT (``sora_jax.models.dit.DiT`` with Wan's shared timestep modulation,
``adaln="single"``) and diffusers' ``WanTransformer3DModel`` (eager PyTorch, SDPA attention,
no ``torch.compile``) at one shape, and times for each:

- a training step: rectified-flow velocity MSE on one video, backward, global-norm clipping
  at 1.0, AdamW. Ours is the training loop's own ``TrainStep`` (jitted, with the non-finite
  guard and the learning-rate schedule); the peer's is the usual PyTorch loop.
- a forward pass (ours jitted; the peer's under ``torch.no_grad``).

Each model runs in its own worker process, so each process's peak RSS (``VmHWM``: weights,
optimizer state, activations, compiler and runtime) is its own. The parent drives the two
workers in turn, one call at a time (ours, peer, ours, ...), so slow drifts of a shared
machine hit both alike; times are medians of ``--repeats`` calls after warm-up (compiling
and the first steps are excluded). Both use the same cores: ``--threads`` pins both workers
to that many CPUs and sets torch's thread count (default: all CPUs).

FLOPs per token are analytic (matmuls, 2 per multiply-add) and measured, each in a process of
its own before the timed workers start: ours by XLA's cost analysis of the forward pass
(unrolled, dense attention, per-token conditioning), the peer's by
``torch.utils.flop_counter.FlopCounterMode`` (which does not count torch's CPU SDPA kernel, so
it reads low by the attention scores). ``flops_difference`` lists the terms where the two
models differ; ``params_difference`` does the same for parameters.

  pip install -e ".[peer]"     # torch (CPU build) and diffusers; never needed by the package
  python benchmarks/peer_wan.py [--shape hidden=384,heads=6,depth=4,ffn=1536,latent=5x32x32]
                                [--repeats 7] [--threads 2] [--per-token-timesteps]

Prints one JSON object with ``ours_train_step_s``, ``peer_train_step_s``, ``ratio_train``
(ours / peer), ``ours_forward_s``, ``peer_forward_s``, ``ratio_forward``,
``ours_peak_rss_mb``, ``peer_peak_rss_mb``, ``params_ours``, ``params_peer``,
``flops_per_token_ours``, ``flops_per_token_peer``, ``threads``, ``device`` and details.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SHAPE = "hidden=384,heads=6,depth=4,ffn=1536,channels=16,latent=5x32x32,patch=1x2x2,text_len=32,text_dim=384"
MARK = "@@peer_wan "  # prefix of protocol lines on a worker's stdout (libraries may print too)


def parse_shape(text: str) -> dict:
    """``key=value,...`` over the defaults; ``latent`` and ``patch`` are ``TxHxW``.

    Raises:
      ValueError: an unknown key, a non-integer value, or a latent not divisible by the patch.
    """
    shape = {}
    for part in (DEFAULT_SHAPE + "," + text).split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in DEFAULT_SHAPE:
            raise ValueError(f"--shape: unknown key {key!r}; keys: {DEFAULT_SHAPE}")
        try:
            shape[key] = tuple(int(v) for v in value.split("x")) if key in ("latent", "patch") else int(value)
        except ValueError:
            raise ValueError(f"--shape: {key}={value!r} is not an integer (or TxHxW)") from None
    if any(n % p for n, p in zip(shape["latent"], shape["patch"])):
        raise ValueError(f"--shape: latent {shape['latent']} not divisible by patch {shape['patch']}")
    if shape["hidden"] % shape["heads"]:
        raise ValueError(f"--shape: hidden {shape['hidden']} not divisible by heads {shape['heads']}")
    shape["tokens"] = math.prod(n // p for n, p in zip(shape["latent"], shape["patch"]))
    shape["in_dim"] = shape["channels"] * math.prod(shape["patch"])
    return shape


def peer_flops_per_token(s: dict, per_token_timesteps: bool) -> dict:
    """Analytic forward FLOPs per latent token of ``WanTransformer3DModel`` (matmuls only),
    by term. Per-video terms (timestep MLP and modulation; text MLP and cross k/v) are
    amortised over the video's tokens; with per-token timesteps (Wan 2.2 TI2V) the timestep
    terms run per token."""
    h, f, L, Lt, dt = s["hidden"], s["ffn"], s["tokens"], s["text_len"], s["text_dim"]
    per_t = 1.0 if per_token_timesteps else 1.0 / L
    block = {
        "self_attention_qkvo": 2 * h * 4 * h,
        "self_attention_scores": 2 * 2 * L * h,
        "cross_attention_q_o": 2 * 2 * h * h,
        "cross_attention_scores": 2 * 2 * Lt * h,
        "cross_attention_kv": 2 * Lt * h * 2 * h / L,
        "ffn": 2 * 2 * h * f,
    }
    outer = {
        "patch_embedding": 2 * s["in_dim"] * h,
        "timestep_mlp": 2 * (256 * h + h * h) * per_t,
        "timestep_modulation": 2 * h * 6 * h * per_t,
        "text_mlp": 2 * (dt * h + h * h) * Lt / L,
        "final_linear": 2 * h * s["in_dim"],
    }
    terms = {**{k: v * s["depth"] for k, v in block.items()}, **outer}
    return {"total": float(sum(terms.values())), "terms": terms}


def ours_flops_terms(s: dict) -> dict:
    """The terms where our DiT's analytic forward FLOPs per token differ from Wan's
    (:func:`sora_jax.models.dit.dit_flops_per_token` counts them all)."""
    h, L, dt = s["hidden"], s["tokens"], s["text_dim"]
    return {
        "timestep_mlp_per_token": 2 * (256 * h + h * h),
        "timestep_modulation_per_token": 2 * h * 6 * h,
        "pooled_text_linear_per_token": 2 * dt * h,
        "final_adaln_linear_per_token": 2 * h * 2 * h,
        "cross_attention_null_key": s["depth"] * (2 * 2 * h + 2 * h * 2 * h / L),
    }


# ----------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def _send(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _warm_up(train, fwd, calls: int) -> float:
    """Runs both once (compiling), then ``calls`` more times; returns the first calls' seconds."""
    t0 = time.perf_counter()
    train()
    fwd()
    first = time.perf_counter() - t0
    for _ in range(calls):
        train()
        fwd()
    return first


def _serve(run: dict, ready: dict) -> None:
    """Worker loop: announce ``ready``, then run the named callable per stdin line."""
    _send(ready)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        if cmd == "rss":
            _send({"peak_rss_mb": _peak_rss_mb()})
            continue
        t0 = time.perf_counter()
        run[cmd]()
        _send({"s": time.perf_counter() - t0})


def _ours_worker(s: dict, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sora_jax import config as config_lib
    from sora_jax.models.factory import build_dit
    from sora_jax.models.info import xla_forward_flops
    from sora_jax.models.dit import dit_flops_per_token
    from sora_jax.train.host_memory import release_free_host_memory
    from sora_jax.train.steps import dit_loss_fn
    from sora_jax.train.trainer import TrainStep, make_optimizer, skip_nonfinite

    cfg = config_lib.load_config("configs/dit_ladder.py:S")
    cfg.dit.update(hidden_size=s["hidden"], depth=s["depth"], num_heads=s["heads"],
                   mlp_ratio=s["ffn"] / s["hidden"], text_dim=s["text_dim"], patch=s["patch"],
                   adaln="single", remat=False, scan_layers=args.scan_layers,
                   attention_backend=args.attention, dtype="float32")
    cfg.vae.latent_channels = s["channels"]
    cfg.text.max_length = s["text_len"]
    config_lib.apply_overrides(cfg, args.ours_override)
    L, Lt = s["tokens"], s["text_len"]
    if args.flops_only:
        _serve({}, {"flops_per_token_measured": xla_forward_flops(cfg, L, Lt) / L})
        return
    model = build_dit(cfg)
    tx, schedule = make_optimizer(cfg.dit_train)
    step = TrainStep(model, nnx.Optimizer(model, skip_nonfinite(tx), wrt=nnx.Param),
                     dit_loss_fn(cfg.flow, None), schedule, 0)
    t, hh, ww = (n // p for n, p in zip(s["latent"], s["patch"]))
    rng = np.random.default_rng(0)
    idx = np.arange(L)
    pos = np.stack([idx // (hh * ww), (idx // ww) % hh, idx % ww], -1).astype(np.int32)
    batch = {
        "tokens": rng.standard_normal((1, L, s["in_dim"])).astype(np.float32),
        "segment_ids": np.ones((1, L), np.int32),
        "positions": pos[None],
        "timesteps": np.zeros((1, L), np.float32),
        "loss_mask": np.ones((1, L), np.float32),
        "text": rng.standard_normal((1, Lt, s["text_dim"])).astype(np.float32),
        "text_segment_ids": np.ones((1, Lt), np.int32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, _ = nnx.split(model)

    def forward_fn(state, b):
        m = nnx.merge(graphdef, state)
        return m(b["tokens"], b["segment_ids"], b["positions"], jnp.full((1, L), 0.5),
                 b["text"], b["text_segment_ids"])

    forward = jax.jit(forward_fn).lower(step.state[0], batch).compile()
    release_free_host_memory()  # as TrainStep does after its compile

    counter = iter(range(10**9))

    def train():
        jax.block_until_ready(step(batch, next(counter))["loss"])

    def fwd():
        jax.block_until_ready(forward(step.state[0], batch))

    compile_s = _warm_up(train, fwd, args.warmup)
    params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    d = cfg.dit
    analytic = dit_flops_per_token(in_dim=s["in_dim"], hidden_size=d.hidden_size, depth=d.depth,
                                   mlp_ratio=d.mlp_ratio, text_dim=d.text_dim, seq_len=L,
                                   text_len=Lt, adaln=d.adaln, condition_groups=d.condition_groups)
    _serve({"train": train, "forward": fwd},
           {"params": params, "flops_per_token": analytic,
            "compile_s": compile_s, "attention": d.attention_backend, "scan_layers": bool(d.scan_layers),
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"})


def _peer_worker(s: dict, args) -> None:
    try:
        import torch
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        raise SystemExit(f"the peer needs torch and diffusers: pip install -e \".[peer]\" ({e})") from None
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=s["patch"], num_attention_heads=s["heads"], attention_head_dim=s["hidden"] // s["heads"],
        in_channels=s["channels"], out_channels=s["channels"], text_dim=s["text_dim"], freq_dim=256,
        ffn_dim=s["ffn"], num_layers=s["depth"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    x0 = torch.randn(1, s["channels"], *s["latent"])
    text = torch.randn(1, s["text_len"], s["text_dim"])
    L = s["tokens"]

    def timestep(t):
        return (t * 1000).expand(1, L) if args.per_token_timesteps else t * 1000

    if args.flops_only:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x0, timestep(torch.full((1,), 0.5)), text, return_dict=False)
        _serve({}, {"flops_per_token_measured": counter.get_total_flops() / L})
        return

    def train():
        t = torch.rand(1)
        noise = torch.randn_like(x0)
        xt = (1 - t) * x0 + t * noise
        pred = model(xt, timestep(t), text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def fwd():
        with torch.no_grad():
            model(x0, timestep(torch.full((1,), 0.5)), text, return_dict=False)

    compile_s = _warm_up(train, fwd, args.warmup)
    params = sum(p.numel() for p in model.parameters())
    _serve({"train": train, "forward": fwd},
           {"params": params, "flops_per_token": peer_flops_per_token(s, args.per_token_timesteps)["total"],
            "compile_s": compile_s,
            "torch": torch.__version__, "attention": "torch SDPA (diffusers native backend)",
            "device": "cpu"})


# ----------------------------------------------------------------------------- parent


class _Worker:
    def __init__(self, role: str, argv: list[str], cpus: list[int]):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", role, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.role = role
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the {self.role} worker exited with status {self.proc.wait()} (see stderr)")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="", help=f"overrides of {DEFAULT_SHAPE}")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per model and kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
    p.add_argument("--threads", type=int, default=0, help="CPUs for each worker (default: all)")
    p.add_argument("--per-token-timesteps", action="store_true",
                   help="give Wan a (1, L) timestep (Wan 2.2 TI2V): per-token conditioning, as ours")
    p.add_argument("--attention", default="auto", help="our attention backend")
    p.add_argument("--scan-layers", action="store_true", help="our blocks under nnx.scan")
    p.add_argument("--ours-override", nargs="*", default=[], help="config overrides, e.g. dit.adaln=single")
    p.add_argument("--no-measure-flops", dest="measure_flops", action="store_false")
    p.add_argument("--only", choices=("ours", "peer"), help="run one side (no ratios)")
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--flops-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    args.threads = args.threads or len(cpus)
    if args.threads > len(cpus):
        raise SystemExit(f"--threads {args.threads}: only {len(cpus)} CPUs available")
    shape = parse_shape(args.shape)
    if args.worker:
        {"ours": _ours_worker, "peer": _peer_worker}[args.worker](shape, args)
        return {}
    worker_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    worker_argv += ["--threads", str(args.threads)]
    roles = [args.only] if args.only else ["ours", "peer"]
    # measured FLOPs in processes of their own: compiling the per-token forward for XLA's count
    # would add to the timed worker's peak RSS
    measured = {r: None for r in roles}
    if args.measure_flops:
        for r in roles:
            w = _Worker(r, worker_argv + ["--flops-only"], cpus[:args.threads])
            measured[r] = w.info["flops_per_token_measured"]
            w.close()
    workers = {r: _Worker(r, worker_argv, cpus[:args.threads]) for r in roles}
    times = {(r, kind): [] for r in roles for kind in ("train", "forward")}
    for _ in range(args.repeats):
        for kind in ("train", "forward"):
            for r in roles:
                times[(r, kind)].append(workers[r].ask(kind)["s"])
    rss = {r: workers[r].ask("rss")["peak_rss_mb"] for r in roles}
    for w in workers.values():
        w.close()
    out = {"shape": {k: v for k, v in shape.items()}, "threads": args.threads,
           "per_token_timesteps": args.per_token_timesteps, "repeats": args.repeats}
    for r in roles:
        info = workers[r].info
        out.update({f"{r}_train_step_s": _median(times[(r, "train")]),
                    f"{r}_forward_s": _median(times[(r, "forward")]),
                    f"{r}_train_step_s_all": times[(r, "train")], f"{r}_forward_s_all": times[(r, "forward")],
                    f"{r}_peak_rss_mb": rss[r], f"params_{r}": info["params"],
                    f"flops_per_token_{r}": info["flops_per_token"],
                    f"flops_per_token_{r}_measured": measured[r],
                    f"{r}_first_calls_s": info["compile_s"], f"{r}_attention": info["attention"]})
    if "ours" in workers:
        out["device"] = workers["ours"].info["device"]
        out["ours_scan_layers"] = workers["ours"].info["scan_layers"]
    if not args.only:
        out["ratio_train"] = out["ours_train_step_s"] / out["peer_train_step_s"]
        out["ratio_forward"] = out["ours_forward_s"] / out["peer_forward_s"]
        out["peer_torch"] = workers["peer"].info["torch"]
        out["flops_difference"] = {
            "ours_minus_peer": out["flops_per_token_ours"] - out["flops_per_token_peer"],
            "ours_extra_terms": ours_flops_terms(shape),
            "peer_terms": peer_flops_per_token(shape, args.per_token_timesteps)["terms"],
        }
        out["params_difference"] = out["params_ours"] - out["params_peer"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
