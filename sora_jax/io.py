"""Video and image I/O: mp4 read/write (PyAV), PNG contact sheets (Pillow), JSON, file hashes.

Project conventions: a video is a numpy array (T, H, W, 3), channels-last, either uint8
in [0, 255] or float in [-1, 1]. Every writer accepts both; every reader returns uint8.

mp4 files are H.264 (``libx264``, yuv420p) when the FFmpeg bundled with PyAV offers it, which the
PyPI wheels do; otherwise MPEG-4 part 2 (``mpeg4``), with a warning. yuv420p subsamples chroma
2x2, so odd frame sizes are padded to even by repeating the last row / column: a 33x31 video
comes back as 34x32.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from fractions import Fraction
from typing import Any, Mapping, Sequence

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "to_uint8",
    "to_float",
    "write_mp4",
    "read_video",
    "read_metadata",
    "write_contact_sheet",
    "write_json",
    "default_codec",
    "write_png",
    "read_png_text",
    "read_image",
    "read_media",
    "IMAGE_EXTENSIONS",
    "file_sha256",
    "folder_sha256",
]

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- pixel conversions


def to_uint8(video: Any) -> np.ndarray:
    """Converts pixels to uint8 [0, 255].

    Args:
      video: array of any shape; uint8 (returned as is) or float in [-1, 1] (values outside are
        clipped, then mapped linearly, -1 -> 0 and 1 -> 255, rounding to nearest). jax arrays are
        accepted (converted with ``np.asarray``).

    Returns:
      uint8 array of the same shape.

    Raises:
      TypeError: for integer dtypes other than uint8 and for bool, whose scale is ambiguous.
    """
    arr = np.asarray(video)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected uint8 or float pixels in [-1, 1], got dtype {arr.dtype}")
    arr = np.clip(arr.astype(np.float32), -1.0, 1.0)
    return np.rint((arr + 1.0) * 127.5).astype(np.uint8)


def to_float(video: Any) -> np.ndarray:
    """Converts pixels to float32 in [-1, 1].

    Args:
      video: array of any shape; uint8 (mapped 0 -> -1, 255 -> 1) or float (cast to float32,
        values unchanged: a float input is taken to be in [-1, 1] already).

    Returns:
      float32 array of the same shape.

    Raises:
      TypeError: for integer dtypes other than uint8 and for bool.
    """
    arr = np.asarray(video)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected uint8 or float pixels in [-1, 1], got dtype {arr.dtype}")
    return arr.astype(np.float32)


def _as_video(video: Any, name: str = "video") -> np.ndarray:
    """Validates a (T, H, W, 3) video and returns it as uint8."""
    arr = to_uint8(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (T, H, W, 3), got {arr.shape}")
    if min(arr.shape[:3]) == 0:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    return arr


def _upscale(video: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (T, H, W, C) by an integer factor along H and W."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    if scale == 1:
        return video
    return np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)


# ----------------------------------------------------------------------------- mp4

_FF_QP2LAMBDA = 118  # FFmpeg's quantiser -> lambda factor, as in `ffmpeg -q:v`


def default_codec() -> str:
    """Name of the encoder `write_mp4` uses by default: 'libx264' if available, else 'mpeg4'."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(
    path: PathLike,
    video: Any,
    fps: float = 8,
    metadata: Mapping[str, Any] | None = None,
    scale: int = 1,
    codec: str | None = None,
    crf: int = 18,
) -> pathlib.Path:
    """Writes a video to an mp4 file.

    Args:
      path: output file; parent folders are created; an existing file is overwritten.
      video: (T, H, W, 3) uint8, or float in [-1, 1] (clipped).
      fps: frames per second (> 0); non-integer rates such as 29.97 are stored as a fraction.
      metadata: str -> str container tags (e.g. prompt, seed, checkpoint). Values are converted
        with ``str``. Custom keys are kept in the mp4 through the muxer's ``use_metadata_tags``
        flag; read them back with `read_metadata`.
      scale: integer nearest-neighbour upscaling factor, so that 32x32 samples are viewable.
      codec: None picks `default_codec()` ('libx264', yuv420p; else 'mpeg4' with a warning);
        any other FFmpeg encoder name is used as given.
      crf: libx264 constant rate factor (lower is better quality; 18 is visually near
        transparent, 23 is x264's default). Ignored by other codecs, which use a fixed quantiser.

    Returns:
      The path written, as a pathlib.Path.

    Raises:
      ValueError: wrong shape, empty video, non-positive fps or bad scale.
      TypeError: pixel dtype other than uint8 / float.
    """
    frames = _upscale(_as_video(video), scale)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if codec is None:
        codec = default_codec()
        if codec != "libx264":
            warnings.warn(
                "libx264 is not available in PyAV's FFmpeg; writing MPEG-4 part 2 instead",
                RuntimeWarning,
                stacklevel=2,
            )
    # yuv420p stores chroma at half resolution: both sides must be even. Edge replication avoids
    # a dark border that zero padding would add.
    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        h, w = h + pad_h, w + pad_w

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    # mp4 only writes a fixed list of tag names unless asked to keep arbitrary ones.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
        for key, value in (metadata or {}).items():
            container.metadata[str(key)] = str(value)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        if stream.codec_context.codec.name == "libx264":  # also when asked for by alias ("h264")
            stream.options = {"crf": str(int(crf))}
        else:
            # mpeg4's default bit rate (200 kb/s) visibly blocks even small videos; a fixed
            # quantiser keeps quality independent of size.
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * _FF_QP2LAMBDA
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _open_for_reading(path: PathLike):
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from e


def read_video(path: PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decodes the first video stream of a media file.

    Args:
      path: any container / codec FFmpeg can decode (mp4, webm, avi, gif, ...).
      max_frames: decode at most this many frames from the start (None: all).

    Returns:
      uint8 array (T, H, W, 3), RGB.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file is corrupt or unreadable, has no video stream or no decodable frame;
        the message names the path.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    container = _open_for_reading(path)
    frames: list[np.ndarray] = []
    try:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    finally:
        container.close()
    if not frames:
        raise ValueError(f"no decodable video frame in {path}")
    return np.stack(frames)


def read_metadata(path: PathLike) -> dict[str, str]:
    """Container-level metadata tags of a media file (str -> str).

    Includes the tags written by `write_mp4` and those the muxer adds itself (e.g. 'encoder',
    'major_brand').

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file is corrupt or unreadable (the message names the path).
    """
    container = _open_for_reading(path)
    try:
        return {str(k): str(v) for k, v in container.metadata.items()}
    finally:
        container.close()


# ----------------------------------------------------------------------------- contact sheets

_SHEET_PAD = 2  # pixels between cells and around the sheet
_LABEL_HEIGHT = 14  # pixels of the text band above a labelled row


def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, ValueError, OSError):  # Pillow built without FreeType: bitmap font
        return ImageFont.load_default()


def _pick_frames(num_frames: int, max_frames: int) -> np.ndarray:
    """Evenly spaced frame indices that always include the first and the last frame."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.rint(np.linspace(0, num_frames - 1, max_frames)).astype(int))


def write_contact_sheet(
    path: PathLike,
    videos: Sequence[Any],
    labels: Sequence[str] | None = None,
    max_frames: int = 9,
    scale: int = 2,
) -> pathlib.Path:
    """Writes a PNG grid: one row per video, frames left to right, an optional label per row.

    Videos longer than ``max_frames`` are shown at ``max_frames`` evenly spaced frames (first and
    last included). Frames are upscaled ``scale`` times by nearest neighbour. Videos of different
    sizes share a cell width of the widest; each row is as tall as its own video.

    Layout in pixels, with pad = 2 and a label band of 14 px (only when ``labels`` is given):
      width  = pad + n_cols * (max_W * scale + pad), n_cols = max over videos of frames shown
      height = pad + sum over rows of (label band + H_row * scale + pad)
    Background white, label text black (Pillow's default font); long labels are cut at the edge.

    Args:
      path: output PNG; parent folders are created.
      videos: non-empty list of (T, H, W, 3) arrays, uint8 or float in [-1, 1].
      labels: None, or one string per video.
      max_frames: most frames per row (>= 1).
      scale: integer upscaling factor (>= 1).

    Returns:
      The path written.

    Raises:
      ValueError: no videos, a video of the wrong shape, or labels of the wrong length.
    """
    if not len(videos):
        raise ValueError("write_contact_sheet needs at least one video")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"got {len(labels)} labels for {len(videos)} videos")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    rows = []
    for i, v in enumerate(videos):
        v = _as_video(v, name=f"videos[{i}]")
        rows.append(_upscale(v[_pick_frames(v.shape[0], max_frames)], scale))
    n_cols = max(r.shape[0] for r in rows)
    cell_w = max(r.shape[2] for r in rows)
    label_h = _LABEL_HEIGHT if labels is not None else 0
    width = _SHEET_PAD + n_cols * (cell_w + _SHEET_PAD)
    height = _SHEET_PAD + sum(label_h + r.shape[1] + _SHEET_PAD for r in rows)

    sheet = np.full((height, width, 3), 255, dtype=np.uint8)
    y = _SHEET_PAD
    label_tops = []
    for r in rows:
        label_tops.append(y)
        y += label_h
        _, rh, rw, _ = r.shape
        for j, frame in enumerate(r):
            x = _SHEET_PAD + j * (cell_w + _SHEET_PAD)
            sheet[y : y + rh, x : x + rw] = frame
        y += rh + _SHEET_PAD
    image = Image.fromarray(sheet)
    if labels is not None:
        draw = ImageDraw.Draw(image)
        font = _label_font()
        for top, text in zip(label_tops, labels):
            draw.text((_SHEET_PAD, top), str(text), fill=(0, 0, 0), font=font)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- json


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (pathlib.PurePath,)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "__array__"):  # jax arrays
        return np.asarray(obj).tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json(path: PathLike, obj: Any) -> pathlib.Path:
    """Writes ``obj`` as pretty JSON (indent 2, sorted keys, trailing newline).

    numpy / jax scalars and arrays become Python numbers and lists, paths become strings, sets
    sorted lists. Non-finite floats are written as NaN / Infinity (Python's json default, which
    ``json.load`` reads back; strict parsers do not). The file is written to a temporary file in
    the same folder and renamed, so readers never see half a file.

    Raises:
      TypeError: an object that has no JSON form.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)  # mkstemp creates 0600; give the file the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- single images


def write_png(
    path: PathLike,
    image: Any,
    text: Mapping[str, str] | None = None,
    scale: int = 1,
) -> pathlib.Path:
    """Writes one RGB image as a PNG, optionally with text chunks (e.g. provenance).

    Args:
      path: output file; parent folders are created; an existing file is overwritten.
      image: (H, W, 3) or (1, H, W, 3), uint8 or float in [-1, 1] (clipped).
      text: str -> str, one iTXt chunk per entry (UTF-8, so any prompt survives). Keys must be
        1-79 Latin-1 characters, as the PNG format requires. Read them back with `read_png_text`.
      scale: integer nearest-neighbour upscaling factor.

    Returns:
      The path written.

    Raises:
      ValueError: wrong shape, empty image, bad scale or an invalid text key.
      TypeError: pixel dtype other than uint8 / float.
    """
    arr = to_uint8(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise ValueError(f"image must have shape (H, W, 3) or (1, H, W, 3), got {np.shape(image)}")
    frame = _upscale(_as_video(arr, name="image"), scale)[0]
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            key = str(key)
            if not 1 <= len(key) <= 79 or not all(ord(c) < 256 for c in key):
                raise ValueError(f"PNG text keys must be 1-79 Latin-1 characters, got {key!r}")
            info.add_itxt(key, str(value))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(frame)).save(path, format="PNG", pnginfo=info)
    return path


def _open_image(path: PathLike) -> Image.Image:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not at first use
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise ValueError(f"cannot read image {path}: {e}") from e
    return image


def read_png_text(path: PathLike) -> dict[str, str]:
    """Text chunks (tEXt, zTXt, iTXt) of a PNG file, str -> str.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file is not a readable image (the message names the path).
    """
    with _open_image(path) as image:
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def read_image(path: PathLike) -> np.ndarray:
    """Reads an image file (any format Pillow decodes) as RGB.

    Gray, palette and RGBA images are converted to RGB (alpha dropped); for animated formats the
    first frame is read.

    Returns:
      uint8 array (H, W, 3).

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file is corrupt or not an image (the message names the path).
    """
    with _open_image(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})  # read as images


def read_media(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) or a video file as (T, H, W, 3), uint8 (by file extension).

    Raises:
      FileNotFoundError / ValueError: as :func:`read_image` and :func:`read_video`.
    """
    if os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS:
        return read_image(path)
    return read_video(path)


# ----------------------------------------------------------------------------- hashes

_BLOCK = 1 << 20  # read files in 1 MiB blocks: checkpoints can be far larger than memory allows


def _hash_file_into(h, path: PathLike):
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
      FileNotFoundError: the path does not exist.
    """
    h = hashlib.sha256()
    _hash_file_into(h, path)
    return h.hexdigest()


def folder_sha256(folder: PathLike) -> str:
    """Hex SHA-256 over every file below ``folder``: files in sorted order of their relative
    POSIX paths, each fed as ``path \\0 size \\0 bytes``, so the digest depends on names and
    contents only (not on creation order, timestamps or permissions), and moving bytes from
    one file to another changes it.

    Raises:
      FileNotFoundError: ``folder`` is not a folder.
    """
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel, path in files:
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        _hash_file_into(h, path)
    return h.hexdigest()
