"""Train-step wall time of the VAE and the DiT for a config, on whatever device JAX sees.

Prints JSON: ``vae_step_s``, ``dit_step_s`` (median of timed steps after one compile step),
``vae_params``, ``dit_params``, the batch shapes, and the device.

  python benchmarks/step_time.py --config configs/quickstart.py [--steps 5] [--config.a.b=v ...]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx


def _time_step(model, loss_fn, batch, steps, train_cfg, optimizer_fn=None, first_step=0, counted=None):
    from sora_jax.train.trainer import TrainStep, make_optimizer, skip_nonfinite

    tx, schedule = (optimizer_fn or make_optimizer)(train_cfg)
    step = TrainStep(model, nnx.Optimizer(model, skip_nonfinite(tx), wrt=nnx.Param), loss_fn, schedule, seed=0)
    t0 = time.perf_counter()
    jax.block_until_ready(step(batch, first_step)["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(batch, first_step + i + 1)["loss"])
        times.append(time.perf_counter() - t0)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(counted or model, nnx.Param)))
    return float(np.median(times)), compile_s, int(params)


def main():
    from sora_jax import config as config_lib
    from sora_jax.models.vae_gan import build_vae_train_model
    from sora_jax.models.factory import build_dit, build_vae, dit_in_dim
    from sora_jax.train.steps import dit_loss_fn, vae_loss_fn, vae_optimizer_fn

    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--steps", type=int, default=5)
    args, rest = p.parse_known_args()
    cfg = config_lib.apply_overrides(config_lib.load_config(args.config),
                                     [a[len("--config."):] for a in rest if a.startswith("--config.")])
    rng = np.random.default_rng(0)
    t, h, w = cfg.vae_train.crop
    video = rng.uniform(-1, 1, (cfg.vae_train.batch_size, t, h, w, 3)).astype(np.float32)
    # The VAE with its discriminator when the config's vae_loss turns the GAN on, timed at steps
    # from vae_loss.disc_start on (the GAN's cost is paid for most of a run); vae_params counts
    # the autoencoder alone.
    vae_model = build_vae_train_model(build_vae(cfg), cfg.vae_loss, nnx.Rngs(cfg.seed + 2))
    vae_s, vae_c, vae_p = _time_step(vae_model, vae_loss_fn(cfg.vae_loss), {"video": video}, args.steps,
                                     cfg.vae_train, vae_optimizer_fn(cfg.vae_loss),
                                     first_step=int(cfg.vae_loss.disc_start),
                                     counted=vae_model.vae)

    d = cfg.dit_train
    # rows of equal-sized examples, as many per row as the text room allows (cost is shape-bound)
    b, l, lt = d.batch_size, d.row_length, d.text_length
    per_row = max(1, min(d.max_examples_per_row or 8, lt // cfg.text.max_length))
    seg = (np.arange(l) * per_row // l + 1)[None].repeat(b, 0).astype(np.int32)
    tseg = (np.arange(lt) * per_row // lt + 1)[None].repeat(b, 0).astype(np.int32)
    batch = dict(tokens=rng.standard_normal((b, l, dit_in_dim(cfg))).astype(np.float32), segment_ids=seg,
                 positions=rng.integers(0, 8, (b, l, 3)).astype(np.int32), timesteps=np.zeros((b, l), np.float32),
                 loss_mask=np.ones((b, l), np.float32), text=rng.standard_normal((b, lt, 384)).astype(np.float32),
                 text_segment_ids=tseg)
    dit_s, dit_c, dit_p = _time_step(build_dit(cfg), dit_loss_fn(cfg.flow), batch, args.steps, d)
    print(json.dumps({
        "config": args.config, "device": str(jax.devices()[0]),
        "vae_step_s": round(vae_s, 4), "vae_compile_s": round(vae_c, 2), "vae_params": vae_p,
        "vae_batch": list(video.shape),
        "dit_step_s": round(dit_s, 4), "dit_compile_s": round(dit_c, 2), "dit_params": dit_p,
        "dit_batch": [b, l, lt], "dit_tokens_per_s": round(b * l / dit_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
