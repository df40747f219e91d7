"""Spacetime patches and sequence packing ("patch n' pack", NaViT: Dehghani et al. 2023).

NumPy only: this runs in the input pipeline, not under jit.

A latent (t, h, w, c) is cut into (pt, ph, pw) patches, each flattened (in (pt, ph, pw, c)
order) into a token of width pt*ph*pw*c, with its (t, h, w) patch-grid coordinate kept for
3D RoPE. Examples of any shape are then packed first-fit into B rows of L latent tokens
and Lt text tokens; segment ids 1, 2, 3, ... tell them apart inside a row, 0 is padding.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from sora_jax.data.patches import depth_to_space, space_to_depth


def patchify(latent: np.ndarray, patch: Sequence[int] = (1, 2, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a channels-last latent into spacetime-patch tokens.

    Args:
      latent: (t, h, w, c) array.
      patch: (pt, ph, pw) patch size.

    Returns:
      tokens: (n, pt*ph*pw*c) in latent's dtype, n = (t/pt)(h/ph)(w/pw), row-major over the
        patch grid (t slowest, w fastest); features ordered (pt, ph, pw, c).
      positions: (n, 3) int32 (t, h, w) patch-grid coordinates.

    Raises:
      ValueError: if latent is not 4-D or (t, h, w) is not divisible by the patch.
    """
    latent = np.asarray(latent)
    if latent.ndim != 4:
        raise ValueError(f"expected a (t, h, w, c) latent, got shape {latent.shape}")
    pt, ph, pw = patch
    t, h, w, c = latent.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape (t, h, w)={latent.shape[:3]} is not divisible by "
                         f"patch {tuple(patch)}")
    nt, nh, nw = t // pt, h // ph, w // pw
    tokens = space_to_depth(latent, patch).reshape(nt * nh * nw, pt * ph * pw * c)
    grid = np.stack(np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij"),
                    axis=-1)
    return tokens, grid.reshape(-1, 3).astype(np.int32)


def unpatchify(tokens: np.ndarray, grid: Sequence[int], patch: Sequence[int],
               channels: int) -> np.ndarray:
    """Inverse of :func:`patchify`.

    Args:
      tokens: (nt*nh*nw, pt*ph*pw*channels) array (NumPy or JAX).
      grid: (nt, nh, nw) patch-grid shape.
      patch: (pt, ph, pw).
      channels: latent channels c.

    Returns:
      (nt*pt, nh*ph, nw*pw, channels) latent.

    Raises:
      ValueError: if tokens' shape does not match grid, patch and channels.
    """
    tokens = np.asarray(tokens)
    nt, nh, nw = grid
    pt, ph, pw = patch
    if tokens.shape != (nt * nh * nw, pt * ph * pw * channels):
        raise ValueError(f"tokens shape {tokens.shape} does not match grid {tuple(grid)}, "
                         f"patch {tuple(patch)}, channels {channels}")
    return depth_to_space(tokens.reshape(nt, nh, nw, pt * ph * pw * channels), patch)


class Placement(NamedTuple):
    """Where a packed example lies: ``batch[row, start:start + n]`` with ``segment_id``."""

    row: int
    start: int
    n: int
    segment_id: int


def pack(examples: Sequence[Mapping[str, Any]], *, batch_size: int, length: int,
         text_length: int) -> tuple[dict[str, np.ndarray], list[Placement], int]:
    """Packs examples first-fit into a fixed-shape batch.

    Each example goes, in input order, into the first row that still has room for both
    its n latent tokens and its m kept text tokens (greedy first-fit: simple and
    deterministic). Examples that fit nowhere are dropped and counted.

    Args:
      examples: dicts with ``tokens`` (n, D), ``positions`` (n, 3) int, ``text`` (m, Dt),
        ``text_mask`` (m,) bool (only True tokens are packed, in order); optional
        ``loss_mask`` (n,) (default 1) and ``timesteps`` (n,) (default 0).
      batch_size: B rows.
      length: L latent tokens per row.
      text_length: Lt text tokens per row.

    Returns:
      batch: ``tokens`` (B, L, D) float32, ``segment_ids`` (B, L) int32 (0 = padding),
        ``positions`` (B, L, 3) int32, ``timesteps`` (B, L) float32, ``loss_mask`` (B, L)
        float32, ``text`` (B, Lt, Dt) float32, ``text_segment_ids`` (B, Lt) int32; padding
        is 0 everywhere. Segment ids in a row are 1, 2, 3, ... in packing order.
      placements: one :class:`Placement` per packed example, in input order (dropped
        examples skipped); see :func:`unpack`.
      num_dropped: number of examples that did not fit.

    Raises:
      ValueError: on an empty example list, an example with no tokens, more than L latent
        tokens or more than Lt kept text tokens (it could never fit), or inconsistent
        widths / shapes.
    """
    if not examples:
        raise ValueError("pack() needs at least one example (token widths come from them)")
    d = np.asarray(examples[0]["tokens"]).shape[-1]
    dt = np.asarray(examples[0]["text"]).shape[-1]
    batch = {
        "tokens": np.zeros((batch_size, length, d), np.float32),
        "segment_ids": np.zeros((batch_size, length), np.int32),
        "positions": np.zeros((batch_size, length, 3), np.int32),
        "timesteps": np.zeros((batch_size, length), np.float32),
        "loss_mask": np.zeros((batch_size, length), np.float32),
        "text": np.zeros((batch_size, text_length, dt), np.float32),
        "text_segment_ids": np.zeros((batch_size, text_length), np.int32),
    }
    fill = np.zeros(batch_size, np.int64)
    text_fill = np.zeros(batch_size, np.int64)
    num_segments = np.zeros(batch_size, np.int64)
    placements: list[Placement] = []
    dropped = 0
    for i, ex in enumerate(examples):
        tokens = np.asarray(ex["tokens"])
        positions = np.asarray(ex["positions"])
        text = np.asarray(ex["text"])
        text_mask = np.asarray(ex["text_mask"]).astype(bool)
        n = tokens.shape[0]
        if tokens.ndim != 2 or tokens.shape[1] != d:
            raise ValueError(f"example {i}: tokens shape {tokens.shape}, expected (n, {d})")
        if positions.shape != (n, 3):
            raise ValueError(f"example {i}: positions shape {positions.shape}, expected ({n}, 3)")
        if text.ndim != 2 or text.shape[1] != dt or text_mask.shape != text.shape[:1]:
            raise ValueError(f"example {i}: text {text.shape} / text_mask {text_mask.shape} "
                             f"do not match (m, {dt}) / (m,)")
        if n == 0:
            raise ValueError(f"example {i} has no tokens")
        if n > length:
            raise ValueError(f"example {i} has {n} tokens, longer than the row length {length}")
        kept = text[text_mask]
        m = kept.shape[0]
        if m > text_length:
            raise ValueError(f"example {i} has {m} text tokens, more than text_length "
                             f"{text_length}")
        rows = np.nonzero((fill + n <= length) & (text_fill + m <= text_length))[0]
        if rows.size == 0:
            dropped += 1
            continue
        r = int(rows[0])
        s, ts = int(fill[r]), int(text_fill[r])
        seg = int(num_segments[r]) + 1
        batch["tokens"][r, s:s + n] = tokens
        batch["segment_ids"][r, s:s + n] = seg
        batch["positions"][r, s:s + n] = positions
        batch["timesteps"][r, s:s + n] = np.asarray(ex.get("timesteps", np.zeros(n)))
        batch["loss_mask"][r, s:s + n] = np.asarray(ex.get("loss_mask", np.ones(n)))
        batch["text"][r, ts:ts + m] = kept
        batch["text_segment_ids"][r, ts:ts + m] = seg
        fill[r] += n
        text_fill[r] += m
        num_segments[r] = seg
        placements.append(Placement(r, s, n, seg))
    return batch, placements, dropped


def unpack(batch_tokens: np.ndarray, placements: Sequence[Placement]) -> list[np.ndarray]:
    """Recovers per-example tokens from a packed (B, L, D) array (e.g. model output).

    Args:
      batch_tokens: (B, L, D) array (NumPy or JAX).
      placements: as returned by :func:`pack`.

    Returns:
      list of (n, D) NumPy arrays, one per placement, in the same order.
    """
    arr = np.asarray(batch_tokens)
    return [arr[p.row, p.start:p.start + p.n] for p in placements]
