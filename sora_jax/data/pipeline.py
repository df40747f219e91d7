"""Training inputs built with Grain: VAE crops and NaViT-packed DiT batches.

VAE batches are *step-indexed*: ``batch_fn(step)`` is a pure function of the seed and the step,
reading records by index from a Grain ``MapDataset``. DiT batches come from a Grain
``IterDataset`` (shuffle -> per-example NaViT size and token drop -> first-fit packing ->
batch) whose iterator state is small (a few integers) and goes into every checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from sora_jax.data.records import read_dataset
from sora_jax.data import navit
from sora_jax.data.packing import patchify

PACKED_KEYS = ("tokens", "segment_ids", "positions", "timesteps", "loss_mask", "text",
               "text_segment_ids")


def _rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def _crop(video: np.ndarray, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Random spatio-temporal crop; smaller inputs are edge-padded up to the crop size."""
    t, h, w = video.shape[:3]
    pad = [(0, max(0, frames - t)), (0, max(0, height - h)), (0, max(0, width - w)), (0, 0)]
    if any(p[1] for p in pad[:3]):
        video = np.pad(video, pad, mode="edge")
        t, h, w = video.shape[:3]
    t0 = rng.integers(0, t - frames + 1)
    y0 = rng.integers(0, h - height + 1)
    x0 = rng.integers(0, w - width + 1)
    return video[t0 : t0 + frames, y0 : y0 + height, x0 : x0 + width]


def vae_batch_fn(prefixes: dict[str, str], cfg: ml_collections.ConfigDict, seed: int):
    """Returns ``step -> {"video": float32 (B, T, H, W, 3) in [-1, 1]}`` for VAE training.

    Args:
      prefixes: ``{"mnist": prefix, "clips": prefix}`` ArrayRecord dataset prefixes.
      cfg: the ``vae_train`` section: ``batch_size``, ``crop`` (T, H, W), ``image_prob`` (the
        fraction of batches that are single frames: images train the same latent space),
        ``mnist_weight`` (probability an example comes from Moving MNIST rather than real clips).
    """
    mnist = read_dataset(prefixes["mnist"])
    clips = read_dataset(prefixes["clips"])
    frames, height, width = cfg.crop

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        rng = _rng(seed, step)
        n_frames = 1 if rng.random() < cfg.image_prob else frames
        out = []
        for _ in range(cfg.batch_size):
            ds = mnist if rng.random() < cfg.mnist_weight else clips
            for _ in range(32):  # video batches want records with enough frames (most have)
                video = ds[int(rng.integers(len(ds)))]["video"]
                if video.shape[0] >= n_frames:
                    break
            out.append(_crop(video, n_frames, height, width, rng))
        video = np.stack(out).astype(np.float32) / 127.5 - 1.0
        return {"video": video}

    return batch_fn


class NaViTExample:
    """Grain random-map transform: latent record -> one unpacked DiT example.

    Per example (NaViT, Dehghani et al. 2023): draw a patch grid under the token budget
    (:func:`navit.choose_grid`), resample the latent to it, patchify, drop a random fraction
    of tokens (:func:`navit.drop_tokens`), and attach the caption's text-encoder states.

    Records hold ``latent`` (t, h, w, c) float and either ``text`` (m, Dt) (kept caption tokens,
    as written by ``sora-jax encode``, :mod:`sora_jax.data.encoded`) or ``caption_id`` (row of ``text_table``).

    Output: ``tokens`` (n, pt*ph*pw*c) float32, ``positions`` (n, 3) int32, ``loss_mask`` (n,)
    float32 ones, ``text`` (m', Dt) float32 with m' <= ``text_length``.

    Args:
      cfg: the ``dit_train`` section: ``max_tokens`` (per example, <= ``row_length``),
        ``resolution`` ("native" | "uniform"), ``min_scale``, ``token_drop_rate``,
        ``token_drop_distribution`` ("fixed" | "uniform"), ``text_length``.
      patch: DiT patch (pt, ph, pw).
      text_table: optional (states (N, Lt, Dt), masks (N, Lt)) for ``caption_id`` records.
      train: False disables random resolution and token dropping (evaluation).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, patch: Sequence[int],
                 text_table: tuple[np.ndarray, np.ndarray] | None = None, train: bool = True):
        self.cfg, self.patch, self.train = cfg, tuple(patch), train
        self.text_table = text_table
        self.max_tokens = min(int(cfg.max_tokens), int(cfg.row_length))

    def __call__(self, rec: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg, (pt, ph, pw) = self.cfg, self.patch
        latent = np.asarray(rec["latent"], np.float32)
        t, h, w, _ = latent.shape
        grid = (t // pt, h // ph, w // pw)
        nt, nh, nw = navit.choose_grid(
            grid, max_tokens=self.max_tokens, rng=rng,
            resolution=cfg.resolution if self.train else "native", min_scale=cfg.min_scale)
        latent = navit.resize_latent(latent[: nt * pt], nh * ph, nw * pw)
        tokens, positions = patchify(latent, self.patch)
        if self.train and cfg.token_drop_rate > 0:
            rate = navit.token_drop_rate(rng, cfg.token_drop_rate, cfg.token_drop_distribution)
            keep = navit.drop_tokens(rng, tokens.shape[0], rate)
            tokens, positions = tokens[keep], positions[keep]
        if "text" in rec:
            text = np.asarray(rec["text"], np.float32)
        else:
            states, masks = self.text_table
            cid = int(rec["caption_id"])
            text = states[cid][masks[cid].astype(bool)].astype(np.float32)
        return dict(tokens=tokens.astype(np.float32), positions=positions.astype(np.int32),
                    loss_mask=np.ones(tokens.shape[0], np.float32),
                    text=text[: cfg.text_length])


def _to_packed_batch(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed rows (``<feature>_segment_ids``, ...) -> DESIGN.md's packed batch."""
    seg = b["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": b["tokens"].astype(np.float32),
        "segment_ids": seg,
        "positions": b["positions"].astype(np.int32),
        "timesteps": np.zeros(seg.shape, np.float32),
        "loss_mask": b["loss_mask"].astype(np.float32) * (seg != 0),
        "text": b["text"].astype(np.float32),
        "text_segment_ids": b["text_segment_ids"].astype(np.int32),
    }


def mixed_source(datasets: Sequence[grain.MapDataset], weights: Sequence[float] | None = None, *,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's shard of a weighted mix of record datasets.

    Each dataset is cut into ``process_count`` disjoint strided shards (``ds[i::n]``) before
    mixing, so the processes of a multi-host run read disjoint records whose union is every
    record; ``grain.MapDataset.mix`` then interleaves the sources by ``weights`` (e.g. images
    and videos kept apart at encode time and mixed here by configured weights).

    Raises:
      ValueError: weights do not match the datasets, or a bad process index / count.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if weights is not None and len(weights) != len(datasets):
        raise ValueError(f"{len(weights)} weights for {len(datasets)} datasets")
    shards = [ds[process_index::process_count] for ds in datasets]
    if len(shards) == 1:
        return shards[0]
    return grain.MapDataset.mix(shards, weights)


def packed_dataset(source: grain.MapDataset, cfg: ml_collections.ConfigDict,
                   patch: Sequence[int], seed: int,
                   text_table: tuple[np.ndarray, np.ndarray] | None = None,
                   process_count: int = 1) -> grain.IterDataset:
    """Infinite Grain pipeline of NaViT-packed DiT batches (DESIGN.md's packed format).

    source -> shuffle (a new permutation every epoch) -> repeat -> :class:`NaViTExample`
    (random map: its generator is a function of ``seed`` and the element index, so every
    draw is reproducible) -> with ``data_workers`` > 0, Grain's multiprocess prefetch (the
    per-example work above runs in that many worker processes; worker i takes elements
    i, i + n, ... and their outputs are interleaved back in order, so the batches are the
    same as in-process) -> ``grain.experimental.FirstFitPackIterDataset`` (rows of
    ``row_length`` latent and ``text_length`` text tokens, at most ``max_examples_per_row``
    examples each, ``packing_bins`` rows filled at once) -> batch of this process's
    ``batch_size // process_count`` rows.

    Iterate with ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` checkpoint
    and restore the exact position (used by the trainer; JSON-serialisable, the workers'
    positions included); ``it.close()`` stops the workers.

    Args:
      source: records (see :class:`NaViTExample`), already sharded for this process
        (:func:`mixed_source`).
      cfg: the ``dit_train`` section (``batch_size``: rows of the global batch, over all
        processes; ``row_length``, ``text_length``, ``packing_bins``, ``max_examples_per_row``,
        ``data_workers`` and :class:`NaViTExample`'s fields).
      patch: DiT patch (pt, ph, pw).
      seed: data seed.
      text_table: see :class:`NaViTExample`.
      process_count: processes sharing the global batch; this pipeline makes
        ``batch_size // process_count`` rows of each batch.

    Returns:
      ``grain.IterDataset`` of dicts with ``tokens`` (B, L, D) float32, ``segment_ids`` (B, L)
      int32, ``positions`` (B, L, 3) int32, ``timesteps`` (B, L) float32 zeros (the loss draws
      them), ``loss_mask`` (B, L) float32, ``text`` (B, Lt, Dt) float32, ``text_segment_ids``
      (B, Lt) int32.

    Raises:
      ValueError: ``batch_size`` is not a multiple of ``process_count``.
    """
    if int(cfg.batch_size) % process_count:
        raise ValueError(f"config key 'dit_train.batch_size' ({cfg.batch_size}) must be a multiple of "
                         f"the number of processes ({process_count}): it is the global batch")
    rows = int(cfg.batch_size) // process_count
    length = int(cfg.row_length)
    ds = source.shuffle(seed=seed).repeat()
    examples = ds.random_map(NaViTExample(cfg, patch, text_table), seed=seed).to_iter_dataset()
    if cfg.data_workers:
        # Grain's workers read absl flags, which a program without absl.app never parses
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.data_workers)))
    bins = max(int(cfg.packing_bins), rows)
    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={"tokens": length, "positions": length, "loss_mask": length,
                       "text": int(cfg.text_length)},
        num_packing_bins=bins, seed=seed, shuffle_bins=True,
        max_sequences_per_bin=int(cfg.max_examples_per_row) or None)
    return packed.batch(rows, drop_remainder=True).map(_to_packed_batch)


def batch_statistics(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Packing quality of a packed batch: ``padding_fraction`` (pad tokens / all latent tokens),
    ``examples_per_row`` (mean non-empty segments per row), ``real_tokens``."""
    seg = np.asarray(batch["segment_ids"])
    real = int(np.sum(seg != 0))
    per_row = [len(np.unique(r[r != 0])) for r in seg]
    return {"padding_fraction": 1.0 - real / seg.size, "examples_per_row": float(np.mean(per_row)),
            "real_tokens": float(real)}
