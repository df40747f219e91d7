"""Segment-masked multi-head attention for packed sequences (NaViT, Dehghani et al. 2023).

A packed row holds several examples, told apart by segment ids (0 = padding). A query may
attend to a key only when both carry the same non-zero segment id, so examples packed in
one row never see each other and the result equals running each example alone.

Backends of :func:`dot_product_attention`:

- ``"xla"``: dense einsum + masked softmax in float32; the reference. Costs a full
  (Lq, Lk) score matrix per head, forward and backward.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only.
- ``"chunked"``: block-sparse flash attention in pure JAX (any device): online softmax over
  key blocks (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
  Dao et al. 2022, "FlashAttention"), a hand-written FlashAttention backward
  (``jax.custom_vjp``), and (q block, kv block) pairs that share no segment skipped.
  Memory is O(L) per head; compute is O(sum over segments of their length squared),
  rounded up to blocks.
- ``"splash"``: TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.
  splash_attention``, the "sparse flash" kernel of JAX) with segment ids; fused and O(L)
  memory, but with a full static mask it evaluates every block pair (segment ids are
  dynamic, applied inside blocks). Off TPU it runs in Pallas interpret mode (slow; tests).
- ``"auto"``: picks one of the above for the device and sizes, see :func:`resolve_backend`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

ATTENTION_BACKENDS = ("xla", "cudnn", "chunked", "splash", "auto")

# "auto" on CPU switches from the dense einsum to "chunked" at this many (query, key) pairs
# per row and head. Measured with benchmarks/attention.py (forward + backward, B=2, H=6,
# Dh=64, packed rows of 100-1500-token segments, 2 shared CPU cores): at L = 1024 (rows of
# one or two examples, nothing to skip) the two are even, at L = 2048 "chunked" is ~1.7x and
# at L = 4096 ~2.5x faster, with O(L) instead of O(L^2) activation memory. Below it the dense
# path is as fast and compiles faster.
AUTO_CHUNKED_MIN_PAIRS = 1024 * 1024

# On CPU each block's matmuls must be large enough for XLA to split them over the cores
# (issue 15, 2 cores, forward + backward): at L = 4096 (B = 2, packed rows of 100-1500-token
# segments) q blocks of 512 took 594 ms and 1024 624 ms against 873 ms for 256, which skips
# more pairs but runs its small matmuls on one core; for one 1280-token video (H = 6) q blocks
# of 640 took 71 ms against 105 ms for 256. Blocks are balanced (balanced_block).
DEFAULT_BLOCK_Q = 1024
DEFAULT_BLOCK_KV = 256
SPLASH_MAX_BLOCK = 512


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                 kv_always_visible: jax.Array | None = None) -> jax.Array:
    """Boolean attention mask (B, Lq, Lk) of packed segments.

    mask[b, i, j] = (q_seg[b, i] == kv_seg[b, j] or kv_always_visible[b, j]) and
    q_seg[b, i] != 0. Padding queries (segment 0) see nothing; padding keys (segment 0)
    are seen by no real query.
    """
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_always_visible is not None:
        mask = mask | kv_always_visible.astype(bool)[:, None, :]
    return mask & (q_segment_ids != 0)[:, :, None]


def has_visible_key(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                    kv_always_visible: jax.Array | None = None) -> jax.Array:
    """Whether each query may attend to at least one key: ``segment_mask(...).any(-1)``.

    Computed by sorting the key segments and binary search, O((Lq + Lk) log Lk) per row,
    so it never builds the (Lq, Lk) mask.

    Args:
      q_segment_ids: (B, Lq) int, 0 = padding.
      kv_segment_ids: (B, Lk) int, 0 = padding.
      kv_always_visible: optional (B, Lk) bool.

    Returns:
      (B, Lq) bool.
    """
    def row(qs, ks):
        sorted_ks = jnp.sort(ks)
        pos = jnp.clip(jnp.searchsorted(sorted_ks, qs), 0, ks.shape[0] - 1)
        return sorted_ks[pos] == qs

    found = jax.vmap(row)(q_segment_ids, kv_segment_ids)
    if kv_always_visible is not None:
        found = found | jnp.any(kv_always_visible.astype(bool), axis=-1, keepdims=True)
    return found & (q_segment_ids != 0)


# --------------------------------------------------------------------------- chunked


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)  # zeros: segment 0 = padding, never attended


def balanced_block(length: int, block: int, multiple: int = 16) -> int:
    """The block size that cuts ``length`` into as many blocks as ``block`` would, but
    evenly: ceil(length / n) rounded up to ``multiple`` (n = ceil(length / block)), so the
    padding is under n * multiple instead of up to a whole block (1280 tokens with
    block 512: 3 blocks of 432, not 3 of 512). Never larger than ``block`` rounded up to
    ``multiple`` nor than ``length``."""
    if length <= block:
        return length
    n = -(-length // block)
    even = -(-length // n)
    return min(block, -(-even // multiple) * multiple)


def _block_sizes(lq: int, lk: int, block_q: int, block_kv: int) -> tuple[int, int, int, int]:
    """Effective (balanced) block sizes and padded lengths."""
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be positive; got {block_q}, {block_kv}")
    bq, bk = balanced_block(lq, block_q), balanced_block(lk, block_kv)
    return bq, bk, -(-lq // bq) * bq, -(-lk // bk) * bk


def _block_intervals(seg: jax.Array, block: int):
    """Per block of ``seg`` (B, n * block): (min, max) non-zero segment id and whether any."""
    b = seg.shape[0]
    s = seg.reshape(b, -1, block)
    nz = s != 0
    info = jnp.iinfo(s.dtype)
    lo = jnp.min(jnp.where(nz, s, info.max), axis=-1)
    hi = jnp.max(jnp.where(nz, s, info.min), axis=-1)
    return lo, hi, jnp.any(nz, axis=-1)


def _schedule(qs: jax.Array, ks: jax.Array, always: jax.Array, bq: int, bk: int):
    """Block-pair schedule of padded segment ids qs (B, Lq'), ks/always (B, Lk').

    Returns need (B, nq, nk) bool, order (B, nq, nk) int32 (per q block, the kv blocks to
    compute first, ascending), count (B, nq) int32 (how many of them).

    Two blocks can share a segment only if their [min, max] intervals of non-zero ids
    overlap: that is a necessary condition whatever the layout, so the test is
    conservative (never skips a needed pair); contiguous segments make it nearly tight.
    The exact element mask is applied inside each computed pair.
    """
    qlo, qhi, qany = _block_intervals(qs, bq)
    klo, khi, kany = _block_intervals(ks, bk)
    kalways = jnp.any(always.reshape(always.shape[0], -1, bk), axis=-1)
    overlap = ((qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
               & kany[:, None, :])
    need = qany[:, :, None] & (overlap | kalways[:, None, :])
    order = jnp.argsort(~need, axis=-1, stable=True).astype(jnp.int32)
    count = jnp.sum(need, axis=-1, dtype=jnp.int32)
    return need, order, count


def chunked_block_schedule(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                           kv_always_visible: jax.Array | None = None, *,
                           block_q: int = DEFAULT_BLOCK_Q,
                           block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """Which (q block, kv block) pairs the ``"chunked"`` backend computes, per row.

    Args:
      q_segment_ids: (B, Lq) int, 0 = padding.
      kv_segment_ids: (B, Lk) int, 0 = padding.
      kv_always_visible: optional (B, Lk) bool.
      block_q, block_kv: block sizes as passed to :func:`chunked_attention` (clamped to the
        sequence lengths; sequences are padded with segment 0 to a multiple).

    Returns:
      (B, ceil(Lq / bq), ceil(Lk / bk)) bool; True where the pair may hold a visible
      (query, key) pair. Under ``vmap`` over the batch (how the kernel runs) each q block
      costs the largest count of any row; see :func:`chunked_computed_pairs`.
    """
    lq, lk = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    bq, bk, lqp, lkp = _block_sizes(lq, lk, block_q, block_kv)
    qs = _pad_axis(q_segment_ids, 1, lqp)
    ks = _pad_axis(kv_segment_ids, 1, lkp)
    always = (jnp.zeros(ks.shape, bool) if kv_always_visible is None
              else _pad_axis(kv_always_visible.astype(bool), 1, lkp))
    return _schedule(qs, ks, always, bq, bk)[0]


def chunked_computed_pairs(schedule: jax.Array) -> jax.Array:
    """Block pairs the ``"chunked"`` kernel evaluates for a schedule (B, nq, nk).

    The batch rows run in lock-step (vectorised, so the batch axis can stay sharded), so
    q block i costs B * max_b count[b, i] block pairs. Returns an int32 scalar.
    """
    b = schedule.shape[0]
    return b * jnp.sum(jnp.max(jnp.sum(schedule, axis=-1, dtype=jnp.int32), axis=0))


def _take_block(x: jax.Array, j: jax.Array, size: int, axis: int) -> jax.Array:
    """Block j[b] of row b: x (B, ...) -> same rank with ``size`` along ``axis``."""
    return jax.vmap(lambda xb, jb: lax.dynamic_slice_in_dim(xb, jb * size, size, axis - 1))(x, j)


def _add_block(x: jax.Array, j: jax.Array, upd: jax.Array, axis: int) -> jax.Array:
    size = upd.shape[axis]

    def row(xb, jb, ub):
        cur = lax.dynamic_slice_in_dim(xb, jb * size, size, axis - 1)
        return lax.dynamic_update_slice_in_dim(xb, cur + ub, jb * size, axis - 1)

    return jax.vmap(row)(x, j, upd)


def _pair_mask(qs_i, ks_j, al_j, valid):
    """(B, bq, bk) visibility of one block pair; ``valid`` (B,) is False for rows whose
    schedule is exhausted at this step (they run along with the others, masked)."""
    m = (qs_i[:, :, None] == ks_j[:, None, :]) | al_j[:, None, :]
    return m & (qs_i != 0)[:, :, None] & valid[:, None, None]


def _block_logits(qi, qs_i, k, v, ks, always, j, valid, bk):
    """For q block ``qi`` and kv block ``j`` (per batch row): the (B, 1, bq, bk) visibility
    mask, the key and value blocks, and the float32 logits q k^T (forward and backward)."""
    mask = _pair_mask(qs_i, _take_block(ks, j, bk, 1), _take_block(always, j, bk, 1), valid)[:, None]
    kj, vj = _take_block(k, j, bk, 2), _take_block(v, j, bk, 2)
    return mask, kj, vj, jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)


def _chunked_forward(q, k, v, qs, ks, always, bq, bk):
    """Online-softmax forward. q (B, H, Lq', D) already scaled; k, v (B, H, Lk', D).

    Returns out (B, H, Lq', D) float32, lse (B, H, Lq') float32 (0 on rows that see
    nothing), and the number of block pairs evaluated (int32 scalar).
    """
    b, h, lqp, d = q.shape
    nq = lqp // bq
    _, order, count = _schedule(qs, ks, always, bq, bk)

    def q_block(n_pairs, i):
        qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)
        qsi = lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)
        cnt, ordi = count[:, i], order[:, i]

        def body(t, carry):
            m, l, acc = carry
            mask, kj, vj, s = _block_logits(qi, qsi, k, v, ks, always, ordi[:, t], t < cnt, bk)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Rows that have seen no visible key yet keep m = -inf; shift them by 0 so
            # exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
            m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_use[..., None])
            alpha = jnp.exp(m - m_use)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bhqk,bhkd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        trips = jnp.max(cnt)
        # A dynamic trip count (a while loop) is what makes skipped pairs cost nothing: the
        # loop is not vmapped, so it is not turned into a select over all pairs.
        m, l, acc = lax.fori_loop(0, trips, body, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(
            jnp.where(seen, l, 1.0)), 0.0)
        return n_pairs + b * trips, (out, lse)

    n_pairs, (out, lse) = lax.scan(q_block, jnp.int32(0), jnp.arange(nq))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, lqp, d)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, lqp)
    return out, lse, n_pairs


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked_core(q, k, v, qs, ks, always, bq, bk):
    out, _, _ = _chunked_forward(q, k, v, qs, ks, always, bq, bk)
    return out.astype(q.dtype)


def _chunked_core_fwd(q, k, v, qs, ks, always, bq, bk):
    out, lse, _ = _chunked_forward(q, k, v, qs, ks, always, bq, bk)
    out = out.astype(q.dtype)
    return out, (q, k, v, qs, ks, always, out, lse)


def _chunked_core_bwd(bq, bk, res, dout):
    """FlashAttention backward (Dao et al. 2022, Alg. 4; FlashAttention-2 ordering).

    One pass over q blocks; per q block the scheduled kv blocks are revisited, P is
    recomputed from the saved log-sum-exp, dQ of the q block is accumulated locally and
    dK / dV are accumulated into full-length float32 buffers carried through the loop.
    """
    q, k, v, qs, ks, always, out, lse = res
    b, h, lqp, d = q.shape
    nq = lqp // bq
    _, order, count = _schedule(qs, ks, always, bq, bk)
    do = dout.astype(jnp.float32)
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # (B, H, Lq') = rowsum(dO * O)
    k_t = jnp.swapaxes(k, -1, -2)  # (B, H, D, Lk'): dQ^T = K^T dS^T contracts K^T's last axis

    def q_block(carry, i):
        dk, dv = carry
        sl = functools.partial(lax.dynamic_slice_in_dim, start_index=i * bq, slice_size=bq)
        qi, doi = sl(q, axis=2), sl(do, axis=2)
        lsei, deltai, qsi = sl(lse, axis=2), sl(delta, axis=2), sl(qs, axis=1)
        cnt, ordi = count[:, i], order[:, i]

        def body(t, carry):
            dq_t, dk, dv = carry
            j = ordi[:, t]
            # Keys-major (k, q) orientation throughout: on CPU, XLA gives dots whose left
            # operand contracts its last axis to its fast matmul library and runs the others
            # with a slow fallback (about 3x at these sizes); here every dot contracts last,
            # dQ by accumulating dQ^T = K^T dS^T from a transposed copy of K.
            mask = _pair_mask(qsi, _take_block(ks, j, bk, 1), _take_block(always, j, bk, 1),
                              t < cnt)[:, None]
            kj, vj, k_tj = _take_block(k, j, bk, 2), _take_block(v, j, bk, 2), _take_block(k_t, j, bk, 3)
            s_t = jnp.einsum("bhkd,bhqd->bhkq", kj, qi, preferred_element_type=jnp.float32)
            p_t = jnp.where(jnp.swapaxes(mask, -1, -2), jnp.exp(s_t - lsei[:, :, None, :]), 0.0)
            dp_t = jnp.einsum("bhkd,bhqd->bhkq", vj.astype(jnp.float32), doi)
            ds_t = p_t * (dp_t - deltai[:, :, None, :])
            dq_t = dq_t + jnp.einsum("bhdk,bhkq->bhdq", k_tj.astype(jnp.float32), ds_t)
            dk = _add_block(dk, j, jnp.einsum("bhkq,bhqd->bhkd", ds_t, qi.astype(jnp.float32)), 2)
            dv = _add_block(dv, j, jnp.einsum("bhkq,bhqd->bhkd", p_t, doi), 2)
            return dq_t, dk, dv

        dq_t, dk, dv = lax.fori_loop(0, jnp.max(cnt), body,
                                     (jnp.zeros((b, h, d, bq), jnp.float32), dk, dv))
        return (dk, dv), jnp.swapaxes(dq_t, -1, -2)

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(q_block, (zeros_kv, zeros_kv), jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _prepare_blocks(q, k, v, q_segment_ids, kv_segment_ids, kv_always_visible, scale,
                    block_q, block_kv):
    """(B, L, H, D) -> padded (B, H, L', D) with q pre-scaled, padded ids and flags."""
    lq, lk = q.shape[1], k.shape[1]
    bq, bk, lqp, lkp = _block_sizes(lq, lk, block_q, block_kv)
    # Scaling q outside the custom_vjp lets autodiff handle the scale (even a traced one).
    qt = _pad_axis(jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2), 2, lqp)
    kt = _pad_axis(jnp.swapaxes(k, 1, 2), 2, lkp)
    vt = _pad_axis(jnp.swapaxes(v, 1, 2), 2, lkp)
    qs = _pad_axis(q_segment_ids.astype(jnp.int32), 1, lqp)
    ks = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, lkp)
    always = (jnp.zeros(ks.shape, bool) if kv_always_visible is None
              else _pad_axis(kv_always_visible.astype(bool), 1, lkp))
    return qt, kt, vt, qs, ks, always, bq, bk


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                      kv_segment_ids: jax.Array, kv_always_visible: jax.Array | None = None,
                      scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
                      block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """Block-sparse, memory-efficient segment attention in pure JAX (the ``"chunked"`` backend).

    Flash attention (Dao et al. 2022, with the online softmax of Milakov & Gimelshein 2018):
    queries and keys are cut into blocks; per q block a running max / normaliser /
    accumulator is updated over its kv blocks, so no (Lq, Lk) matrix is ever built. The
    backward pass is FlashAttention's (recompute P per block from the saved log-sum-exp),
    written as a ``jax.custom_vjp``: activation memory is O(L) per head.

    Block skipping: a (q block, kv block) pair is computed only if the [min, max] intervals
    of their non-zero segment ids overlap, or the kv block holds an always-visible key (see
    :func:`chunked_block_schedule`). Packed rows hold contiguous segments, so a row of
    segments much shorter than L computes a narrow band of blocks around the diagonal. The
    loop over kv blocks has a data-dependent trip count (a ``while`` loop inside a ``scan``
    over q blocks), so skipped pairs are not computed at all, on CPU as on accelerators; the
    batch rows are vectorised and run in lock-step (each q block costs the largest count of
    any row), which keeps the batch axis shardable. Correctness never depends on
    contiguity: the exact mask is applied inside every computed pair.

    Args:
      q: (B, Lq, H, Dh) queries; float32 or bfloat16 (scores and accumulation in float32).
      k, v: (B, Lk, H, Dh).
      q_segment_ids: (B, Lq) int, 0 = padding. kv_segment_ids: (B, Lk) int.
      kv_always_visible: optional (B, Lk) bool, keys visible to every non-padding query;
        supported natively (their blocks are scheduled for every non-empty q block).
      scale: logit scale, default 1/sqrt(Dh); may be traced (q is pre-multiplied).
      block_q, block_kv: largest block sizes; the lengths are cut evenly into that many
        blocks (:func:`balanced_block`) and padded internally with segment 0. Smaller
        blocks skip more but loop more, over smaller matmuls.

    Returns:
      (B, Lq, H, Dh) in q's dtype. Queries that see no key (padding) are exactly 0 with
      zero (finite) gradients.

    Raises:
      ValueError: non-positive block sizes.
    """
    lq = q.shape[1]
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    qt, kt, vt, qs, ks, always, bq, bk = _prepare_blocks(
        q, k, v, q_segment_ids, kv_segment_ids, kv_always_visible, scale, block_q, block_kv)
    out = _chunked_core(qt, kt, vt, qs, ks, always, bq, bk)
    return jnp.swapaxes(out[:, :, :lq], 1, 2)


# ---------------------------------------------------------------------------- splash


def to_heads_major(x: jax.Array, length: int) -> jax.Array:
    """(B, L, H, D) -> (B, H, length, D), zero-padded along L (the splash layout)."""
    return _pad_axis(jnp.swapaxes(x, 1, 2), 2, length)


def from_heads_major(x: jax.Array, length: int) -> jax.Array:
    """(B, H, L', D) -> (B, length, H, D): inverse of :func:`to_heads_major`."""
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def splash_block_size(length: int, max_block: int = SPLASH_MAX_BLOCK) -> tuple[int, int]:
    """(block, padded length) for splash: a multiple of 128 (the TPU lane width the kernel
    requires), at most ``max_block``, and the length rounded up to a multiple of it."""
    lanes = 128
    block = min(max_block, -(-length // lanes) * lanes)
    return block, -(-length // block) * block


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, scale: float | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Segment attention with the TPU Pallas splash kernel (the ``"splash"`` backend).

    Uses ``make_splash_mha`` of ``jax.experimental.pallas.ops.tpu.splash_attention`` with a
    full static mask and ``SegmentIds``, vmapped over the batch. Splash wants (H, L, D) per
    example, does not scale q (q is pre-multiplied), and needs lengths that are multiples
    of its 128-multiple blocks (padded with segment 0 here). Splash lets segment-0 queries
    attend to segment-0 keys and gives finite garbage for rows that see nothing, so those
    rows (:func:`has_visible_key` False) are zeroed afterwards, which also zeroes their
    gradient contributions.

    Splash skips blocks only from its static mask; the segment ids are applied inside every
    block, so with a full mask every block pair is computed (fused and O(L) memory, but not
    block-sparse in the packing).

    Args:
      q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); float32 or bfloat16.
      q_segment_ids: (B, Lq) int, 0 = padding; kv_segment_ids: (B, Lk) int.
      scale: logit scale, default 1/sqrt(Dh).
      interpret: run the kernel in Pallas interpret mode; default: when the default JAX
        backend is not TPU (slow, for tests on CPU).

    Returns:
      (B, Lq, H, Dh) in q's dtype; rows that see no key are exactly 0.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, lq, h, d = q.shape
    lk = k.shape[1]
    scale = float(d) ** -0.5 if scale is None else scale
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    bq, lqp = splash_block_size(lq)
    bk, lkp = splash_block_size(lk)
    mask = splash.MultiHeadMask([splash.FullMask((lqp, lkp)) for _ in range(h)])
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                              block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                              block_q_dq=bq, block_kv_dq=bk)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    qs = _pad_axis(q_segment_ids.astype(jnp.int32), 1, lqp)
    ks = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, lkp)
    qt = to_heads_major(q * jnp.asarray(scale, q.dtype), lqp)
    kt, vt = to_heads_major(k, lkp), to_heads_major(v, lkp)
    out = jax.vmap(lambda q_, k_, v_, qs_, ks_: kernel(
        q_, k_, v_, segment_ids=splash.SegmentIds(q=qs_, kv=ks_)))(qt, kt, vt, qs, ks)
    out = from_heads_major(out, lq)
    has_any = has_visible_key(q_segment_ids, kv_segment_ids)
    return jnp.where(has_any[:, :, None, None], out, 0).astype(q.dtype)


# ------------------------------------------------------------------------------ auto


def resolve_backend(backend: str, lq: int, lk: int, *, has_always_visible: bool = False,
                    platform: str | None = None) -> str:
    """The concrete backend that ``backend`` runs for these sizes.

    ``"auto"``: ``"cudnn"`` on GPU (fused flash kernel); ``"splash"`` on TPU; elsewhere
    ``"chunked"`` when Lq * Lk >= :data:`AUTO_CHUNKED_MIN_PAIRS` (block skipping pays for
    its loop overhead only on long packed rows) and Lk spans more than one default kv block
    (a short text context has nothing to skip and a small dense score matrix), ``"xla"``
    otherwise. Splash has no notion of
    always-visible keys, so ``"splash"`` (asked for or chosen) with ``kv_always_visible``
    falls back to the CPU rule: the short-Lk cross-attention then takes the dense path.

    Args:
      backend: one of ``"xla"``, ``"cudnn"``, ``"chunked"``, ``"splash"``, ``"auto"``.
      lq, lk: query and key lengths.
      has_always_visible: whether ``kv_always_visible`` is given.
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default ``jax.default_backend()`` (the
        default device's platform, also under ``jit``).

    Raises:
      ValueError: unknown backend.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        platform = jax.default_backend() if platform is None else platform
        backend = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "cpu")
    if backend == "splash" and has_always_visible:
        backend = "cpu"
    if backend == "cpu":
        big = lq * lk >= AUTO_CHUNKED_MIN_PAIRS and lk > DEFAULT_BLOCK_KV
        backend = "chunked" if big else "xla"
    return backend


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                          kv_always_visible: jax.Array | None = None,
                          backend: str = "xla", scale: float | None = None,
                          block_q: int = DEFAULT_BLOCK_Q,
                          block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T * scale + mask) v over packed segments.

    Args:
      q: (B, Lq, H, Dh) queries.
      k, v: (B, Lk, H, Dh) keys and values.
      q_segment_ids: (B, Lq) int, 0 = padding.
      kv_segment_ids: (B, Lk) int, 0 = padding.
      kv_always_visible: optional (B, Lk) bool; such keys are visible to every non-padding
        query whatever its segment (the learned null text token of cross-attention, which
        gives a token whose segment has no text a defined output).
      backend: ``"xla"``: explicit einsum and masked softmax in float32; runs anywhere and
        is the reference. ``"cudnn"``: ``jax.nn.dot_product_attention(implementation=
        "cudnn")`` (fused flash attention), GPU only; q/k/v are cast to bfloat16 there
        (cuDNN supports only fp16/bf16) and the mask is passed as an additive bias.
        ``"chunked"``: block-sparse flash attention in pure JAX, any device
        (:func:`chunked_attention`). ``"splash"``: TPU Pallas splash attention
        (:func:`splash_attention`; interpret mode off TPU; with ``kv_always_visible`` it
        falls back as :func:`resolve_backend` says). ``"auto"``: cudnn on GPU, splash on
        TPU, chunked or xla on CPU by size (:func:`resolve_backend`).
      scale: logit scale; default 1/sqrt(Dh).
      block_q, block_kv: block sizes of the ``"chunked"`` backend (ignored by the others).

    Returns:
      (B, Lq, H, Dh) array in q's dtype. Rows of queries that may attend to nothing
      (padding, segment 0) are exactly 0, never NaN.

    Raises:
      ValueError: unknown backend or mismatched shapes.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, Lq, H, Dh), k/v (B, Lk, H, Dh); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
        raise ValueError(f"segment ids {q_segment_ids.shape}/{kv_segment_ids.shape} do not "
                         f"match q {q.shape[:2]} / k {k.shape[:2]}")
    if kv_always_visible is not None and kv_always_visible.shape != k.shape[:2]:
        raise ValueError(f"kv_always_visible {kv_always_visible.shape} does not match "
                         f"k {k.shape[:2]}")
    backend = resolve_backend(backend, q.shape[1], k.shape[1],
                              has_always_visible=kv_always_visible is not None)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    if backend == "chunked":
        return chunked_attention(q, k, v, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids,
                                 kv_always_visible=kv_always_visible, scale=scale,
                                 block_q=block_q, block_kv=block_kv)
    if backend == "splash":
        return splash_attention(q, k, v, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, scale=scale)

    mask = segment_mask(q_segment_ids, kv_segment_ids, kv_always_visible)  # (B, Lq, Lk)
    has_any = jnp.any(mask, axis=-1)  # (B, Lq)

    if backend == "cudnn":
        dt = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        # A finite bias (not -inf) keeps fully-masked rows finite inside the kernel; those
        # rows are zeroed below anyway.
        bias = jnp.where(mask, 0.0, float(jnp.finfo(dt).min) / 2).astype(dt)[:, None]
        out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt),
                                           bias=bias, scale=scale, implementation="cudnn")
        return jnp.where(has_any[:, :, None, None], out, 0).astype(q.dtype)

    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = jnp.where(mask[:, None], logits * scale, -jnp.inf)
    # The row max is a constant shift: no gradient through it, and 0 for empty rows so
    # exp(-inf - 0) = 0 there instead of NaN.
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype)
