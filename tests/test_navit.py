"""NaViT inputs: size under a token budget, token dropping, Grain packing, resume, sharding."""

import json

import grain
import ml_collections
import numpy as np
import pytest

from sora_jax.data import navit
from sora_jax.data.packing import patchify
from sora_jax.data.pipeline import batch_statistics, mixed_source, packed_dataset

PATCH = (1, 2, 2)
SHAPES = [(1, 8, 8), (1, 6, 10), (3, 8, 8), (3, 10, 6), (5, 6, 6), (2, 4, 12)]


def _records(n=48, channels=2, seed=0):
    """Records with a latent whose every value encodes (record id, t, y, x, c), and inline text."""
    recs = []
    for i in range(n):
        t, h, w = SHAPES[i % len(SHAPES)]
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), np.arange(channels),
                                    indexing="ij"), -1)
        code = i * 1e4 + grid[..., 0] * 1e3 + grid[..., 1] * 1e2 + grid[..., 2] * 10 + grid[..., 3]
        text = np.full((2 + i % 5, 3), i, np.float32)  # the record id, in every text token
        recs.append({"latent": code.astype(np.float32), "text": text})
    return recs


def _cfg(**kw):
    c = dict(batch_size=2, row_length=64, text_length=16, max_tokens=64, resolution="native",
             min_scale=0.5, token_drop_rate=0.0, token_drop_distribution="fixed", packing_bins=4,
             max_examples_per_row=6, data_workers=0)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- sizes and drops

@pytest.mark.parametrize("grid, budget", [((3, 16, 24), 64), ((1, 40, 40), 100), ((9, 8, 8), 50),
                                          ((1, 3, 50), 20), ((4, 2, 2), 3)])
def test_choose_grid_respects_budget_and_aspect(grid, budget):
    rng = np.random.default_rng(0)
    for resolution in ("native", "uniform"):
        for _ in range(20):
            nt, nh, nw = navit.choose_grid(grid, max_tokens=budget, rng=rng, resolution=resolution)
            assert nt * nh * nw <= budget
            assert 1 <= nt <= grid[0] and 1 <= nh <= grid[1] and 1 <= nw <= grid[2]
            if min(nh, nw) >= 4:  # rounding aside, the aspect ratio is kept
                assert abs(np.log((nh / nw) / (grid[1] / grid[2]))) < 0.35


def test_choose_grid_native_keeps_small_examples_and_uniform_varies():
    rng = np.random.default_rng(0)
    assert navit.choose_grid((3, 8, 12), max_tokens=500, rng=rng) == (3, 8, 12)
    sizes = {navit.choose_grid((3, 8, 12), max_tokens=500, rng=rng, resolution="uniform",
                               min_scale=0.5) for _ in range(50)}
    assert len(sizes) >= 3 and all(4 <= nh <= 8 for _, nh, _ in sizes)
    # sides shrink to min_side (2 patches) first; past that, the clip is shortened instead
    assert navit.choose_grid((9, 4, 4), max_tokens=32, rng=rng) == (8, 2, 2)
    assert navit.choose_grid((9, 8, 8), max_tokens=6, rng=rng) == (1, 2, 2)
    with pytest.raises(ValueError, match="resolution"):
        navit.choose_grid((1, 4, 4), max_tokens=8, rng=rng, resolution="random")


def test_resize_latent_identity_constants_and_area_average():
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(navit.resize_latent(x, 6, 8), x)
    const = np.full((1, 8, 12, 2), 0.7, np.float32)
    np.testing.assert_allclose(navit.resize_latent(const, 3, 5), 0.7, rtol=1e-6)
    # halving an axis with the antialiased filter averages neighbouring pairs (weights 1/4,
    # 3/4, 3/4, 1/4 around each centre), so a +1/-1 checkerboard stays near 0, not aliased
    checker = np.where((np.arange(8)[:, None] + np.arange(8)[None]) % 2, 1.0, -1.0)
    out = navit.resize_latent(checker[None, :, :, None].astype(np.float32), 4, 4)
    assert np.abs(out[:, 1:-1, 1:-1]).max() < 1e-6


def test_drop_tokens_is_deterministic_sorted_and_sized():
    a = navit.drop_tokens(np.random.default_rng(3), 100, 0.3)
    b = navit.drop_tokens(np.random.default_rng(3), 100, 0.3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 70 and np.all(np.diff(a) > 0) and a.max() < 100
    assert not np.array_equal(a, navit.drop_tokens(np.random.default_rng(4), 100, 0.3))
    assert len(navit.drop_tokens(np.random.default_rng(0), 5, 0.99)) == 1
    with pytest.raises(ValueError):
        navit.token_drop_rate(np.random.default_rng(0), 1.0)


# ----------------------------------------------------------------------------- packed pipeline

def test_packed_tokens_are_the_records_patches_at_their_positions():
    """Every packed token is the stored latent patch at its (t, h, w) position, of the record
    named by its own text: packing, resizing off, and dropping lose nothing else."""
    recs = _records()
    src = grain.MapDataset.source(recs)
    for batch in _take(packed_dataset(src, _cfg(token_drop_rate=0.4, token_drop_distribution="uniform"),
                                      PATCH, seed=0), 6):
        seg, text_seg = batch["segment_ids"], batch["text_segment_ids"]
        for r in range(seg.shape[0]):
            for s in set(seg[r].tolist()) - {0}:
                rid = int(batch["text"][r][text_seg[r] == s][0, 0])
                full, pos = patchify(recs[rid]["latent"], PATCH)
                lookup = {tuple(p): tok for p, tok in zip(pos.tolist(), full)}
                toks, ps = batch["tokens"][r][seg[r] == s], batch["positions"][r][seg[r] == s]
                assert 1 <= len(toks) <= len(full)
                for tok, p in zip(toks, ps.tolist()):
                    np.testing.assert_array_equal(tok, lookup[tuple(p)])
                assert batch["loss_mask"][r][seg[r] == s].min() == 1.0
        assert batch["loss_mask"][seg == 0].max(initial=0) == 0.0


def test_token_drop_and_random_resolution_are_deterministic_per_seed():
    src = grain.MapDataset.source(_records())
    cfg = _cfg(token_drop_rate=0.5, resolution="uniform", min_scale=0.4)
    a, b = _take(packed_dataset(src, cfg, PATCH, seed=5), 5), _take(packed_dataset(src, cfg, PATCH, seed=5), 5)
    _assert_batches_equal(a, b)
    c = _take(packed_dataset(src, cfg, PATCH, seed=6), 5)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # dropping removes tokens: fewer real tokens per example than without it
    full = _take(packed_dataset(src, _cfg(resolution="uniform", min_scale=0.4), PATCH, seed=5), 5)
    per_ex = lambda bs: np.mean([batch_statistics(x)["real_tokens"] / np.sum(x["segment_ids"].max(1))  # noqa: E731
                                 for x in bs])
    assert per_ex(a) < 0.85 * per_ex(full)


def test_iterator_state_resumes_the_exact_batches():
    src = grain.MapDataset.source(_records())
    cfg = _cfg(token_drop_rate=0.3, resolution="uniform")
    ds = packed_dataset(src, cfg, PATCH, seed=1)
    it = iter(ds)
    for _ in range(7):  # run past one epoch of 48 records
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(6)]
    resumed = iter(packed_dataset(src, cfg, PATCH, seed=1))
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(6)], expected)


def test_worker_processes_give_the_same_batches_and_resume_exactly():
    """The per-example NaViT work in 2 Grain worker processes: the in-process batches, and a
    checkpointed iterator state (the workers' positions) resumes them exactly."""
    src = grain.MapDataset.source(_records())
    cfg = _cfg(token_drop_rate=0.3, resolution="uniform")
    expected = _take(packed_dataset(src, cfg, PATCH, seed=1), 12)
    workers = packed_dataset(src, _cfg(token_drop_rate=0.3, resolution="uniform", data_workers=2),
                             PATCH, seed=1)
    it = iter(workers)
    try:
        got = [next(it) for _ in range(6)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    _assert_batches_equal(got, expected[:6])
    resumed = iter(workers)
    try:
        resumed.set_state(state)
        _assert_batches_equal([next(resumed) for _ in range(6)], expected[6:])
    finally:
        resumed.close()


def test_process_shards_are_disjoint_and_complete():
    recs = _records(n=50)
    ds = grain.MapDataset.source(recs)
    ids = []
    for p in range(3):
        shard = mixed_source([ds], process_index=p, process_count=3)
        ids.append({int(shard[i]["text"][0, 0]) for i in range(len(shard))})
    assert sum(len(s) for s in ids) == 50 and set().union(*ids) == set(range(50))
    # and each process's packed batches hold only its own records
    shard = mixed_source([ds], process_index=1, process_count=3)
    seen = set()
    # batch_size is the global batch: each of the 3 processes makes a third of its rows
    for batch in _take(packed_dataset(shard, _cfg(batch_size=6), PATCH, seed=0, process_count=3), 6):
        assert batch["tokens"].shape[0] == 2
        seen |= {int(v) for v in np.unique(batch["text"][batch["text_segment_ids"] > 0][:, 0])}
    assert seen <= ids[1] and len(seen) > 5
    with pytest.raises(ValueError, match="dit_train.batch_size.*multiple"):
        packed_dataset(shard, _cfg(batch_size=4), PATCH, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        mixed_source([ds], process_index=3, process_count=3)


def test_mixed_sources_follow_their_weights():
    images = grain.MapDataset.source([{"latent": np.zeros((1, 4, 4, 2), np.float32),
                                       "text": np.zeros((2, 3), np.float32)}] * 40)
    videos = grain.MapDataset.source([{"latent": np.zeros((3, 4, 4, 2), np.float32),
                                       "text": np.ones((2, 3), np.float32)}] * 40)
    mixed = mixed_source([images, videos], [0.25, 0.75])
    kinds = [int(mixed[i]["latent"].shape[0] == 3) for i in range(40)]
    assert 0.6 <= np.mean(kinds) <= 0.9


def test_packing_is_dense_at_large_rows():
    """With enough bins, first-fit leaves little padding in long rows."""
    src = grain.MapDataset.source(_records(n=96))
    stats = [batch_statistics(b) for b in
             _take(packed_dataset(src, _cfg(row_length=256, text_length=64, max_tokens=256,
                                            packing_bins=16, max_examples_per_row=32), PATCH, seed=0), 8)]
    assert np.mean([s["padding_fraction"] for s in stats]) < 0.05
    assert np.mean([s["examples_per_row"] for s in stats]) > 3


def test_two_jax_processes_read_disjoint_complete_shards(tmp_path):
    """Two real processes (jax.distributed on localhost): each reads its own shard."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # each child has its own device count
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "_shard_worker.py"), str(port),
                               str(i), str(tmp_path / f"p{i}.json"), here], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    res = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    assert [r["process"] for r in res] == [0, 1] and all(r["count"] == 2 for r in res)
    a, b = set(res[0]["ids"]), set(res[1]["ids"])
    assert not a & b and a | b == set(range(50))
    assert set(res[0]["batch_ids"]) <= a and set(res[1]["batch_ids"]) <= b
