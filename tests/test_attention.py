"""Attention backends: chunked / splash / auto against the dense "xla" reference."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_jax.models import attention as attn
from sora_jax.models.attention import dot_product_attention

H, D = 2, 8


def _qkv(rng, b, lq, lk=None, dtype=np.float32):
    lk = lq if lk is None else lk
    q = rng.normal(size=(b, lq, H, D)).astype(dtype)
    k = rng.normal(size=(b, lk, H, D)).astype(dtype)
    v = rng.normal(size=(b, lk, H, D)).astype(dtype)
    return q, k, v


def _layouts(length):
    """(4, length) segment ids: many segments + padding, one full segment, padding only,
    two segments + padding."""
    seg = np.zeros((4, length), np.int32)
    bounds = np.linspace(0, length - 7, 6).astype(int)
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        seg[0, a:b] = s + 1
    seg[1] = 1
    seg[3, :length // 3] = 1
    seg[3, length // 3:length - 3] = 2
    return seg


@functools.partial(jax.jit, static_argnames=("backend", "block_q", "block_kv"))
def _value_and_grads(q, k, v, w, qs, ks, always, *, backend, block_q=512, block_kv=512):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                    kv_always_visible=always, backend=backend,
                                    block_q=block_q, block_kv=block_kv)
        return jnp.sum(jnp.sin(out) * w), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_matches_xla(q, k, v, qs, ks, always=None, *, backend="chunked", atol=2e-5, **kw):
    w = np.random.default_rng(7).normal(size=q.shape).astype(np.float32)
    ref, ref_g = _value_and_grads(q, k, v, w, qs, ks, always, backend="xla")
    out, g = _value_and_grads(q, k, v, w, qs, ks, always, backend=backend, **kw)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=1e-5)
    for name, a, b in zip("qkv", g, ref_g):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=f"d{name}")
    return np.asarray(out), [np.asarray(x) for x in g]


@pytest.mark.parametrize("block_q,block_kv", [(16, 16), (24, 40), (7, 13), (512, 512)])
def test_chunked_matches_xla_self_attention(block_q, block_kv):
    length = 50  # divisible by none of the block sizes
    seg = _layouts(length)
    q, k, v = _qkv(np.random.default_rng(0), 4, length)
    out, (dq, dk, dv) = _assert_matches_xla(q, k, v, seg, seg, block_q=block_q,
                                            block_kv=block_kv)
    pad = seg == 0
    # Padding queries: exactly 0 out, exactly 0 gradient; padding keys get no gradient.
    assert np.all(out[pad] == 0) and np.all(dq[pad] == 0)
    assert np.all(dk[pad] == 0) and np.all(dv[pad] == 0)
    assert np.all(out[2] == 0)  # the all-padding row


def test_chunked_cross_attention_with_always_visible_key():
    rng = np.random.default_rng(1)
    lq, lk = 40, 13
    qs = _layouts(lq)
    ks = np.zeros((4, lk), np.int32)
    ks[0, 1:5], ks[0, 5:9], ks[0, 9:12] = 1, 3, 5  # segments 2 and 4 have no text
    ks[1, 1:] = 1
    ks[3, 1:7] = 2
    always = np.zeros((4, lk), bool)
    always[:, 0] = True  # the null token, as in CrossAttention
    q, k, v = _qkv(rng, 4, lq, lk)
    out, _ = _assert_matches_xla(q, k, v, qs, ks, always, block_q=16, block_kv=8)
    # A segment without text sees only the null token: its output is that token's value.
    np.testing.assert_allclose(out[0, qs[0] == 2], np.broadcast_to(v[0, 0], out[0, qs[0] == 2].shape),
                               atol=1e-6)
    assert np.all(out[qs == 0] == 0)


def test_chunked_bfloat16_and_traced_scale():
    rng = np.random.default_rng(2)
    seg = _layouts(48)
    q, k, v = _qkv(rng, 4, 48)
    kw = {"q_segment_ids": seg, "kv_segment_ids": seg}
    ref = dot_product_attention(q, k, v, backend="xla", scale=0.3, **kw)
    out = jax.jit(lambda s: dot_product_attention(q, k, v, backend="chunked", scale=s,
                                                  block_q=16, block_kv=16, **kw))(jnp.float32(0.3))
    np.testing.assert_allclose(out, ref, atol=2e-6)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out_b = dot_product_attention(qb, kb, vb, backend="chunked", block_q=16, block_kv=16, **kw)
    assert out_b.dtype == jnp.bfloat16
    ref_b = dot_product_attention(qb, kb, vb, backend="xla", **kw)
    np.testing.assert_allclose(np.asarray(out_b, np.float32), np.asarray(ref_b, np.float32),
                               atol=0.05)


@st.composite
def _segment_rows(draw, length=37, rows=2):
    """Random rows: runs of random lengths with ids that may repeat or skip (non-contiguous
    segments too: correctness must not depend on the packing layout), padding anywhere."""
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        pos = 0
        while pos < length:
            n = draw(st.integers(1, 20))
            seg[r, pos:pos + n] = draw(st.integers(0, 4))
            pos += n
    return seg


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seg=_segment_rows(), always_first=st.booleans())
def test_chunked_matches_xla_random_layouts(seg, always_first):
    q, k, v = _qkv(np.random.default_rng(3), 2, seg.shape[1])
    always = np.zeros(seg.shape, bool)
    always[:, 0] = always_first
    _assert_matches_xla(q, k, v, seg, seg, always, block_q=8, block_kv=16)


def _cpu_backends():
    return ["xla", "chunked", "splash", "auto"]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_perturbing_one_segment_leaves_others_unchanged(backend):
    rng = np.random.default_rng(4)
    length = 64
    seg = np.zeros((2, length), np.int32)
    seg[0, :20], seg[0, 20:45], seg[0, 45:60] = 1, 2, 3
    seg[1, :30], seg[1, 30:] = 1, 2
    q, k, v = _qkv(rng, 2, length)
    f = functools.partial(dot_product_attention, q_segment_ids=seg, kv_segment_ids=seg,
                          backend=backend, block_q=16, block_kv=16)
    base = np.asarray(f(q, k, v))
    hit = seg == 2
    q2, k2, v2 = (np.where(hit[:, :, None, None], x + 10 * rng.normal(size=x.shape), x)
                  .astype(np.float32) for x in (q, k, v))
    out = np.asarray(f(q2, k2, v2))
    np.testing.assert_allclose(out[~hit], base[~hit], rtol=0, atol=1e-6)
    assert np.abs(out[hit] - base[hit]).max() > 0.1
    assert np.all(out[seg == 0] == 0)


def test_block_skipping_happens():
    length, seg_len, block = 256, 16, 16
    seg = np.repeat(np.arange(1, length // seg_len + 1), seg_len)[None].astype(np.int32)
    seg = np.concatenate([seg, seg])
    sched = np.asarray(attn.chunked_block_schedule(seg, seg, block_q=block, block_kv=block))
    n = length // block
    assert sched.shape == (2, n, n)
    np.testing.assert_array_equal(sched[0], np.eye(n, dtype=bool))  # only the diagonal
    # The kernel's own loop counter: it really evaluates only the scheduled pairs.
    prep = attn._prepare_blocks(*_qkv(np.random.default_rng(5), 2, length), seg, seg, None,
                                1.0, block, block)
    _, _, n_pairs = jax.jit(attn._chunked_forward, static_argnums=(6, 7))(*prep)
    assert int(n_pairs) == int(attn.chunked_computed_pairs(sched)) == 2 * n
    assert int(n_pairs) <= sched.size // 8
    # Misaligned segments straddle blocks: a band, still far from all pairs.
    seg_odd = np.repeat(np.arange(1, 25), 10)[None].astype(np.int32)
    band = np.asarray(attn.chunked_block_schedule(seg_odd, seg_odd, block_q=16, block_kv=16))
    assert band.sum() <= 3 * band.shape[1]
    # One full segment needs every pair; a padding-only row needs none.
    full = np.stack([np.ones(length, np.int32), np.zeros(length, np.int32)])
    sched_full = np.asarray(attn.chunked_block_schedule(full, full, block_q=block,
                                                        block_kv=block))
    assert sched_full[0].all() and not sched_full[1].any()
    # Always-visible keys are scheduled for every non-empty q block.
    always = np.zeros_like(seg, bool)
    always[:, -1] = True
    sched_al = np.asarray(attn.chunked_block_schedule(seg, seg, always, block_q=block,
                                                      block_kv=block))
    assert sched_al[0, :, -1].all() and sched_al[0].sum() == 2 * n - 1


def test_has_visible_key_matches_mask():
    rng = np.random.default_rng(6)
    qs = rng.integers(0, 5, size=(3, 30)).astype(np.int32)
    ks = rng.integers(0, 3, size=(3, 11)).astype(np.int32)
    always = np.zeros((3, 11), bool)
    always[1, 4] = True
    for al in (None, always):
        np.testing.assert_array_equal(attn.has_visible_key(qs, ks, al),
                                      np.asarray(attn.segment_mask(qs, ks, al)).any(-1))


def test_splash_layout_helpers():
    x = np.random.default_rng(7).normal(size=(2, 70, 3, 4)).astype(np.float32)
    y = attn.to_heads_major(x, 128)
    assert y.shape == (2, 3, 128, 4) and np.all(np.asarray(y)[:, :, 70:] == 0)
    np.testing.assert_array_equal(attn.from_heads_major(y, 70), x)
    assert attn.splash_block_size(70) == (128, 128)
    assert attn.splash_block_size(600) == (512, 1024)
    assert attn.splash_block_size(4096) == (512, 4096)


def test_splash_matches_xla_in_interpret_mode():
    # Off TPU the Pallas kernel runs in interpret mode: slow, so one small shape.
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    length = 70  # padded to one 128 block inside
    seg = _layouts(length)
    q, k, v = _qkv(np.random.default_rng(8), 4, length)
    out, (dq, _, _) = _assert_matches_xla(q, k, v, seg, seg, backend="splash", atol=5e-5)
    assert np.all(out[seg == 0] == 0) and np.all(dq[seg == 0] == 0)


def test_splash_with_always_visible_falls_back():
    rng = np.random.default_rng(9)
    qs = _layouts(20)
    ks = np.ones((4, 5), np.int32)
    always = np.zeros((4, 5), bool)
    always[:, 0] = True
    q, k, v = _qkv(rng, 4, 20, 5)
    kw = {"q_segment_ids": qs, "kv_segment_ids": ks, "kv_always_visible": always}
    np.testing.assert_array_equal(dot_product_attention(q, k, v, backend="splash", **kw),
                                  dot_product_attention(q, k, v, backend="xla", **kw))


def test_resolve_backend():
    big = int(np.sqrt(attn.AUTO_CHUNKED_MIN_PAIRS))
    assert attn.resolve_backend("auto", 64, 64, platform="gpu") == "cudnn"
    assert attn.resolve_backend("auto", 64, 64, platform="tpu") == "splash"
    assert attn.resolve_backend("auto", 4096, 80, platform="tpu",
                                has_always_visible=True) == "xla"
    assert attn.resolve_backend("auto", 64, 64, platform="cpu") == "xla"
    assert attn.resolve_backend("auto", big, big, platform="cpu") == "chunked"
    # Cross-attention to a short text context stays dense whatever Lq.
    assert attn.resolve_backend("auto", 16 * big, 200, platform="cpu",
                                has_always_visible=True) == "xla"
    assert attn.resolve_backend("chunked", 8, 8) == "chunked"
    assert attn.resolve_backend("xla", big, big) == "xla"


def test_unknown_backend_raises():
    x = np.zeros((1, 4, H, D), np.float32)
    seg = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        dot_product_attention(x, x, x, q_segment_ids=seg, kv_segment_ids=seg, backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.resolve_backend("pallas", 4, 4)
    with pytest.raises(ValueError, match="block sizes"):
        dot_product_attention(x, x, x, q_segment_ids=seg, kv_segment_ids=seg,
                              backend="chunked", block_q=0)


def test_dit_with_chunked_backend_matches_xla():
    from flax import nnx

    from sora_jax.models.dit import DiT

    rng = np.random.default_rng(10)
    b, length, lt = 2, 24, 6
    seg = np.zeros((b, length), np.int32)
    seg[0, :10], seg[0, 10:20], seg[1, :24] = 1, 2, 1
    text_seg = np.zeros((b, lt), np.int32)
    text_seg[0, :3], text_seg[1, :4] = 2, 1  # segment 1 of row 0 has no text
    args = (rng.normal(size=(b, length, 8)).astype(np.float32), seg,
            rng.integers(0, 4, size=(b, length, 3)).astype(np.int32),
            rng.uniform(size=(b, length)).astype(np.float32),
            rng.normal(size=(b, lt, 16)).astype(np.float32), text_seg)
    outs = []
    for backend in ("xla", "chunked"):
        model = DiT(in_dim=8, hidden_size=32, depth=1, num_heads=2, text_dim=16,
                    attention_backend=backend, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        prng = np.random.default_rng(11)  # non-zero everywhere, same for both backends
        state = jax.tree.map(
            lambda x, prng=prng: jnp.asarray(0.3 * prng.normal(size=x.shape), x.dtype), state)
        forward = jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(*args))
        outs.append(np.asarray(forward(state)))
    assert np.abs(outs[0]).max() > 0.1
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5, rtol=1e-5)


def test_balanced_blocks_cut_evenly():
    """Blocks cover the length in as many blocks as the requested size would, padding less
    than one multiple of 16 per block."""
    from sora_jax.models.attention import balanced_block

    assert balanced_block(1280, 1024) == 640 and balanced_block(1280, 512) == 432
    assert balanced_block(100, 256) == 100 and balanced_block(4096, 1024) == 1024
    for length in range(1, 3000, 37):
        for block in (128, 256, 1024):
            b = balanced_block(length, block)
            n = -(-length // b)
            assert b <= max(block, length) and n == -(-length // block)
            assert n * b - length < 16 * n
