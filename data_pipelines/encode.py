"""Offline latent encoding of an ingested dataset: VAE latents and text-encoder states per clip.

Reads a clip dataset (``data_pipelines.ingest`` output, or any ``sora_jax.data.records``
dataset whose records hold ``video`` uint8 (T, H, W, 3) and ``caption``; or a TFDS dataset,
``tfds:NAME[:SPLIT]``, see :mod:`sora_jax.data.tfds`), runs the trained VAE of a run folder and
the frozen MiniLM text encoder over it in batches, and writes ArrayRecord shards that the DiT
input pipeline reads without touching pixels again. The output layout and record format are
:mod:`sora_jax.data.encoded`'s.

Work is split over processes (one per host on a pod, or several on one machine): process i of n
encodes input records i, i + n, i + 2n, ... (disjoint, and together complete) and writes its own
dataset. Within a process output, records are in the order their batch was encoded (records are
grouped by (T, H, W) shape), not input order; ``index`` gives the input position.

A stamp makes reruns free: when ``done.json`` exists and records the same VAE checkpoint (step
and fingerprint of its saved model files, which hold the weights and the latent statistics,
``sora_jax.train.run_folder.checkpoint_fingerprint``), config, text length, input dataset
fingerprint (meta and shard sizes/mtimes), process split and shard count, ``encode`` returns
it without loading any model.

Run: ``sora-jax encode --data PREFIX --vae-workdir DIR --output PREFIX``.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from sora_jax.data import records
from sora_jax.data.encoded import process_prefix, stamp_path
from sora_jax.data.tfds import is_tfds_spec, open_records, records_fingerprint
from sora_jax.errors import StageError
from sora_jax.inference.latents import load_codec
from sora_jax.inference.text import load_text_encoder
from sora_jax.io import to_float
from sora_jax.train.run_folder import checkpoint_fingerprint, read_config

__all__ = ["ENCODE_VERSION", "SKIP_REASONS", "encode", "main"]

log = logging.getLogger("data_pipelines.encode")

# Bump when the output bytes change for the same inputs, so old outputs are re-encoded.
ENCODE_VERSION = 1

SKIP_REASONS = ("bad_record", "bad_frames", "bad_size")


# One codec per (run folder, checkpoint, config): every VAECodec jits its own functions, so
# reusing it saves a compile per shape when one process encodes several outputs.
_CODECS: dict[tuple, Any] = {}


def _codec(cfg, vae_workdir: str, key: tuple):
    if key not in _CODECS:
        _CODECS.clear()
        _CODECS[key] = load_codec(cfg, vae_workdir)
    return _CODECS[key]


def _check_shape(shape: tuple, tds: int, sds: int) -> Optional[tuple[str, str]]:
    """None if a (T, H, W, 3) video fits the VAE, else (reason, message)."""
    if len(shape) != 4 or shape[-1] != 3:
        return "bad_record", f"video shape {shape} is not (T, H, W, 3)"
    t, h, w, _ = shape
    if t < 1 or (t - 1) % tds:
        return "bad_frames", f"{t} frames: the VAE needs 1 + {tds}k"
    if h < 1 or w < 1 or h % sds or w % sds:
        return "bad_size", f"{h}x{w}: the VAE needs multiples of {sds}"
    return None


def _bucket(rows: int, batch_size: int) -> int:
    # Power-of-two batch buckets: at most log2(batch_size) + 1 compiles per shape, and a small
    # remainder does not pay for a full batch.
    return min(1 << (rows - 1).bit_length(), batch_size)


def encode(
    dataset_prefix: str,
    vae_workdir: str,
    output_prefix: str,
    *,
    batch_size: int = 8,
    text_max_length: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    num_shards: int = 1,
    progress: bool = True,
) -> dict:
    """Encodes this process's share of a clip dataset to normalised latents and text states.

    Args:
      dataset_prefix: input records prefix (``records.read_dataset``), or a prepared TFDS
        dataset ``tfds:NAME[:SPLIT]`` (``sora_jax.data.tfds.read_tfds``; array_record format,
        data dir from ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); records need ``video``
        uint8 (T, H, W, 3) and ``caption`` str; ``source``, ``fps``, ``kind``, ``start_s``,
        ``end_s`` are copied when present.
      vae_workdir: a run folder with ``config.json`` and ``vae/checkpoints/<step>`` (weights
        and latent statistics; ``sora-jax train-vae``).
      output_prefix: output prefix P; this process writes ``process_prefix(P, i, n)``.
      batch_size: clips per VAE call (>= 1); clips are grouped by (T, H, W).
      text_max_length: caption tokens kept, [CLS] and [SEP] included (default the run's
        ``cfg.text.max_length``).
      process_index, process_count: this process i and the number n of processes (defaults
        ``jax.process_index()`` / ``jax.process_count()``); process i takes input records
        i, i + n, i + 2n, ...
      num_shards: shard files of this process's output (>= 1).
      progress: show a tqdm bar.

    Returns:
      The stamp (also in ``<prefix>.done.json``): ``key`` (what the output depends on),
      ``output`` (the process prefix), ``dataset``, ``vae_workdir`` (absolute), ``num_inputs`` (records assigned to this process),
      ``num_encoded``, ``skipped``, ``skipped_by_reason`` ({reason: count}; reasons
      ``bad_record``, ``bad_frames`` (T not 1 + 4k), ``bad_size`` (H or W not a multiple of the
      VAE's downsampling)), ``skipped_records`` (``index``, ``source``, ``reason``, ``error``),
      ``latent_shapes`` ({"t,h,w,c": count}), ``seconds``, and ``reused`` (True when an
      up-to-date output was found and nothing was done).

    Raises:
      FileNotFoundError: the dataset, the run's config or its VAE checkpoint is missing. ValueError: bad batch_size / num_shards / process split.
    """
    t0 = time.time()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of "
                         f"{process_count}")
    cfg = read_config(vae_workdir)
    text_max_length = int(text_max_length or cfg.text.max_length)
    vae_dir = os.path.join(vae_workdir, "vae")
    checkpoint = checkpoint_fingerprint(vae_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no VAE checkpoint in {vae_dir}: run `sora-jax train-vae` first")
    key = dict(
        version=ENCODE_VERSION,
        dataset_fingerprint=records_fingerprint(dataset_prefix),
        vae_step=checkpoint["step"],
        vae_checkpoint_sha256=checkpoint["sha256"],
        vae_config=cfg.vae.to_dict(),
        text_max_length=text_max_length,
        process_index=int(process_index),
        process_count=int(process_count),
        num_shards=int(num_shards),
    )
    key = json.loads(json.dumps(key))  # tuples -> lists, as read back from the stamp
    prefix = process_prefix(os.path.abspath(output_prefix), process_index, process_count)
    stamp = stamp_path(prefix)
    if os.path.isfile(stamp) and os.path.isfile(prefix + ".meta.json"):
        with open(stamp) as f:
            done = json.load(f)
        if done.get("key") == key:
            return dict(done, reused=True)
    if os.path.exists(stamp):
        os.remove(stamp)  # an interrupted rewrite must not look done

    src = open_records(dataset_prefix)
    indices = range(process_index, len(src), process_count)
    codec = _codec(cfg, vae_workdir, (os.path.abspath(vae_workdir), key["vae_checkpoint_sha256"],
                                      json.dumps(key["vae_config"], sort_keys=True)))
    # the run's own text encoder: MiniLM, or the umT5 an imported Wan run keeps in its folder
    text_encoder = load_text_encoder(cfg, vae_workdir, max_length=text_max_length)
    tds, sds = int(cfg.vae.temporal_downsample), int(cfg.vae.spatial_downsample)

    skipped: list[dict] = []
    shapes: collections.Counter = collections.Counter()

    def flush(batch: list[tuple[int, dict]]) -> Iterator[dict]:
        rows = _bucket(len(batch), batch_size)
        videos = [r["video"] for _, r in batch]
        videos += [videos[-1]] * (rows - len(videos))  # padding rows, dropped below
        latents = codec.encode(to_float(np.stack(videos)))[: len(batch)]
        states, masks = text_encoder.encode([str(r["caption"]) for _, r in batch],
                                            pad_to=text_max_length)
        for (i, r), z, s, m in zip(batch, latents, states, masks):
            t, h, w, _ = r["video"].shape
            shapes[",".join(map(str, z.shape))] += 1
            yield dict(
                latent=np.asarray(z, np.float32), text=np.asarray(s[m], np.float32),
                caption=str(r["caption"]), source=str(r.get("source", "")),
                kind=str(r.get("kind", "image" if t == 1 else "video")),
                frames=int(t), height=int(h), width=int(w), fps=float(r.get("fps", 0.0)),
                start_s=float(r.get("start_s", 0.0)), end_s=float(r.get("end_s", 0.0)),
                index=int(i))

    def examples() -> Iterator[dict]:
        buffers: dict[tuple, list] = {}
        with tqdm(total=len(indices), desc=f"encode p{process_index}", unit="clip",
                  disable=not progress) as bar:
            for i in indices:
                try:
                    r = src[i]
                except Exception as e:  # a damaged record must not stop the run
                    skipped.append(dict(index=i, source="", reason="bad_record",
                                        error=f"{type(e).__name__}: {e}"))
                    bar.update(1)
                    continue
                video, caption = r.get("video"), r.get("caption")
                problem = None
                if not isinstance(video, np.ndarray) or video.dtype != np.uint8:
                    problem = ("bad_record", "no uint8 'video' array")
                elif not isinstance(caption, str):
                    problem = ("bad_record", "no str 'caption'")
                else:
                    problem = _check_shape(video.shape, tds, sds)
                if problem:
                    skipped.append(dict(index=i, source=str(r.get("source", "")),
                                        reason=problem[0], error=problem[1]))
                    bar.update(1)
                    continue
                buf = buffers.setdefault(video.shape, [])
                buf.append((i, r))
                if len(buf) == batch_size:
                    yield from flush(buf)
                    bar.update(len(buf))
                    buffers[video.shape] = []
            for shape in sorted(buffers):
                if buffers[shape]:
                    yield from flush(buffers[shape])
                    bar.update(len(buffers[shape]))

    records.write_array_record(prefix, examples(), num_shards=num_shards,
                               metadata=dict(kind="encode", key=key))
    for s in skipped:
        log.warning("skipped record %d (%s, %s): %s", s["index"], s["source"] or "?",
                    s["reason"], s["error"])
    by_reason = collections.Counter(s["reason"] for s in skipped)
    info = dict(
        key=key,
        output=prefix,
        dataset=dataset_prefix if is_tfds_spec(dataset_prefix) else os.path.abspath(dataset_prefix),
        vae_workdir=os.path.abspath(vae_workdir),
        num_inputs=len(indices),
        num_encoded=int(sum(shapes.values())),
        skipped=len(skipped),
        skipped_by_reason=dict(sorted(by_reason.items())),
        skipped_records=skipped,
        latent_shapes=dict(sorted(shapes.items())),
        seconds=round(time.time() - t0, 3),
    )
    tmp = f"{stamp}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, stamp)
    return dict(info, reused=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sora-jax encode",
        description="Encode an ingested clip dataset to VAE latents and text states.")
    p.add_argument("--data", required=True,
                   help="input dataset prefix (from ingest), or tfds:NAME[:SPLIT] (a TFDS "
                        "dataset prepared as array_record in $TFDS_DATA_DIR)")
    p.add_argument("--vae-workdir", required=True,
                   help="run folder with config.json and vae/checkpoints (sora-jax train-vae)")
    p.add_argument("--output", required=True, help="output prefix")
    p.add_argument("--batch-size", type=int, default=8, help="clips per VAE call (8)")
    p.add_argument("--text-max-length", type=int, default=None,
                   help="caption tokens kept (default: the run's text.max_length)")
    p.add_argument("--process-index", type=int, default=None,
                   help="this process (default jax.process_index())")
    p.add_argument("--process-count", type=int, default=None,
                   help="number of processes (default jax.process_count())")
    p.add_argument("--num-shards", type=int, default=1, help="shards per process output (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (also ``sora-jax encode``).

    Prints a one-line summary and the stamp path. Returns 0 on success, 2 on an error (missing
    input, run folder or checkpoint; bad arguments), written to stderr in one line.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        info = encode(args.data, args.vae_workdir, args.output, batch_size=args.batch_size,
                      text_max_length=args.text_max_length, process_index=args.process_index,
                      process_count=args.process_count, num_shards=args.num_shards,
                      progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ImportError, StageError) as e:
        print(f"sora-jax encode: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k}={v}" for k, v in info["skipped_by_reason"].items())
    what = "up to date" if info["reused"] else f"{info['seconds']:.1f} s"
    print(f"encoded {info['num_encoded']} of {info['num_inputs']} clips; skipped "
          f"{info['skipped']}{f' ({reasons})' if reasons else ''}; {what}")
    print(f"output: {info['output']} (stamp {stamp_path(info['output'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
