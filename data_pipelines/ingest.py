"""Ingest users' media (videos, images) plus captions into ArrayRecord clips for training.

Input: a folder of media files (searched recursively) and a captions file, one entry per
(file, time range, caption)::

    captions.jsonl   {"path": "cats/a.mp4", "caption": "a cat jumps", "start": 1.5, "end": 6.0}
    captions.csv     path,caption[,start,end]      (header required; start/end cells may be empty)

Paths are relative to the input folder (or absolute). ``start`` / ``end`` are optional, in
seconds from the first frame of the video; they are ignored for images. A file may appear in
several entries (different ranges or captions); media files with no entry are skipped (captions
are never invented).

What an entry becomes:

* Videos are decoded with PyAV and resampled in time to ``fps`` by timestamp: output frame k is
  the decoded frame nearest in presentation time to ``start + k / fps``. At most ``max_seconds``
  of each entry is used. The frames are split into consecutive clips of at most ``clip_seconds``;
  every clip has T = 1 + frame_multiple * j frames (the causal VAE's convention, images are
  T = 1), so each clip is trimmed at its end to the largest such T. A trailing piece (or a whole
  entry) shorter than 1 + frame_multiple frames is dropped: a single frame of a video does not
  show the motion its caption describes.
* Images become 1-frame records.
* Spatially, each frame is downscaled (never upscaled) with Pillow's antialiased bicubic filter
  (box reduction first, as ``real_clips`` does) so that its longer side is at most ``max_side``,
  keeping the aspect ratio, then centre-cropped so that H and W are multiples of ``size_multiple``.

Record (one dict per clip; see ``records.write_array_record``)::

    video    uint8 (T, H, W, 3) RGB
    caption  str
    frames   int   T
    fps      float frames per second of ``video`` (the ``fps`` setting; also stored on images)
    height   int   H      width  int  W
    source   str   path relative to the input folder (posix separators; absolute if outside it)
    start_s  float first frame's time in the source, seconds (0.0 for images)
    end_s    float start_s + T / fps, seconds (exclusive end; 0.0 for images)
    kind     str   "video" | "image"

Records are ordered by (source, start_s, end_s, caption), whatever the number of workers.

Outputs, for ``output_prefix`` P:

    P-0000i-of-0000N.array_record, P.meta.json    the dataset (``records.read_dataset(P)``)
    P.report.json                                 counts, skipped files with reasons, settings
    P.parts/<sha1>.json, <sha1>.clips             per-entry results (resume cache)

Resume: each unit of work (one file and time range) is written to ``P.parts`` as it finishes;
the json file is the done marker, written last and atomically. A rerun reuses every part whose
key matches: the sha1 of the source path, its size and modification time, the time range and the
settings, so changed settings or an edited file are decoded again. Parts no longer referenced are
deleted at the end of a run (``keep_parts=False`` deletes them all).

Bad input never stops a run. Skip reasons (``report["skipped_by_reason"]``):

    missing           a captions entry names a file that does not exist
    no_caption        a media file that no captions entry names
    bad_entry         a captions line that cannot be parsed, or has no path / an empty caption
    duplicate         an entry identical to an earlier one (path, range and caption)
    bad_range         start/end not numbers, start < 0, or start >= end
    unsupported_type  an entry whose file extension is neither a video nor an image type
    empty_file        a zero-byte file
    unreadable        the file cannot be read (permissions, a folder, I/O error)
    corrupt           the container or image cannot be opened / has no video stream
    decode_error      decoding failed part-way through the requested range
    truncated         frames stop well before the duration the headers declare (a cut-off file)
    no_frames         the video has no decodable frame
    out_of_range      the video ends before the entry's start
    too_short         fewer than 1 + frame_multiple frames in the range at ``fps``
    too_small         the frame is smaller than ``size_multiple`` on a side after resizing
    crashed           the decoder crashed its worker process (twice, isolated the second time)

Run: ``python -m data_pipelines.ingest --input DIR --captions FILE --output PREFIX``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import msgpack
import numpy as np

from sora_jax.data import records
from sora_jax.io import IMAGE_EXTENSIONS

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "INGEST_VERSION",
    "SKIP_REASONS",
    "ingest",
    "read_captions",
    "clip_lengths",
    "target_size",
    "main",
]

log = logging.getLogger("data_pipelines.ingest")

# Bump when decoding or resizing changes the bytes of a clip, so old parts are not reused.
INGEST_VERSION = 1

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv",
     ".ts", ".3gp", ".ogv"})

SKIP_REASONS = (
    "missing", "no_caption", "bad_entry", "duplicate", "bad_range", "unsupported_type",
    "empty_file", "unreadable", "corrupt", "decode_error", "truncated", "no_frames",
    "out_of_range", "too_short", "too_small", "crashed",
)

# Same filter as data_pipelines.real_clips: box-reduce by an integer factor, then bicubic.
_REDUCING_GAP = 2.0
# Auto shard count: about this many raw (uncompressed) video bytes per shard.
_SHARD_BYTES = 512 * 2**20
# Floating-point slack when comparing timestamps (seconds); far below any frame duration.
_EPS = 1e-6
# A video whose frames stop this much (seconds) before its header's duration is truncated.
_TRUNCATION_SLACK_S = 0.5


class _Skip(Exception):
    """A unit cannot produce clips; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- captions


def _parse_time(value: Any, name: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    t = float(value)
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t


def read_captions(path: str) -> tuple[list[dict], list[dict]]:
    """Reads a JSONL or CSV captions file.

    Args:
      path: ``*.jsonl`` / ``*.json`` (one JSON object per line: ``path``, ``caption``, optional
        ``start`` / ``end`` in seconds; a ``.json`` file may instead hold one JSON list of such
        objects) or ``*.csv`` (header ``path,caption[,start,end]``). Other extensions are
        sniffed: a first non-blank line starting with ``{`` means JSONL.

    Returns:
      (entries, bad): entries are dicts ``path`` (str, as written), ``caption`` (str, stripped),
      ``start`` / ``end`` (float seconds or None) and ``line`` (1-based line number); bad lists
      ``{"path", "line", "reason": "bad_entry", "error"}`` for lines that could not be used.

    Raises:
      FileNotFoundError: the file does not exist. ValueError: a CSV without ``path`` and
      ``caption`` columns, or a ``.json`` list that is not valid JSON.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        jsonl = True
    elif ext == ".csv":
        jsonl = False
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        jsonl = first.startswith("{")
    rows: list[tuple[int, Any]] = []
    bad: list[dict] = []
    if jsonl and ext == ".json" and text.lstrip().startswith("["):
        # a plain JSON list of entries; "line" is then the 1-based position in the list
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    elif jsonl:
        for i, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rows.append((i, json.loads(ln)))
            except json.JSONDecodeError as e:
                bad.append(dict(path="", line=i, reason="bad_entry", error=f"invalid JSON: {e}"))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in fields or "caption" not in fields:
            raise ValueError(f"{path}: the CSV header must name 'path' and 'caption' columns, "
                             f"got {fields}")
        reader.fieldnames = fields
        # DictReader's line_num counts physical lines (quoted newlines too): the header is 1.
        for row in reader:
            rows.append((reader.line_num, row))
    entries = []
    for line, row in rows:
        if not isinstance(row, dict):
            bad.append(dict(path="", line=line, reason="bad_entry", error="not a JSON object"))
            continue
        p, caption = row.get("path"), row.get("caption")
        if not isinstance(p, str) or not p.strip():
            bad.append(dict(path="", line=line, reason="bad_entry", error="no 'path'"))
            continue
        if not isinstance(caption, str) or not caption.strip():
            bad.append(dict(path=p, line=line, reason="bad_entry", error="no or empty 'caption'"))
            continue
        entry = dict(path=p.strip(), caption=caption.strip(), line=line, start=None, end=None)
        try:
            entry["start"] = _parse_time(row.get("start"), "start")
            entry["end"] = _parse_time(row.get("end"), "end")
        except (TypeError, ValueError) as e:
            entry["range_error"] = str(e)
        entries.append(entry)
    return entries, bad


# ----------------------------------------------------------------------------- geometry


def clip_lengths(num_frames: int, max_clip_frames: int, frame_multiple: int) -> list[int]:
    """Frame counts of the consecutive clips cut from ``num_frames`` resampled frames.

    Clips take ``max_clip_frames`` frames each (first rounded down to 1 + frame_multiple * j),
    the last one the remainder trimmed to 1 + frame_multiple * j; pieces under
    1 + frame_multiple frames are dropped.

    Returns:
      list of int, each 1 + frame_multiple * j with j >= 1; empty when nothing is long enough.
    """
    max_clip_frames = 1 + frame_multiple * ((max_clip_frames - 1) // frame_multiple)
    out = []
    pos = 0
    while pos < num_frames:
        n = min(max_clip_frames, num_frames - pos)
        n = 1 + frame_multiple * ((n - 1) // frame_multiple)
        if n < 1 + frame_multiple:
            break
        out.append(n)
        pos += n if n == max_clip_frames else num_frames  # a trimmed piece is the last one
    return out


def target_size(height: int, width: int, max_side: Optional[int],
                size_multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized and cropped sizes of a (height, width) frame, in pixels.

    Returns:
      ((resized_h, resized_w), (crop_h, crop_w)): the downscaled size (longer side <= max_side,
      aspect ratio kept up to rounding, never upscaled; None: no resizing) and the centre crop,
      each side rounded down to a multiple of ``size_multiple``.

    Raises:
      _Skip("too_small"): a side of the crop would be 0.
    """
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    rh = max(1, int(round(height * scale)))
    rw = max(1, int(round(width * scale)))
    if max_side is not None:  # rounding must not break the bound
        rh, rw = min(rh, max_side), min(rw, max_side)
    ch, cw = rh // size_multiple * size_multiple, rw // size_multiple * size_multiple
    if ch == 0 or cw == 0:
        raise _Skip("too_small", f"{height}x{width} resizes to {rh}x{rw}, under the "
                                 f"size multiple {size_multiple} on a side")
    return (rh, rw), (ch, cw)


def _resize_crop(image, resized: tuple[int, int], crop: tuple[int, int]) -> np.ndarray:
    """PIL RGB image -> uint8 (crop_h, crop_w, 3)."""
    from PIL import Image

    rh, rw = resized
    if image.size != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
    ch, cw = crop
    top, left = (rh - ch) // 2, (rw - cw) // 2
    if (ch, cw) != (rh, rw):
        image = image.crop((left, top, left + cw, top + ch))
    return np.asarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------- decoding


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise _Skip("unreadable", f"{type(e).__name__}: {e}") from None


def _load_image(path: str, settings: dict) -> list[dict]:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            # Phones store rotation in EXIF; training on sideways photos would teach sideways.
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise _Skip("corrupt", f"cannot decode image: {type(e).__name__}: {e}") from None
    resized, crop = target_size(rgb.height, rgb.width, settings["max_side"],
                                settings["size_multiple"])
    frame = _resize_crop(rgb, resized, crop)
    return [dict(video=frame[None], start_s=0.0, end_s=0.0)]


def _frame_time(frame, count: int, stream, origin: float) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base) - origin
    rate = float(stream.average_rate or 0) or 25.0
    return count / rate


def _decode_video(path: str, start: float, stop: float, fps: float, settings: dict,
                  seek: bool) -> tuple[list[np.ndarray], float]:
    """Frames nearest to start + k / fps for start + k / fps < stop, resized and cropped.

    Returns:
      (frames, video_end_s); frames may be empty when the video ends before ``start``.

    Raises:
      _Skip: corrupt / no_frames / decode_error / too_small. _SeekMissed: the seek landed
        after ``start`` (the caller decodes again from the beginning).
    """
    import av

    try:
        container = av.open(path)
    except PermissionError as e:
        raise _Skip("unreadable", f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise _Skip("corrupt", f"cannot open: {type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise _Skip("corrupt", "no video stream")
        stream = container.streams.video[0]
        tb = stream.time_base
        origin = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        if seek and start > 0 and tb:
            try:
                container.seek(int((start + origin) / tb), stream=stream, backward=True)
            except Exception:
                raise _SeekMissed() from None
        out: list[np.ndarray] = []
        geometry = None
        cached = (None, None)  # (frame, array): a frame picked twice (fps above the source's)
        prev = None  # (time, frame)
        count = 0
        done = False

        def pick(frame):
            nonlocal geometry, cached
            if cached[0] is frame:
                return cached[1]
            image = frame.to_image()
            if geometry is None:
                geometry = target_size(image.height, image.width, settings["max_side"],
                                       settings["size_multiple"])
            arr = _resize_crop(image, *geometry)
            cached = (frame, arr)
            return arr

        def target(k):
            return start + k / fps

        try:
            for frame in container.decode(stream):
                t = _frame_time(frame, count, stream, origin)
                if count == 0 and seek and start > 0 and t > start + _EPS:
                    raise _SeekMissed()
                count += 1
                while target(len(out)) < stop - _EPS and target(len(out)) <= t + _EPS:
                    tk = target(len(out))
                    use_prev = prev is not None and (tk - prev[0]) < (t - tk) - _EPS
                    out.append(pick(prev[1] if use_prev else frame))
                if target(len(out)) >= stop - _EPS:
                    done = True
                    break
                prev = (t, frame)
        except (_Skip, _SeekMissed):
            raise
        except Exception as e:
            raise _Skip("decode_error", f"after {count} frames: {type(e).__name__}: {e}") from None
        if count == 0:
            raise _Skip("no_frames", "no decodable video frame")
        if done:
            return out, stop
        # The stream ended: the last frame stands for one frame duration.
        last_t, last = prev
        rate = float(stream.average_rate or 0)
        frame_s = 1.0 / rate if rate > 0 else 1.0 / fps
        video_end = last_t + frame_s
        declared = _declared_duration(container, stream)
        if declared is not None and declared - video_end > max(_TRUNCATION_SLACK_S, 2 * frame_s):
            # A cut-off download decodes cleanly up to where the bytes stop; the header still
            # knows the full length.
            raise _Skip("truncated", f"the header says {declared:.3f} s but frames stop at "
                                     f"{video_end:.3f} s")
        while target(len(out)) < min(stop, video_end) - _EPS:
            out.append(pick(last))
        return out, video_end
    finally:
        container.close()


class _SeekMissed(Exception):
    pass


def _declared_duration(container, stream) -> Optional[float]:
    """Video length in seconds from the headers, or None when they do not say."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    # The container's duration spans every stream (audio may outlast video): only trusted when
    # the video is alone.
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def _load_video(path: str, start: Optional[float], end: Optional[float],
                settings: dict) -> list[dict]:
    fps = settings["fps"]
    start = 0.0 if start is None else start
    stop = math.inf if end is None else end
    if settings["max_seconds"] is not None:
        stop = min(stop, start + settings["max_seconds"])
    try:
        frames, video_end = _decode_video(path, start, stop, fps, settings, seek=True)
    except _SeekMissed:
        frames, video_end = _decode_video(path, start, stop, fps, settings, seek=False)
    if not frames:
        raise _Skip("out_of_range", f"the video ends at {video_end:.3f} s, before start "
                                    f"{start:.3f} s")
    fm = settings["frame_multiple"]
    max_clip = 1 + fm * ((int(math.floor(settings["clip_seconds"] * fps + _EPS)) - 1) // fm)
    lengths = clip_lengths(len(frames), max_clip, fm)
    if not lengths:
        raise _Skip("too_short", f"{len(frames)} frames at {fps:g} fps in the range, fewer than "
                                 f"{1 + fm}")
    clips, pos = [], 0
    for n in lengths:
        clips.append(dict(video=np.stack(frames[pos : pos + n]), start_s=start + pos / fps,
                          end_s=start + (pos + n) / fps))
        pos += n
    return clips


def _process(unit: dict, settings: dict) -> list[dict]:
    """Clips of one unit: dicts ``video`` uint8 (T, H, W, 3), ``start_s``, ``end_s``."""
    path = unit["abs_path"]
    _check_readable(path)
    if unit["kind"] == "image":
        return _load_image(path, settings)
    return _load_video(path, unit["start"], unit["end"], settings)


# ----------------------------------------------------------------------------- parts


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _part_paths(parts_dir: str, key: str) -> tuple[str, str]:
    return os.path.join(parts_dir, key + ".json"), os.path.join(parts_dir, key + ".clips")


def _run_unit(unit: dict, settings: dict, parts_dir: str) -> dict:
    """Worker entry point: process one unit, write its part, return its summary (no pixels).

    Top-level so that ProcessPoolExecutor can pickle it. Skips are results, not exceptions.
    """
    t0 = time.perf_counter()
    try:
        clips = _process(unit, settings)
    except _Skip as e:
        summary = dict(status="skipped", reason=e.reason, error=str(e))
    except Exception as e:  # a bug or an unexpected library error must not stop the run
        summary = dict(status="skipped", reason="decode_error", error=f"{type(e).__name__}: {e}")
    else:
        meta = []
        payload = []
        for c in clips:
            t, h, w, _ = c["video"].shape
            meta.append(dict(start_s=float(c["start_s"]), end_s=float(c["end_s"]), frames=int(t),
                             height=int(h), width=int(w)))
            payload.append(records.encode_record({"video": c["video"]}, compress=True))
        json_path, clips_path = _part_paths(parts_dir, unit["key"])
        _atomic_write(clips_path, msgpack.packb(payload, use_bin_type=True))
        summary = dict(status="ok", clips=meta)
    summary.update(key=unit["key"], source=unit["source"], seconds=time.perf_counter() - t0,
                   version=INGEST_VERSION)
    # Unreadable files may become readable without their size or mtime changing (chmod):
    # not cached, so a rerun tries them again.
    if summary.get("reason") != "unreadable":
        json_path, _ = _part_paths(parts_dir, unit["key"])
        _atomic_write(json_path, json.dumps(summary, sort_keys=True).encode())
    return summary


def _load_part(parts_dir: str, key: str) -> Optional[dict]:
    json_path, clips_path = _part_paths(parts_dir, key)
    try:
        with open(json_path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if summary.get("version") != INGEST_VERSION or summary.get("key") != key:
        return None
    if summary.get("status") == "ok" and not os.path.isfile(clips_path):
        return None
    return summary


@functools.lru_cache(maxsize=4)
def _read_clips(clips_path: str, mtime_ns: int) -> list[np.ndarray]:
    del mtime_ns  # part of the cache key only
    with open(clips_path, "rb") as f:
        payload = msgpack.unpackb(f.read(), raw=False)
    return [records.decode_record(b)["video"] for b in payload]


# ----------------------------------------------------------------------------- planning


def _source_name(abs_path: str, input_dir: str) -> str:
    rel = os.path.relpath(abs_path, input_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return abs_path.replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def _kind(path: str) -> Optional[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None


def _list_media(input_dir: str, exclude_dirs: Sequence[str]) -> list[str]:
    found = []
    exclude = {os.path.abspath(d) for d in exclude_dirs}
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) not in exclude)
        for name in sorted(files):
            if _kind(name) is not None:
                found.append(os.path.abspath(os.path.join(root, name)))
    return found


def _settings(fps, max_seconds, clip_seconds, max_side, size_multiple, frame_multiple) -> dict:
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    if not isinstance(frame_multiple, int) or frame_multiple < 1:
        raise ValueError(f"frame_multiple must be an int >= 1, got {frame_multiple!r}")
    if not isinstance(size_multiple, int) or size_multiple < 1:
        raise ValueError(f"size_multiple must be an int >= 1, got {size_multiple!r}")
    if not clip_seconds > 0 or math.floor(clip_seconds * fps + _EPS) < 1 + frame_multiple:
        raise ValueError(f"clip_seconds={clip_seconds!r} at fps={fps:g} holds fewer than "
                         f"1 + frame_multiple = {1 + frame_multiple} frames")
    if max_side is not None and (not isinstance(max_side, int) or max_side < size_multiple):
        raise ValueError(f"max_side must be an int >= size_multiple ({size_multiple}) or None, "
                         f"got {max_side!r}")
    return dict(fps=float(fps), max_seconds=None if max_seconds is None else float(max_seconds),
                clip_seconds=float(clip_seconds), max_side=max_side, size_multiple=size_multiple,
                frame_multiple=frame_multiple, resample="pillow-bicubic-reducing_gap-2",
                version=INGEST_VERSION)


def _unit_key(source: str, stat: os.stat_result, kind: str, start, end, settings: dict) -> str:
    text = json.dumps(dict(source=source, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                           kind=kind, start=start, end=end, settings=settings), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _find_captions(input_dir: str) -> str:
    for name in ("captions.jsonl", "captions.csv", "captions.json"):
        path = os.path.join(input_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no captions file given and none found in {input_dir} "
                            "(looked for captions.jsonl, captions.csv, captions.json)")


def _skip_entry(skipped: list, info: dict, reason: str, error: str) -> None:
    skipped.append(dict(info, reason=reason, error=error))


def _plan(input_dir: str, captions_path: str, settings: dict, exclude_dirs: Sequence[str]):
    """Entries -> units of work, plus the skips decided without decoding."""
    entries, skipped = read_captions(captions_path)
    for s in skipped:  # a line that names no file is reported as "<captions file>:<line>"
        s.update(path=s["path"] or f"{os.path.basename(captions_path)}:{s['line']}",
                 start=None, end=None)
    units: dict[str, dict] = {}
    accepted: list[dict] = []  # entries with a unit: dict(entry, key)
    seen = set()
    referenced = set()
    for e in entries:
        abs_path = os.path.normpath(e["path"] if os.path.isabs(e["path"])
                                    else os.path.join(input_dir, e["path"]))
        source = _source_name(abs_path, input_dir)
        kind = _kind(abs_path)
        referenced.add(abs_path)
        start, end = e["start"], e["end"]
        if kind == "image":
            start = end = None  # a still has no time range
        info = dict(path=source, line=e["line"], start=e["start"], end=e["end"])
        skip = functools.partial(_skip_entry, skipped, info)

        if not os.path.lexists(abs_path):
            skip("missing", "no such file")
            continue
        if kind is None:
            skip("unsupported_type", f"extension {os.path.splitext(abs_path)[1]!r} is neither a "
                                     "known video nor image type")
            continue
        if "range_error" in e:
            skip("bad_range", e["range_error"])
            continue
        if kind == "video" and ((start is not None and start < 0)
                                or (start is not None and end is not None and start >= end)
                                or (end is not None and end <= 0)):
            skip("bad_range", f"start={start} end={end}: need 0 <= start < end")
            continue
        ident = (source, start, end, e["caption"])
        if ident in seen:
            skip("duplicate", "same path, range and caption as an earlier entry")
            continue
        seen.add(ident)
        try:
            stat = os.stat(abs_path)
        except OSError as err:
            skip("unreadable", f"{type(err).__name__}: {err}")
            continue
        if not os.path.isfile(abs_path):
            skip("unreadable", "not a regular file")
            continue
        if stat.st_size == 0:
            skip("empty_file", "zero bytes")
            continue
        key = _unit_key(source, stat, kind, start, end, settings)
        units.setdefault(key, dict(key=key, abs_path=abs_path, source=source, kind=kind,
                                   start=start, end=end))
        accepted.append(dict(info, caption=e["caption"], key=key))
    for path in _list_media(input_dir, exclude_dirs):
        if path not in referenced:
            skipped.append(dict(path=_source_name(path, input_dir), reason="no_caption",
                                error="no captions entry names this file", line=None,
                                start=None, end=None))
    return entries, accepted, list(units.values()), skipped


# ----------------------------------------------------------------------------- running


def _execute(todo: list[dict], settings: dict, parts_dir: str, workers: int, bar) -> dict:
    """Runs units, in process or in a spawn pool; returns key -> summary."""
    results: dict[str, dict] = {}
    if workers == 0:
        for unit in todo:
            results[unit["key"]] = _run_unit(unit, settings, parts_dir)
            bar.update(1)
        return results
    # spawn, not fork: the parent may have started JAX (multithreaded), and fork after threads
    # can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    crashed: list[dict] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_run_unit, u, settings, parts_dir): u for u in todo}
        for fut in concurrent.futures.as_completed(futures):
            unit = futures[fut]
            try:
                results[unit["key"]] = fut.result()
                bar.update(1)
            except concurrent.futures.process.BrokenProcessPool:
                crashed.append(unit)
    # A crash fails every pending future, not only the culprit's: retry each alone.
    for unit in sorted(crashed, key=lambda u: u["key"]):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                results[unit["key"]] = pool.submit(_run_unit, unit, settings, parts_dir).result()
            except concurrent.futures.process.BrokenProcessPool as e:
                results[unit["key"]] = dict(status="skipped", reason="crashed", key=unit["key"],
                                            source=unit["source"], error=f"worker died: {e}")
        bar.update(1)
    return results


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def ingest(
    input_dir: str,
    output_prefix: str,
    captions: Optional[str] = None,
    *,
    fps: float = 8.0,
    max_seconds: Optional[float] = 60.0,
    clip_seconds: float = 4.0,
    max_side: Optional[int] = 256,
    size_multiple: int = 16,
    frame_multiple: int = 4,
    workers: Optional[int] = None,
    num_shards: Optional[int] = None,
    keep_parts: bool = True,
    progress: bool = True,
) -> dict:
    """Decodes, resamples, resizes and clips captioned media into ArrayRecord shards.

    See the module docstring for the record format, the ordering, the resume cache and the
    skip reasons.

    Args:
      input_dir: folder searched recursively for media (extensions in ``VIDEO_EXTENSIONS`` /
        ``IMAGE_EXTENSIONS``, case-insensitive).
      output_prefix: dataset path prefix P (writes P-*.array_record, P.meta.json,
        P.report.json and the P.parts/ cache); its folder is created.
      captions: JSONL or CSV captions file (see ``read_captions``); None: ``captions.jsonl``,
        ``captions.csv`` or ``captions.json`` in ``input_dir``.
      fps: output frame rate, frames per second (> 0); frames are picked by nearest timestamp,
        so a lower rate drops frames and a higher one repeats them.
      max_seconds: at most this many seconds are used from each entry (None: all).
      clip_seconds: longest clip, in seconds; longer ranges become several consecutive clips.
        ``clip_seconds * fps`` must reach 1 + frame_multiple frames.
      max_side: longest output side in pixels, before cropping (None: keep the source size).
      size_multiple: output H and W are centre-cropped to multiples of this (pixels), e.g. the
        VAE's spatial downsampling times the DiT patch.
      frame_multiple: clips have 1 + frame_multiple * j frames (the VAE's temporal downsampling).
      workers: decoding processes (0: in this process; None: min(8, CPU count)).
      num_shards: output shard files (None: one per ~512 MiB of raw video, at least 1).
      keep_parts: keep P.parts/ after the merge so that a rerun is quick (False deletes it).
      progress: show a tqdm bar.

    Returns:
      The report (also written to P.report.json): ``num_inputs`` (caption entries + uncaptioned
      media files), ``num_entries``, ``num_entries_ingested``, ``num_clips``, ``num_frames``,
      ``num_videos`` / ``num_images`` (clips of each kind), ``skipped`` (count),
      ``skipped_by_reason``, ``skipped_files`` (list of ``path``, ``reason``, ``error``,
      ``line``, ``start``, ``end``), ``units``, ``units_reused``, ``units_processed``,
      ``output_prefix``, ``num_shards``, ``shards``, ``report_path``, ``parts_dir``,
      ``input_dir``, ``captions``, ``settings``, ``seconds``.

    Raises:
      FileNotFoundError: ``input_dir`` or the captions file does not exist.
      ValueError: an impossible setting, or a CSV without the required columns.
      OSError: the output cannot be written (disk full, permissions).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    input_dir = os.path.abspath(input_dir)
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    captions = os.path.abspath(captions) if captions else _find_captions(input_dir)
    settings = _settings(fps, max_seconds, clip_seconds, max_side, size_multiple, frame_multiple)
    workers = _default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1 or None, got {num_shards}")
    output_prefix = os.path.abspath(output_prefix)
    parts_dir = output_prefix + ".parts"
    report_path = output_prefix + ".report.json"
    os.makedirs(parts_dir, exist_ok=True)

    entries, accepted, units, skipped = _plan(input_dir, captions, settings, [parts_dir])
    summaries: dict[str, dict] = {}
    todo = []
    for unit in units:
        part = _load_part(parts_dir, unit["key"])
        if part is None:
            todo.append(unit)
        else:
            summaries[unit["key"]] = part
    reused = len(summaries)
    with tqdm(total=len(units), initial=reused, desc="ingest", unit="file",
              disable=not progress) as bar:
        summaries.update(_execute(todo, settings, parts_dir, workers, bar))

    # Per-entry outcome; an entry inherits its unit's skip (same file and range).
    items = []  # (sort key, unit key, clip index, caption, clip meta, kind)
    kinds = {u["key"]: u["kind"] for u in units}
    ingested = 0
    for e in accepted:
        s = summaries[e["key"]]
        if s["status"] != "ok":
            skipped.append(dict(path=e["path"], line=e["line"], start=e["start"], end=e["end"],
                                reason=s["reason"], error=s["error"]))
            continue
        ingested += 1
        for j, c in enumerate(s["clips"]):
            items.append(((e["path"], c["start_s"], c["end_s"], e["caption"]), e["key"], j,
                          e["caption"], c, kinds[e["key"]]))
    items.sort(key=lambda it: it[0])
    skipped.sort(key=lambda s: (s["path"], s["reason"], s.get("line") or 0))
    for s in skipped:
        log.warning("skipped %s (%s): %s", s["path"], s["reason"], s["error"])

    raw_bytes = sum(c["frames"] * c["height"] * c["width"] * 3 for _, _, _, _, c, _ in items)
    if num_shards is None:
        num_shards = max(1, min(1024, math.ceil(raw_bytes / _SHARD_BYTES)))

    def examples() -> Iterator[dict]:
        for (source, _, _, _), key, j, caption, c, kind in items:
            clips_path = _part_paths(parts_dir, key)[1]
            video = _read_clips(clips_path, os.stat(clips_path).st_mtime_ns)[j]
            yield dict(video=video, caption=caption, frames=c["frames"], fps=settings["fps"],
                       height=c["height"], width=c["width"], source=source,
                       start_s=c["start_s"], end_s=c["end_s"], kind=kind)

    shards = records.write_array_record(
        output_prefix, examples(), num_shards=num_shards,
        metadata=dict(kind="ingest", settings=settings, input_dir=input_dir, captions=captions))
    _read_clips.cache_clear()

    by_reason = collections.Counter(s["reason"] for s in skipped)
    report = dict(
        num_inputs=len(entries) + by_reason.get("no_caption", 0)
        + sum(1 for s in skipped if s["reason"] == "bad_entry"),
        num_entries=len(entries),
        num_entries_ingested=ingested,
        num_clips=len(items),
        num_frames=int(sum(c["frames"] for _, _, _, _, c, _ in items)),
        num_videos=sum(1 for it in items if it[5] == "video"),
        num_images=sum(1 for it in items if it[5] == "image"),
        skipped=len(skipped),
        skipped_by_reason=dict(sorted(by_reason.items())),
        skipped_files=skipped,
        units=len(units),
        units_reused=reused,
        units_processed=len(todo),
        output_prefix=output_prefix,
        num_shards=num_shards,
        shards=shards,
        report_path=report_path,
        parts_dir=parts_dir if keep_parts else None,
        input_dir=input_dir,
        captions=captions,
        settings=settings,
        workers=workers,
        seconds=round(time.time() - t0, 3),
    )
    _prune_parts(parts_dir, {u["key"] for u in units} if keep_parts else set())
    data = json.dumps(report, indent=2, sort_keys=True) + "\n"
    _atomic_write(report_path, data.encode())
    return report


def _prune_parts(parts_dir: str, keep: set[str]) -> None:
    """Deletes our files in ``parts_dir`` that no current unit uses (the folder if it empties)."""
    for name in os.listdir(parts_dir):
        stem, ext = os.path.splitext(name)
        ours = ext in (".json", ".clips") or ".tmp" in ext
        if ours and (stem not in keep or ".tmp" in ext):
            try:
                os.remove(os.path.join(parts_dir, name))
            except OSError:
                pass
    if not keep:
        try:
            os.rmdir(parts_dir)
        except OSError:  # other files live there: leave them
            pass


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sora-jax ingest",
        description="Turn a folder of captioned videos and images into ArrayRecord clips.")
    p.add_argument("--input", required=True, help="folder of media files (searched recursively)")
    p.add_argument("--captions", default=None,
                   help="JSONL ({path, caption, start?, end?} per line) or CSV "
                        "(path,caption[,start,end]); default: captions.jsonl/.csv in --input")
    p.add_argument("--output", required=True, help="output path prefix of the dataset")
    p.add_argument("--fps", type=float, default=8.0, help="output frames per second (8)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="seconds used at most per captions entry (60; 0 = no limit)")
    p.add_argument("--clip-seconds", type=float, default=4.0,
                   help="longest clip in seconds; longer ranges are split (4)")
    p.add_argument("--max-side", type=int, default=256,
                   help="longest side in pixels before cropping (256; 0 = keep)")
    p.add_argument("--size-multiple", type=int, default=16,
                   help="H and W are cropped to multiples of this (16)")
    p.add_argument("--frame-multiple", type=int, default=4,
                   help="clips have 1 + frame_multiple * j frames (4)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default min(8, CPUs); 0 = in process)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="output shards (default: one per ~512 MiB of raw video)")
    p.add_argument("--clean-parts", action="store_true",
                   help="delete the resume cache (<output>.parts) after a successful merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (also ``sora-jax ingest``).

    Prints a one-line summary and the report path on stdout.

    Returns:
      0 when at least one clip was written, 1 when every input was skipped, 2 on a usage error
      (missing folder or captions file, impossible setting); the error goes to stderr.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = ingest(
            args.input, args.output, args.captions, fps=args.fps,
            max_seconds=args.max_seconds or None, clip_seconds=args.clip_seconds,
            max_side=args.max_side or None, size_multiple=args.size_multiple,
            frame_multiple=args.frame_multiple, workers=args.workers,
            num_shards=args.num_shards, keep_parts=not args.clean_parts,
            progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"sora-jax ingest: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k}={v}" for k, v in report["skipped_by_reason"].items())
    print(f"ingested {report['num_clips']} clips ({report['num_frames']} frames) from "
          f"{report['num_entries_ingested']} of {report['num_inputs']} inputs into "
          f"{report['num_shards']} shards; skipped {report['skipped']}"
          f"{f' ({reasons})' if reasons else ''}; {report['seconds']:.1f} s")
    print(f"report: {report['report_path']}")
    return 0 if report["num_clips"] else 1


if __name__ == "__main__":
    sys.exit(main())
