"""Training inputs built with Grain: VAE crops and packed DiT batches.

Both are *step-indexed*: ``batch_fn(step)`` is a pure function of the seed and the step, reading
records by index from a Grain ``MapDataset`` (ArrayRecord shards). A run resumed at step s
therefore sees the batches an uninterrupted run would have seen, without iterator state.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from data_pipelines.records import read_dataset
from sora_jax.data.packing import pack, patchify

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


def dit_batch_fn(latent_prefix: str, text_states: np.ndarray, text_masks: np.ndarray,
                 cfg: ml_collections.ConfigDict, patch: tuple[int, int, int], seed: int):
    """Returns ``step -> packed batch`` (DESIGN.md's packing format) for DiT training.

    Examples come from a shuffled, repeated Grain ``MapDataset`` of encoded latents: step s takes
    items ``[s*K, (s+1)*K)`` (K = ``examples_per_step``), patchifies them and packs them greedily
    into ``batch_size`` rows of ``row_length`` latent tokens and ``text_length`` text tokens.
    Examples that do not fit are dropped; the count goes into the batch as ``num_dropped``.

    Args:
      latent_prefix: ArrayRecord prefix of records with ``latent`` (t, h, w, c) float32 and
        ``caption_id`` int (row into ``text_states``).
      text_states: (num_captions, Lt_cap, D_text) float32 text-encoder states.
      text_masks: (num_captions, Lt_cap) bool.
    """
    ds = read_dataset(latent_prefix).shuffle(seed=seed).repeat()
    k = cfg.examples_per_step

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        examples = []
        for i in range(k):
            rec = ds[step * k + i]
            tokens, positions = patchify(rec["latent"], patch)
            cid = int(rec["caption_id"])
            examples.append(dict(tokens=tokens, positions=positions, text=text_states[cid],
                                 text_mask=text_masks[cid]))
        batch, _, dropped = pack(examples, batch_size=cfg.batch_size, length=cfg.row_length,
                                 text_length=cfg.text_length)
        batch = {key: batch[key] for key in PACKED_KEYS}
        batch["num_dropped"] = np.asarray(dropped, np.int32)
        return batch

    return batch_fn
