"""Text-to-video generation from a StableHLO export, with no sora-jax model code.

What :class:`ServingModel` does for a batch of requests, as ``sora-jax generate`` does:

1. tokenize each prompt (``tokenizers``, the export's tokenizer.json; truncated and padded to
   the text length) and encode it with the exported ``text_encoder`` (states at padding
   positions set to 0);
2. draw request i's starting noise with ``numpy.random.default_rng([seed, i])`` at its latent
   shape (t, h, w, c) = (1 + (frames - 1) / td, height / s, width / s, c);
3. cut each latent into (pt, ph, pw) patch tokens (t slowest, w fastest; features (pt, ph, pw,
   c)) with their (t, h, w) grid positions, and pack the requests first-fit into rows of
   max(row_length, the longest rounded up to 64) tokens, each request with its own segment id,
   its text tokens in the row's text slots, and its resolution shift sqrt(tokens / base)
   clipped to [1, max_shift];
4. run the exported ``sampler_<solver>`` step ``steps`` times (CFG against the null text or
   the negative prompt's states, as the export says);
5. cut each request's tokens back out, rebuild its latent and decode it with the exported
   ``decoder`` to (frames, height, width, 3) float pixels in [-1, 1].

Packing never changes a sample: attention is masked to each request's own segment.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from jax import export as jax_export
from safetensors.numpy import load_file

__all__ = ["Request", "ServingModel", "to_uint8"]

class Request(NamedTuple):
    """One request: a prompt and the video's pixel shape (frames = 1 + td k)."""

    prompt: str
    frames: int
    height: int
    width: int


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Float pixels in [-1, 1] -> uint8 (clipped, -1 -> 0, 1 -> 255, rounded to nearest)."""
    return np.round((np.clip(np.asarray(video, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


class ServingModel:
    """A loaded StableHLO export (``sora-jax export --format stablehlo``).

    Args:
      folder: the export folder (``manifest.json``, ``*.stablehlo``, ``weights/``, ``tokenizer/``).

    Raises:
      FileNotFoundError: a file the manifest names is missing.
      ValueError: the folder is not a sora-jax StableHLO export of a version this runtime reads.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        with open(os.path.join(self.folder, "manifest.json")) as f:
            m = json.load(f)
        if m.get("format") != "sora-jax-stablehlo" or m.get("version") != 1:
            raise ValueError(f"{self.folder} is not a sora-jax StableHLO export (version 1): "
                             f"format {m.get('format')!r}, version {m.get('version')!r}")
        self.manifest = m
        self.programs = {}
        for name, p in m["programs"].items():
            with open(os.path.join(self.folder, p["file"]), "rb") as f:
                self.programs[name] = jax_export.deserialize(bytearray(f.read()))
        self.weights = {}
        for name, w in m["weights"].items():
            tensors = load_file(os.path.join(self.folder, w["file"]))
            self.weights[name] = [jnp.asarray(tensors[k]) for k in w["keys"]]
        t = m["text"]
        self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(self.folder, t["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(t["max_length"]))
        self._calls = {name: jax.jit(p.call) for name, p in self.programs.items()}

    # -- pieces --------------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(max_length, D) float32 states (0 at padding) and (max_length,) bool mask of one prompt."""
        t = self.manifest["text"]
        n = int(t["max_length"])
        ids = self.tokenizer.encode(prompt).ids[:n]
        input_ids = np.full((1, n), int(t["pad_id"]), np.int32)
        mask = np.zeros((1, n), np.int32)
        input_ids[0, :len(ids)] = ids
        mask[0, :len(ids)] = 1
        states = np.asarray(self._calls["text_encoder"](self.weights["text_encoder"], input_ids, mask))[0]
        keep = mask[0].astype(bool)
        states = np.where(keep[:, None], states, 0.0).astype(np.float32)
        return states, keep

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent (t, h, w, c) of a pixel shape.

        Raises:
          ValueError: frames not 1 + td k, or a size not a multiple of the downsampling x patch.
        """
        lat = self.manifest["latent"]
        td, s = lat["temporal_downsample"], lat["spatial_downsample"]
        pt, ph, pw = lat["patch"]
        if frames < 1 or (frames - 1) % td:
            raise ValueError(f"impossible frame count {frames}: use 1 + {td}k frames")
        if height <= 0 or width <= 0 or height % (s * ph) or width % (s * pw):
            raise ValueError(f"impossible size {height}x{width}: multiples of {s * ph} x {s * pw}")
        t = 1 + (frames - 1) // td
        if t % pt:
            raise ValueError(f"{frames} frames give {t} latent frames, not divisible by patch {pt}")
        return t, height // s, width // s, lat["channels"]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(t, h, w, c) normalised latent -> (T, H, W, 3) float32 pixels in [-1, 1]."""
        return np.asarray(self._calls["decoder"](self.weights["vae"], np.asarray(latent, np.float32)[None]))[0]

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], *, seed: int, steps: int | None = None,
                 guidance: float | None = None, solver: str | None = None,
                 negative_prompt: str = "") -> list[np.ndarray]:
        """One (frames, height, width, 3) float32 video in [-1, 1] per request (see the module
        docstring); ``to_uint8`` gives the pixels ``generate`` writes.

        Args:
          requests: prompts and shapes; any mix of shapes, packed together.
          seed: request i starts from ``numpy.random.default_rng([seed, i])`` noise.
          steps, guidance, solver: default the export's sampler settings; ``solver`` must be one
            of those exported.
          negative_prompt: the CFG branch's text for a model without a null text (Wan-style);
            ignored otherwise.

        Raises:
          ValueError: no requests, an impossible shape, a solver that was not exported.
        """
        s = self.manifest["sampling"]
        steps = int(s["steps"] if steps is None else steps)
        guidance = float(s["guidance"] if guidance is None else guidance)
        solver = solver or s["solver"]
        if f"sampler_{solver}" not in self.programs:
            raise ValueError(f"solver {solver!r} was not exported (exported: {s['solvers']})")
        if not requests or steps < 1:
            raise ValueError("generate needs at least one request and steps >= 1")
        lat, pk = self.manifest["latent"], self.manifest["packing"]
        patch = tuple(lat["patch"])
        n_text = int(self.manifest["text"]["max_length"])
        examples = []
        for i, r in enumerate(requests):
            shape = self.latent_shape(r.frames, r.height, r.width)
            noise = np.random.default_rng([seed, i]).standard_normal(shape).astype(np.float32)
            tokens, positions, grid = _patchify(noise, patch)
            states, keep = self.encode_text(r.prompt)
            shift = float(np.clip(np.sqrt(np.float32(tokens.shape[0]) / np.float32(s["base_tokens"])),
                                  1.0, s["max_shift"]))
            examples.append(dict(tokens=tokens, positions=positions, grid=grid, shape=shape, text=states,
                                 keep=keep, shift=shift))
        longest = max(e["tokens"].shape[0] for e in examples)
        length = max(int(pk["row_length"]), -(-longest // 64) * 64, int(self.manifest["min_row"]))
        rows = _first_fit([e["tokens"].shape[0] for e in examples], length, int(pk["text_per_row"]))
        n_rows = max(r for r, _ in rows) + 1
        width = examples[0]["tokens"].shape[1]
        text_len = int(pk["text_per_row"]) * n_text
        x = np.zeros((n_rows, length, width), np.float32)
        seg = np.zeros((n_rows, length), np.int32)
        pos = np.zeros((n_rows, length, 3), np.int32)
        txt = np.zeros((n_rows, text_len, examples[0]["text"].shape[-1]), np.float32)
        tseg = np.zeros((n_rows, text_len), np.int32)
        shift = np.ones((n_rows, length), np.float32)
        next_seg = [1] * n_rows
        placed = []
        for e, (row, (start, slot)) in zip(examples, rows):
            n, sid = e["tokens"].shape[0], next_seg[row]
            next_seg[row] += 1
            x[row, start:start + n], seg[row, start:start + n] = e["tokens"], sid
            pos[row, start:start + n], shift[row, start:start + n] = e["positions"], e["shift"]
            kept = int(e["keep"].sum())
            txt[row, slot * n_text:slot * n_text + kept] = e["text"][:kept]
            tseg[row, slot * n_text:slot * n_text + kept] = sid
            placed.append((row, start, n))
        if s["text_null_token"]:
            neg, nseg = txt, np.zeros_like(tseg)  # every text segment id 0: the learned null text
        else:
            states, keep = self.encode_text(negative_prompt)
            neg, nseg = np.zeros_like(txt), np.zeros_like(tseg)
            kept = int(keep.sum())
            for row, (start, slot) in rows:
                neg[row, slot * n_text:slot * n_text + kept] = states[:kept]
                nseg[row, slot * n_text:slot * n_text + kept] = seg[row, start]
        w = np.full((n_rows,), guidance, np.float32)
        start_u = np.ones((n_rows, length), np.float32)
        step = self._calls[f"sampler_{solver}"]
        fills = {"x": lambda: jnp.asarray(x), "zeros": lambda: jnp.zeros(x.shape, jnp.float32),
                 "inf_rows": lambda: jnp.full(x.shape[:2], jnp.inf, jnp.float32)}
        carry = tuple(fills[leaf]() for leaf in self.manifest["programs"][f"sampler_{solver}"]["carry"])
        for i in range(steps):
            carry = step(self.weights["dit"], np.int32(i), np.int32(steps), carry, seg, pos, txt, tseg, neg, nseg, w,
                         shift, start_u)
        out = np.asarray(carry[0])
        videos = []
        for e, (row, start, n) in zip(examples, placed):
            latent = _unpatchify(out[row, start:start + n], e["grid"], patch, e["shape"][3])
            videos.append(self.decode(latent))
        return videos


def _patchify(latent: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    t, h, w, c = latent.shape
    pt, ph, pw = patch
    nt, nh, nw = t // pt, h // ph, w // pw
    x = latent.reshape(nt, pt, nh, ph, nw, pw, c).transpose(0, 2, 4, 1, 3, 5, 6)
    tokens = x.reshape(nt * nh * nw, pt * ph * pw * c)
    grid = np.stack(np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij"), axis=-1)
    return tokens, grid.reshape(-1, 3).astype(np.int32), (nt, nh, nw)


def _unpatchify(tokens: np.ndarray, grid: Sequence[int], patch: Sequence[int], c: int) -> np.ndarray:
    nt, nh, nw = grid
    pt, ph, pw = patch
    x = tokens.reshape(nt, nh, nw, pt, ph, pw, c).transpose(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(nt * pt, nh * ph, nw * pw, c)


def _first_fit(lengths: Sequence[int], row_length: int, text_per_row: int) -> list[tuple[int, tuple[int, int]]]:
    """(row, (token start, text slot)) per example: the first row with room for its tokens and a
    free text slot, else a new row."""
    used, slots, out = [], [], []
    for n in lengths:
        for r in range(len(used)):
            if used[r] + n <= row_length and slots[r] < text_per_row:
                out.append((r, (used[r], slots[r])))
                used[r] += n
                slots[r] += 1
                break
        else:
            used.append(n)
            slots.append(1)
            out.append((len(used) - 1, (0, 0)))
    return out
