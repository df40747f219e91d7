"""Forward + backward wall time of segment attention: dense "xla" vs block-sparse "chunked".

Rows are packed like NaViT training rows: segments of 100-1500 tokens (uniform, clipped to
the row) placed first-fit until the row is full, padding (segment 0) at the end. For each
length prints one JSON object per line:

  {"L", "B", "H", "Dh", "segments", "block_q", "block_kv", "xla_fwd_bwd_s",
   "chunked_fwd_bwd_s", "speedup" (xla / chunked), "computed_block_fraction" (block pairs
   the chunked kernel evaluates / all pairs), "needed_block_fraction" (pairs that share a
   segment / all pairs), "example_pair_fraction" (sum of squared example lengths / B L^2:
   the score work of attending each example alone, as bucketing would), "max_abs_err"
   (chunked vs xla output), "device"}

Times are medians of ``--repeats`` runs after one compile run, of
``jax.grad(sum(attention(q, k, v) * w))`` with respect to q, k, v.

  python benchmarks/attention.py [--lengths 1024 4096] [--block-q 1024] [--block-kv 256]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.attention import (
    DEFAULT_BLOCK_KV,
    DEFAULT_BLOCK_Q,
    chunked_block_schedule,
    chunked_computed_pairs,
    dot_product_attention,
)


def packed_segment_ids(rng: np.random.Generator, batch: int, length: int,
                       min_len: int = 100, max_len: int = 1500) -> tuple[np.ndarray, list]:
    """(B, L) int32 segment ids of first-fit packed rows and the segment lengths per row."""
    seg = np.zeros((batch, length), np.int32)
    lengths = []
    for b in range(batch):
        pos, sid, row = 0, 1, []
        while length - pos >= min_len:
            n = int(rng.integers(min_len, max_len + 1))
            if n > length - pos:
                # An example longer than the row is cropped to it (as the pipeline crops);
                # otherwise first fit would find a shorter later example for the tail: draw
                # one that fits half the time, else leave the tail as padding.
                if pos == 0:
                    n = length
                elif rng.random() < 0.5:
                    break
                else:
                    n = int(rng.integers(min_len, length - pos + 1))
            seg[b, pos:pos + n] = sid
            row.append(n)
            pos, sid = pos + n, sid + 1
        lengths.append(row)
    return seg, lengths


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(length: int, *, batch: int, heads: int, head_dim: int, block_q: int, block_kv: int,
          repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    seg, seg_lengths = packed_segment_ids(rng, batch, length)
    seg = jnp.asarray(seg)
    q, k, v, w = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
                  for _ in range(4))

    def fwd_bwd(backend):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                        backend=backend, block_q=block_q, block_kv=block_kv)
            return jnp.sum(out * w), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    xla_fn, chunked_fn = fwd_bwd("xla"), fwd_bwd("chunked")
    err = float(jnp.max(jnp.abs(xla_fn(q, k, v)[1] - chunked_fn(q, k, v)[1])))
    t_xla = _time(xla_fn, (q, k, v), repeats)
    t_chunked = _time(chunked_fn, (q, k, v), repeats)
    sched = chunked_block_schedule(seg, seg, block_q=block_q, block_kv=block_kv)
    total = sched.size
    return {"L": length, "B": batch, "H": heads, "Dh": head_dim, "segments": seg_lengths,
            "block_q": block_q, "block_kv": block_kv,
            "xla_fwd_bwd_s": round(t_xla, 4), "chunked_fwd_bwd_s": round(t_chunked, 4),
            "speedup": round(t_xla / t_chunked, 2),
            "computed_block_fraction": round(int(chunked_computed_pairs(sched)) / total, 3),
            "needed_block_fraction": round(int(jnp.sum(sched)) / total, 3),
            "example_pair_fraction": round(
                sum(n * n for row in seg_lengths for n in row) / (batch * length**2), 3),
            "max_abs_err": err, "device": str(jax.devices()[0].device_kind)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-q", type=int, default=DEFAULT_BLOCK_Q)
    p.add_argument("--block-kv", type=int, default=DEFAULT_BLOCK_KV)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for length in args.lengths:
        print(json.dumps(bench(length, batch=args.batch, heads=args.heads,
                               head_dim=args.head_dim, block_q=args.block_q,
                               block_kv=args.block_kv, repeats=args.repeats,
                               seed=args.seed)), flush=True)


if __name__ == "__main__":
    main()
