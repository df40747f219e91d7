"""Conditioning computed once per distinct (segment, timestep) instead of once per token.

A DiT's conditioning vector c (timestep embedding + pooled text or class label) and every
Linear applied to it (adaLN modulations) depend on the token only through its segment, its
timestep and its label. A packed row of L tokens holds a handful of distinct such values
(each example's noisy tokens share one t, its clean context tokens have t = 0), so computing
them per token repeats the same matmul rows L / (few) times: in Wan 2.1 / PixArt-alpha the
timestep MLP runs once per video for this reason. Here the distinct values of each row are
found by sorting, up to a static cap of ``max_groups`` per row; the conditioning is computed
on those groups and gathered back to the tokens with a one-hot matmul (exact: one product by
1.0, the others by 0.0; its transpose is the scatter-add of the backward, as a matmul).

A row with more groups than the cap (e.g. per-frame timesteps) is never wrong: the whole
batch then takes the per-token path instead (``lax.cond``; both paths are compiled).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Distinct (segment, timestep, label) values per row the grouped path holds: packed training
# rows have at most 2 per example (noisy and clean context tokens) plus one for padding, so
# 32 covers 15 examples per row (packing's default cap is 8; ``dit.condition_groups``).
DEFAULT_MAX_GROUPS = 32


def condition_groups(segment_ids: jax.Array, timesteps: jax.Array, labels: jax.Array | None = None,
                     *, max_groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Groups of tokens that share (segment id, timestep[, label]), per row.

    Args:
      segment_ids: (B, L) int.
      timesteps: (B, L) float.
      labels: optional (B, L) int.
      max_groups: K, the static number of group slots per row (>= 1).

    Returns:
      index (B, L) int32: each token's group in [0, number of groups of its row), groups
      numbered in sorted (label, segment, timestep) order; first (B, K) int32: a token of each
      group (0 for unused slots); count (B,) int32: groups in the row (may exceed K).

    Raises:
      ValueError: max_groups < 1.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")

    def row(seg, t, lab):
        keys = (t, seg) if lab is None else (t, seg, lab)  # lexsort: the last key is primary
        order = jnp.lexsort(keys)
        changed = jnp.zeros(order.shape[0] - 1, bool)
        for key in keys:
            sorted_key = key[order]
            changed = changed | (sorted_key[1:] != sorted_key[:-1])
        new = jnp.concatenate([jnp.ones(1, bool), changed])
        gid = jnp.cumsum(new, dtype=jnp.int32) - 1
        index = jnp.zeros_like(gid).at[order].set(gid)
        first = jnp.zeros(max_groups, jnp.int32).at[jnp.where(new, gid, max_groups)].set(
            order.astype(jnp.int32), mode="drop")
        return index, first, gid[-1] + 1

    if labels is None:
        return jax.vmap(lambda s, t: row(s, t, None))(segment_ids, timesteps)
    return jax.vmap(row)(segment_ids, timesteps, labels)


@jax.tree_util.register_pytree_node_class
class GroupedConditioning:
    """Per-token results of functions of the conditioning vector, computed per group.

    Args:
      embed: ``(segment_ids, timesteps, labels) -> c``, each (B, N) -> (B, N, hidden); called
        on the groups' values (N = K) or, on the per-token path, on the tokens' (N = L).
        ``labels`` is None when not given.
      segment_ids: (B, L) int; timesteps: (B, L) float; labels: optional (B, L) int.
      max_groups: K; 0 (or >= L) computes everything per token.

    ``apply(fn)`` returns fn(c) for every token, (B, L, ...), where ``fn`` acts on the last
    axis (a Linear, an activation). A pytree, so it passes through ``nnx.remat``.
    """

    def __init__(self, embed: Callable, segment_ids: jax.Array, timesteps: jax.Array,
                 labels: jax.Array | None = None, *, max_groups: int = DEFAULT_MAX_GROUPS):
        self._embed, self._seg, self._t, self._labels = embed, segment_ids, timesteps, labels
        self.grouped = 0 < max_groups < segment_ids.shape[1]
        self._per_token = self._groups = self._onehot = self.fits = None
        if not self.grouped:
            self._per_token = embed(segment_ids, timesteps, labels)
            return
        index, first, count = condition_groups(segment_ids, timesteps, labels, max_groups=max_groups)
        self.fits = jnp.all(count <= max_groups)

        def pick(a):
            return None if a is None else jnp.take_along_axis(a, first, axis=1)

        self._groups = embed(pick(segment_ids), pick(timesteps), pick(labels))  # (B, K, hidden)
        self._onehot = index[..., None] == jnp.arange(max_groups, dtype=index.dtype)  # (B, L, K)

    def apply(self, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """fn(c) per token, (B, L, ...). Raises whatever ``fn`` raises."""
        if not self.grouped:
            return fn(self._per_token)

        def grouped():
            g = fn(self._groups)
            return jnp.einsum("blk,bkd->bld", self._onehot.astype(g.dtype), g)

        def per_token():
            return fn(self._embed(self._seg, self._t, self._labels))

        return lax.cond(self.fits, grouped, per_token)

    def tree_flatten(self):
        return ((self._seg, self._t, self._labels, self._per_token, self._groups, self._onehot, self.fits),
                (self._embed, self.grouped))

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj._embed, obj.grouped = aux
        (obj._seg, obj._t, obj._labels, obj._per_token, obj._groups, obj._onehot, obj.fits) = children
        return obj
