"""NaViT packing vs Open-Sora-style bucketing: padding, examples per row, compiles, real tokens/s.

One run, one machine, one model, the same examples. A mixed dataset of latents (images and
videos of 3 durations, 5 aspect ratios; every example at a random NaViT resolution) is
trained on twice for the same number of steps:

- **packing** (ours): ``sora_jax.data.pipeline.packed_dataset``: first-fit rows of L tokens
  (segment ids), B rows per step, one batch shape.
- **bucketing** (the baseline, built the Open-Sora way): a fixed table of buckets (latent
  frames x patch rows x patch columns); each example goes to the smallest bucket that holds
  it and is padded up to the bucket's size; each bucket has its own batch size,
  floor(B * L / bucket tokens) (so a step holds at most as many tokens as ours); a batch is
  emitted when its bucket is full. Every bucket shape compiles its own train step.

Both use the same train step (``sora_jax.train.trainer.TrainStep``) and attention backend.
``real_tokens_per_s`` counts non-padding tokens over the wall time of steps that did not
compile (steady state); ``*_with_compile`` keys include compilation.

Run: ``python benchmarks/packing.py`` (about 10 minutes on 2 CPU cores; ``--steps`` scales it).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sora_jax.configs.common import packing_section, train_section  # noqa: E402
from sora_jax.data.packing import pack  # noqa: E402
from sora_jax.data.pipeline import NaViTExample, packed_dataset  # noqa: E402
from sora_jax.models.dit import DiT  # noqa: E402
from sora_jax.train.steps import dit_loss_fn  # noqa: E402
from sora_jax.train.trainer import TrainStep, make_optimizer, skip_nonfinite  # noqa: E402

PATCH = (1, 2, 2)
# native latent sizes (h, w): aspect ratios 1:1, 3:4, 4:3, 9:16, 16:9 (patch grids up to 16x16)
SIZES = ((32, 32), (24, 32), (32, 24), (18, 32), (32, 18))
FRAMES = (1, 3, 5, 9)  # latent frames: an image and videos of 3 durations (9, 17, 33 pixel frames)
FRAME_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
BUCKET_FRAMES = (1, 3, 5, 9)
BUCKET_SIDES = (4, 8, 12, 16)  # patches per side


def make_records(n: int, channels: int, text_dim: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        h, w = SIZES[rng.integers(len(SIZES))]
        t = int(rng.choice(FRAMES, p=FRAME_WEIGHTS))
        m = int(rng.integers(6, 17))
        recs.append({"latent": rng.standard_normal((t, h, w, channels)).astype(np.float32),
                     "text": rng.standard_normal((m, text_dim)).astype(np.float32)})
    return recs


def bucket_of(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Smallest bucket holding a patch grid (nt, nh, nw) in every dimension."""
    nt, nh, nw = grid
    pick = lambda sizes, v: next(s for s in sizes if s >= v)  # noqa: E731
    return pick(BUCKET_FRAMES, nt), pick(BUCKET_SIDES, nh), pick(BUCKET_SIDES, nw)


def bucketed_batches(source: grain.MapDataset, cfg, seed: int):
    """Open-Sora-style bucket sampler over the same examples (same NaViT sizes, no drop)."""
    transform = NaViTExample(cfg, PATCH)
    budget = cfg.batch_size * cfg.row_length
    pending: dict[tuple, list] = collections.defaultdict(list)
    ds = source.shuffle(seed=seed).repeat()
    ds = ds.random_map(transform, seed=seed)
    i = 0
    while True:
        ex = ds[i]
        i += 1
        pos = ex["positions"]
        grid = tuple(int(v) + 1 for v in pos.max(axis=0))
        bucket = bucket_of(grid)
        n_bucket = int(np.prod(bucket))
        bs = max(1, budget // n_bucket)
        pending[bucket].append(ex)
        if len(pending[bucket]) == bs:
            examples = pending.pop(bucket)
            for e in examples:
                e["text_mask"] = np.ones(len(e["text"]), bool)
            batch, _, dropped = pack(examples, batch_size=bs, length=n_bucket,
                                     text_length=cfg.text_length)
            assert dropped == 0
            yield bucket, batch


def run(name, batches, model_fn, cfg, flow_cfg, steps):
    model = model_fn()
    tx, schedule = make_optimizer(cfg)
    step = TrainStep(model, nnx.Optimizer(model, skip_nonfinite(tx), wrt=nnx.Param), dit_loss_fn(flow_cfg),
                     schedule, cfg.seed)
    real = pad = 0
    steady_tokens, steady_s, total_s = 0.0, 0.0, 0.0
    rows = []
    for i in range(steps):
        batch = next(batches)
        seg = batch["segment_ids"]
        n_real = int(np.sum(seg != 0))
        real += n_real
        pad += int(np.sum(seg == 0))
        rows.extend(len(np.unique(r[r != 0])) for r in seg)
        before = step.compiles
        t0 = time.perf_counter()
        aux = step(batch, i)
        jax.block_until_ready(aux["loss"])
        dt = time.perf_counter() - t0
        total_s += dt
        if step.compiles == before:
            steady_tokens += n_real
            steady_s += dt
        print(f"{name} step {i}: {seg.shape} compiles={step.compiles} {dt:.2f}s "
              f"loss={float(aux['loss']):.3f}", file=sys.stderr)
    return {
        "padding_fraction": pad / (real + pad),
        "examples_per_row": float(np.mean(rows)),
        "train_step_compiles": step.compiles,
        "real_tokens_per_s": steady_tokens / max(steady_s, 1e-9),
        "real_tokens_per_s_with_compile": real / total_s,
        "real_tokens": real,
        "seconds": total_s,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="packed steps; bucketing runs the same tokens")
    p.add_argument("--row-length", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--attention", default="auto")
    p.add_argument("--records", type=int, default=2000)
    args = p.parse_args(argv)

    cfg = train_section(steps=10**6, batch_size=args.batch_size, learning_rate=1e-4, warmup_steps=10)
    cfg.update(packing_section(row_length=args.row_length, text_length=args.row_length // 8,
                               max_tokens=2304, resolution="uniform", min_scale=0.5,
                               packing_bins=32, max_examples_per_row=64))
    flow_cfg = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, base_tokens=256,
                                              max_shift=3.0, caption_dropout=0.1,
                                              loss_weighting="per_token"))
    text_dim = 384
    in_dim = int(np.prod(PATCH)) * args.channels
    model_fn = lambda: DiT(in_dim=in_dim, hidden_size=args.hidden, depth=args.depth,  # noqa: E731
                           num_heads=args.heads, text_dim=text_dim,
                           attention_backend=args.attention, rngs=nnx.Rngs(0))
    source = grain.MapDataset.source(make_records(args.records, args.channels, text_dim))

    packed = run("packing", iter(packed_dataset(source, cfg, PATCH, seed=0)), model_fn, cfg,
                 flow_cfg, args.steps)
    # the baseline gets enough steps to process about the same number of real tokens
    bucket_batches, seen = [], 0
    for _, batch in bucketed_batches(source, cfg, seed=0):
        bucket_batches.append(batch)
        seen += int(np.sum(batch["segment_ids"] != 0))
        if seen >= packed["real_tokens"]:
            break
    bucket_steps = len(bucket_batches)
    bucketed = run("bucketing", iter(bucket_batches), model_fn, cfg, flow_cfg, bucket_steps)
    out = {
        "row_length": args.row_length,
        "rows_per_step": args.batch_size,
        "model": {"hidden": args.hidden, "depth": args.depth, "heads": args.heads,
                  "attention": args.attention, "in_dim": in_dim},
        "steps": args.steps,
        "padding_fraction": packed["padding_fraction"],
        "examples_per_row": packed["examples_per_row"],
        "train_step_compiles": packed["train_step_compiles"],
        "real_tokens_per_s": packed["real_tokens_per_s"],
        "real_tokens_per_s_with_compile": packed["real_tokens_per_s_with_compile"],
        "bucketing_steps": bucket_steps,
        "bucketing_padding_fraction": bucketed["padding_fraction"],
        "bucketing_train_step_compiles": bucketed["train_step_compiles"],
        "bucketing_real_tokens_per_s": bucketed["real_tokens_per_s"],
        "bucketing_real_tokens_per_s_with_compile": bucketed["real_tokens_per_s_with_compile"],
        "speedup_vs_bucketing": packed["real_tokens_per_s"] / bucketed["real_tokens_per_s"],
        "speedup_vs_bucketing_with_compile": (packed["real_tokens_per_s_with_compile"]
                                              / bucketed["real_tokens_per_s_with_compile"]),
        "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
