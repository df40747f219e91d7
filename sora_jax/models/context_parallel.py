"""Context (sequence) parallelism for attention: queries split over ``context``, K/V gathered.

Inside :func:`sora_jax.parallel.sharding.activate` with a ``context`` mesh axis larger than 1,
each device holds a contiguous 1/C of every row's tokens. Self-attention needs every key of
a query's segment, so each device all-gathers K, V and the key segment ids over ``context``
and attends with its own queries (the all-gather form of context parallelism, as in Llama 3,
Dubey et al. 2024, §3.3.2). Cross-attention attends to the row's text, which is small and
whole on every device: its queries stay split and nothing is gathered. Either way each
device calls the ordinary :func:`sora_jax.models.attention.dot_product_attention` on its
shard (any backend, block-sparse included), so results equal the single-device ones up to
float rounding.

Load balance: attention here is bidirectional within a segment, so contiguous shards of a
row do equal dense work (every query sees all keys of its segment); the zig-zag reordering
that balances *causal* context parallelism is not needed. With the block-sparse backend,
work follows the segment lengths inside each shard; packed rows mix short and long
examples, which evens it out on average. Memory per device: the gathered K/V of one row
(O(L) per head) plus the attention backend's own (O(L / C) queries at a time).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from sora_jax.models.attention import dot_product_attention
from sora_jax.parallel.axes import BATCH, HEADS
from sora_jax.parallel.sharding import active_mesh, spec

CONTEXT = "context"


def context_size() -> int:
    """Size of the active mesh's ``context`` axis (1 outside :func:`activate`)."""
    mesh, _ = active_mesh()
    return 1 if mesh is None else int(dict(mesh.shape).get(CONTEXT, 1))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, kv_always_visible: jax.Array | None = None,
              gather_kv: bool, backend: str = "xla") -> jax.Array:
    """:func:`dot_product_attention` with the queries split over the ``context`` mesh axis.

    Args:
      q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); segment ids (B, Lq) / (B, Lk);
        kv_always_visible: optional (B, Lk) bool. As :func:`dot_product_attention`.
      gather_kv: True for self-attention (keys are split like the queries and are gathered
        over ``context``), False for cross-attention (keys are whole on every device).
      backend: attention backend run on each shard.

    Returns:
      (B, Lq, H, Dh), split over ``context`` like ``q``. Without an active context axis
      (or when Lq, or Lk for self-attention, does not divide by it), exactly
      :func:`dot_product_attention`.
    """
    c = context_size()
    plain = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                 kv_always_visible=kv_always_visible, backend=backend)
    if c == 1 or q.shape[1] % c or (gather_kv and k.shape[1] % c):
        return dot_product_attention(q, k, v, **plain)
    mesh, _ = active_mesh()
    b = spec((BATCH,), (q.shape[0],))[0]
    h = spec((HEADS,), (q.shape[2],))[0]
    kv_len = CONTEXT if gather_kv else None
    q_spec, kv_spec = P(b, CONTEXT, h, None), P(b, kv_len, h, None)
    qs_spec, ks_spec = P(b, CONTEXT), P(b, kv_len)
    always = kv_always_visible

    def local(q, k, v, qs, ks, *rest):
        vis = rest[0] if rest else None
        if gather_kv:
            k, v, ks = (jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True) for x in (k, v, ks))
            if vis is not None:
                vis = jax.lax.all_gather(vis, CONTEXT, axis=1, tiled=True)
        return dot_product_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                     kv_always_visible=vis, backend=backend)

    args = (q, k, v, q_segment_ids, kv_segment_ids) + ((always,) if always is not None else ())
    specs = (q_spec, kv_spec, kv_spec, qs_spec, ks_spec) + ((ks_spec,) if always is not None else ())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
