"""Input pipeline throughput: NaViT-packed DiT batches per second with the per-example work
(resize to a random resolution, patchify, token drop) in the training process or in Grain
worker processes (``dit_train.data_workers``).

Synthetic latent records of the default config's DiT-scale shapes (16 channels; 1, 5 and 9
latent frames at 32x32, 32x48 and 48x32, as 128-384 px clips in the 4x8x8 VAE), inline text
states; rows of 4096 tokens. Prints JSON: batches/s and real tokens/s per worker count (the
first batch, which holds the workers' start-up, is timed apart).

Run: ``python benchmarks/input_pipeline.py [--workers 0,1,2] [--batches 20] [--scale 4 --records 48]``
"""

from __future__ import annotations

import argparse
import json
import time

import grain
import ml_collections
import numpy as np

from sora_jax.configs.common import packing_section
from sora_jax.data.pipeline import batch_statistics, packed_dataset

SHAPES = [(t, h, w) for t in (1, 5, 9) for h, w in ((32, 32), (32, 48), (48, 32))]


def records(n: int, scale: int, channels: int = 16, text: int = 24):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t, h, w = SHAPES[i % len(SHAPES)]
        out.append({"latent": rng.standard_normal((t, h * scale, w * scale, channels)).astype(np.float32),
                    "text": rng.standard_normal((text, 384)).astype(np.float32)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20, help="timed batches after the first")
    p.add_argument("--rows", type=int, default=4, help="rows per batch")
    p.add_argument("--scale", type=int, default=1,
                   help="latent height and width x this (larger stored latents: more resizing work)")
    p.add_argument("--records", type=int, default=256)
    args = p.parse_args()
    cfg = ml_collections.ConfigDict(packing_section(
        row_length=4096, text_length=256, max_tokens=2048, resolution="uniform", min_scale=0.5,
        token_drop_rate=0.25, token_drop_distribution="uniform", packing_bins=16,
        max_examples_per_row=64))
    cfg.batch_size = args.rows
    source = grain.MapDataset.source(records(args.records, args.scale))
    out = {"rows": args.rows, "row_length": 4096, "batches": args.batches, "scale": args.scale}
    for workers in (int(w) for w in args.workers.split(",")):
        cfg.data_workers = workers
        it = iter(packed_dataset(source, cfg, (1, 2, 2), seed=0))
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0, real = time.perf_counter(), 0.0
        for _ in range(args.batches):
            real += batch_statistics(next(it))["real_tokens"]
        seconds = time.perf_counter() - t0
        if hasattr(it, "close"):
            it.close()
        out[f"workers_{workers}"] = {"first_batch_s": round(first, 2),
                                     "batches_per_s": round(args.batches / seconds, 2),
                                     "real_tokens_per_s": round(real / seconds)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
