"""Every bundled-data dataset as ArrayRecord shards (what ``sora-jax prepare-data`` runs).

Datasets written under ``out_dir`` (each ``<out_dir>/<name>-0000i-of-0000N.array_record`` plus
``<name>.meta.json``; read them with ``records.read_dataset(prefix)``):

  moving_mnist_train            train digit instances, held-out combos never present
  moving_mnist_eval             eval digit instances (disjoint from train), all combos
  moving_mnist_heldout_prompts  eval instances AND held-out digit/motion combos, one digit, videos
  real_clips_train              crops of bigbuckbunny + bikes, and crops of the training photos
  real_clips_eval               crops of carphone_pristine and of the held-out photos

``manifest.json`` holds ``datasets`` (name -> absolute path prefix, for ``read_dataset``),
``args``, ``stats`` (count and build seconds per dataset) and ``version``. A second call with the
same arguments finds it and returns at once (idempotent); a call with different arguments, or on
a folder that was moved (the prefixes are absolute), rebuilds everything.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from sora_jax.data import moving_mnist, real_clips, records, sources

__all__ = ["BUILD_VERSION", "DATASETS", "build_datasets", "load_manifest"]

# Bump when generators change in a way that alters bytes, so old builds are not reused.
BUILD_VERSION = 1

DATASETS = (
    "moving_mnist_train",
    "moving_mnist_eval",
    "moving_mnist_heldout_prompts",
    "real_clips_train",
    "real_clips_eval",
)

MANIFEST = "manifest.json"


def _jsonable(value):
    # Tuples and lists must compare equal after a JSON round trip of the manifest.
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy scalars from a config
        return value.item()
    return value


def _interleave(a: Iterator[dict], b: Iterator[dict], n_a: int, n_b: int) -> Iterator[dict]:
    """Spread the n_b items of b evenly among the n_a items of a (any prefix is a fair mix)."""
    total = n_a + n_b
    taken_b = 0
    for i in range(total):
        # Bresenham: emit from b whenever its ideal cumulative share passes the next integer.
        if (i + 1) * n_b // total > taken_b:
            taken_b += 1
            yield next(b)
        else:
            yield next(a)


def load_manifest(out_dir: str) -> Optional[dict]:
    """The ``manifest.json`` of a build, or None if absent or unreadable."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _complete(out_dir: str, manifest: dict, prefixes: dict[str, str]) -> bool:
    for name in DATASETS:
        # Compare names, not absolute prefixes: a moved or copied run folder stays complete
        # (readers re-root the names under their own data folder).
        recorded = manifest.get("datasets", {}).get(name)
        if recorded is None or os.path.basename(recorded) != os.path.basename(prefixes[name]):
            return False
        try:
            meta = records.read_meta(prefixes[name])
        except FileNotFoundError:
            return False
        if meta["count"] != manifest.get("stats", {}).get(name, {}).get("count"):
            return False
        if not all(os.path.isfile(os.path.join(out_dir, s)) for s in meta["shards"]):
            return False
    return True


def build_datasets(
    out_dir: str,
    *,
    mnist_train: int,
    mnist_eval: int,
    heldout_prompts: int,
    clips_train: int,
    clips_eval: int,
    sizes: Sequence[tuple[int, int]],
    durations: Sequence[int],
    clip_sizes: Sequence[tuple[int, int]],
    clip_durations: Sequence[int],
    digit_size: int,
    two_digit_prob: float,
    speed_range: tuple[int, int],
    mnist_fps: float,
    photo_fraction: float,
    clip_scale_range: tuple[float, float],
    num_shards: int,
    seed: int,
    progress: bool = True,
    force: bool = False,
) -> dict[str, str]:
    """Write the five bundled-data datasets and ``manifest.json`` under ``out_dir``.

    Args:
      out_dir: output directory (created).
      mnist_train / mnist_eval / heldout_prompts: example counts of moving_mnist_train /
        moving_mnist_eval / moving_mnist_heldout_prompts.
      clips_train / clips_eval: example counts of real_clips_train / real_clips_eval; a fraction
        ``photo_fraction`` of each (rounded) are photo crops, the rest video crops.
      sizes: Moving MNIST canvas sizes (H, W) in pixels.
      durations: Moving MNIST frame counts (1 or 1 + 4k); moving_mnist_heldout_prompts uses
        those > 1.
      clip_sizes / clip_durations: crop sizes and frame counts of the real clips.
      digit_size: MNIST digit patch side in pixels (<= min(H, W) over sizes).
      two_digit_prob, speed_range, mnist_fps: Moving MNIST options (see generate_moving_mnist).
      clip_scale_range: spatial downscale range for real crops (see generate_video_crops).
      num_shards: shards per dataset.
      seed: base seed; each dataset draws from its own stream, each example from (seed, index).
      progress: show tqdm bars.
      force: rebuild even if the manifest says the same build is already there.

    Returns:
      dict dataset name -> path prefix (pass to ``records.read_dataset``).

    Raises:
      ValueError: invalid sizes/durations/counts (e.g. no duration > 1 for the held-out
        prompts), plus anything the generators raise.
    """
    args = _jsonable(dict(
        mnist_train=mnist_train, mnist_eval=mnist_eval, heldout_prompts=heldout_prompts,
        clips_train=clips_train, clips_eval=clips_eval, sizes=sizes, durations=durations,
        clip_sizes=clip_sizes, clip_durations=clip_durations,
        digit_size=digit_size, two_digit_prob=two_digit_prob, speed_range=speed_range,
        mnist_fps=mnist_fps, photo_fraction=photo_fraction, clip_scale_range=clip_scale_range,
        num_shards=num_shards, seed=seed,
    ))
    out_dir = os.path.abspath(out_dir)
    prefixes = {name: os.path.join(out_dir, name) for name in DATASETS}
    manifest = load_manifest(out_dir)
    if (not force and manifest is not None and manifest.get("version") == BUILD_VERSION
            and manifest.get("args") == args and _complete(out_dir, manifest, prefixes)):
        return prefixes

    counts = [mnist_train, mnist_eval, heldout_prompts, clips_train, clips_eval]
    if any(int(c) < 0 for c in counts):
        raise ValueError(f"example counts must be >= 0, got {counts}")
    if not 0.0 <= photo_fraction <= 1.0:
        raise ValueError(f"photo_fraction must be in [0, 1], got {photo_fraction}")
    video_durations = [int(t) for t in durations if int(t) > 1]
    if heldout_prompts and not video_durations:
        raise ValueError(f"moving_mnist_heldout_prompts needs a duration > 1, got {list(durations)}")

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rebuild must not look complete

    mnist_common = dict(sizes=sizes, digit_size=digit_size, speed_range=speed_range,
                        fps=mnist_fps, seed=seed)
    n_photo_train = int(round(clips_train * photo_fraction))
    n_photo_eval = int(round(clips_eval * photo_fraction))
    clip_sizes, clip_durations = list(clip_sizes), list(clip_durations)
    bad = [t for t in list(durations) + clip_durations if not moving_mnist.valid_duration(int(t))]
    if bad:
        raise ValueError(f"durations must be 1 or 1 + 4k, got {bad}")
    clip_common = dict(crop_size=clip_sizes, scale_range=clip_scale_range, seed=seed)

    def mm(split, n, **kw):
        return moving_mnist.generate_moving_mnist(split, n, **{**mnist_common, **kw})

    def clips(split, videos, photos, n, n_photo):
        vids = real_clips.generate_video_crops(videos, n - n_photo, durations=clip_durations,
                                               split=split, **clip_common)
        pics = real_clips.generate_photo_crops(photos, n_photo, split=split, **clip_common)
        return _interleave(vids, pics, n - n_photo, n_photo)

    plan = {
        "moving_mnist_train": (mnist_train, lambda: mm(
            "train", mnist_train, durations=durations, two_digit_prob=two_digit_prob)),
        "moving_mnist_eval": (mnist_eval, lambda: mm(
            "eval", mnist_eval, durations=durations, two_digit_prob=two_digit_prob)),
        "moving_mnist_heldout_prompts": (heldout_prompts, lambda: mm(
            "eval", heldout_prompts, durations=video_durations, two_digit_prob=0.0,
            heldout_only=True)),
        "real_clips_train": (clips_train, lambda: clips(
            "train", real_clips.TRAIN_VIDEOS, real_clips.TRAIN_PHOTOS, clips_train, n_photo_train)),
        "real_clips_eval": (clips_eval, lambda: clips(
            "eval", (real_clips.HELDOUT_VIDEO,), real_clips.HELDOUT_PHOTOS, clips_eval,
            n_photo_eval)),
    }
    stats = {}
    start_all = time.perf_counter()
    for name, (count, make) in plan.items():
        start = time.perf_counter()
        examples: Iterable[dict] = tqdm(make(), total=count, desc=name, disable=not progress,
                                        unit="ex", leave=True)
        records.write_array_record(
            prefixes[name], examples, num_shards,
            metadata={"dataset": name, "build_version": BUILD_VERSION, "seed": seed, "args": args},
        )
        stats[name] = {"count": int(count), "seconds": round(time.perf_counter() - start, 3)}
    # Decoded clips (~0.5 GB) are only needed while cropping.
    sources.clear_video_cache()
    manifest = {"version": BUILD_VERSION, "args": args, "datasets": prefixes, "stats": stats,
                "seconds": round(time.perf_counter() - start_all, 3)}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(manifest_path + ".tmp", manifest_path)
    return prefixes
