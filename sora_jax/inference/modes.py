"""Image and video prompts: every mode is text plus clean context frames (or an input to edit).

Each mode places the given pixels on a *canvas* of the output's length, encodes the canvas
with the causal VAE, and gives the DiT as context every latent frame whose pixel frames are
all given (:func:`sora_jax.diffusion.conditioning.context_latent_frames`); unknown canvas
frames are filled with the nearest given frame, which only matters for the causal encoder's
view of later given frames. Given frames that share a latent with generated ones are
regenerated (the junction of extend-backward and connect: at most td - 1 frames).

  t2v, t2i         no context (t2i: one frame)
  i2v              the image is frame 0
  extend-forward   the input's last 1 + td a frames start the output (a = n // 2 of the
                   output's n latent groups); the causal decoder returns them exactly
  extend-backward  the input's first td b frames end the output (b = max(1, n // 2))
  connect          video A's last 1 + td a frames start it, video B's first td b frames
                   end it (a = (n - 1) // 2, b = max(1, a)); the middle is generated
  loop             t2v clip of latents [v0, v1..vn] (v0 codes frame 0 alone, each v_i a
                   group of td frames); then m = max(1, n // 2) link latents g are
                   generated with the whole clip as leading context and v1 (v1, v2 when
                   n >= 2) as ending context, so they lead back into the clip; the loop is the period
                   [v1..vn, g1..gm] decoded periodically (:func:`periodic_decode`):
                   td (n + m) frames
  edit             SDEdit (Meng et al. 2022) of the input at strength s

The causal decoder decodes a given frame that follows generated ones from the generated
history, which changes it; such frames are replaced by their VAE round trip (the output holds
every given frame as the autoencoder reproduces it) and the cut is measured.

Metrics (in :class:`ModeResult.info`): ``conditioned_frames_psnr`` (dB, output vs the VAE
round trip of the canvas, over the pixel frames of context latents, capped at 100),
``decoded_context_psnr`` (the same before the replacement), ``junction_ratio`` (mean |frame
difference| across the cut over the median consecutive-frame difference), ``loop_seam_ratio``
(mean |last - first| over the same median), ``input_psnr`` for edit (output vs the input's VAE
round trip), ``loop_period_psnr`` (the last decoded period vs the one before: how close the
periodic decode came to its steady state).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from sora_jax.diffusion.conditioning import context_latent_frames, latent_frame_spans
from sora_jax.evaluation.image_quality import PSNR_CAP_DB, psnr
from sora_jax.inference.generate import Generator, Request

MODES = ("t2v", "t2i", "i2v", "extend-forward", "extend-backward", "connect", "loop", "edit")
NUM_INPUTS = {"t2v": 0, "t2i": 0, "i2v": 1, "extend-forward": 1, "extend-backward": 1,
              "connect": 2, "loop": 0, "edit": 1}
LOOP_DECODE_PERIODS = 6  # the quickstart decoder's period-to-period change shrinks ~3x a period


class ModeError(ValueError):
    """A mode cannot run with the given inputs (wrong count, too short, too few frames)."""


class ModeResult(NamedTuple):
    """A generated video (T, H, W, 3) uint8, what was measured about it, and the normalised
    latent (t, h, w, c) it was decoded from (for loop: the clip's first latent, then the
    period that :func:`periodic_decode` repeats)."""

    video: np.ndarray
    info: dict[str, Any]
    latent: np.ndarray | None = None


def fit_media(media: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scales frames to cover (height, width), keeping the aspect ratio, then centre-crops.

    Args:
      media: (T, H, W, 3) or (H, W, 3) uint8.

    Returns:
      (T, height, width, 3) uint8 (T = 1 for an image).

    Raises:
      ModeError: media that is not uint8 (T, H, W, 3) or (H, W, 3).
    """
    media = np.asarray(media)
    if media.ndim == 3:
        media = media[None]
    if media.ndim != 4 or media.shape[-1] != 3 or media.dtype != np.uint8:
        raise ModeError(f"expected uint8 (T, H, W, 3) media, got {media.dtype} {media.shape}")
    _, h, w, _ = media.shape
    s = max(height / h, width / w)
    rh, rw = max(height, round(h * s)), max(width, round(w * s))
    y0, x0 = (rh - height) // 2, (rw - width) // 2
    out = []
    for frame in media:
        im = Image.fromarray(frame).resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=2.0)
        out.append(np.asarray(im)[y0:y0 + height, x0:x0 + width])
    return np.stack(out)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos, capped at ``PSNR_CAP_DB`` (JSON has no infinity)."""
    return float(min(psnr(a, b), PSNR_CAP_DB))


def _median_step(video: np.ndarray) -> float:
    v = np.asarray(video, np.float64)
    return float(max(np.median(np.mean(np.abs(np.diff(v, axis=0)), axis=(1, 2, 3))), 1e-12))


def loop_seam_ratio(video: np.ndarray) -> float:
    """Seam difference over typical motion: mean |x_0 - x_{T-1}| / median_i mean |x_{i+1} - x_i|.

    1 means the wrap from the last frame to the first is as large as a typical step; a
    seamless loop has a ratio <= 1. Needs T >= 3.
    """
    v = np.asarray(video, np.float64)
    return float(np.mean(np.abs(v[0] - v[-1])) / _median_step(v))


def periodic_decode(decode: Callable[[np.ndarray], np.ndarray], first: np.ndarray,
                    period: np.ndarray, periods: int = LOOP_DECODE_PERIODS) -> tuple[np.ndarray, float]:
    """Decodes a latent period as an endless loop: the steady state of a causal decoder.

    A causal decoder's output at a frame depends on the latents before it, so a loop cut from
    one ordinary decode has a seam: its first frame was decoded without the end before it
    (and, for a causal VAE, frame 0 is coded alone). Decoding ``first`` followed by
    ``periods`` copies of ``period`` and keeping the last copy gives frames decoded with the
    loop's own end as their history; for a decoder whose memory fades, successive copies
    converge, and the kept one wraps into itself as any other frame follows the one before.

    Args:
      decode: (t, h, w, c) normalised latent -> (T, H, W, 3) uint8 video, causal in time with
        ``T = 1 + td (t - 1)`` (:meth:`sora_jax.inference.generate.Generator.decode`).
      first: (h, w, c) the latent that starts every causal sequence (frame 0, coded alone).
      period: (P, h, w, c) the loop's latents, P >= 1.
      periods: copies decoded, >= 2.

    Returns:
      (td P, H, W, 3) uint8 frames of the last copy, and the PSNR (dB, capped) between the
      last two copies: 100 means the decode reached its steady state.

    Raises:
      ValueError: ``periods`` < 2 or an empty period.
    """
    if periods < 2 or len(period) < 1:
        raise ValueError(f"periodic_decode needs periods >= 2 and a non-empty period, got "
                         f"{periods} and {len(period)} latents")
    video = decode(np.concatenate([np.asarray(first)[None]] + [np.asarray(period)] * periods))
    n = (len(video) - 1) // periods  # pixel frames per period
    last, before = video[len(video) - n:], video[len(video) - 2 * n:len(video) - n]
    return last, _psnr(last, before)


def _canvas(frames: int, given: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W, 3) uint8 canvas with the given frames at their indices, others the nearest
    given frame (earlier on ties), and the (F,) bool mask of given frames."""
    idx = np.array(sorted(given))
    known = np.zeros(frames, bool)
    known[idx] = True
    nearest = idx[np.argmin(np.abs(np.arange(frames)[:, None] - idx[None, :]), axis=1)]
    return np.stack([given[int(i)] for i in nearest]), known


class _Setup(NamedTuple):
    request: Request
    canvas_roundtrip: np.ndarray | None  # uint8 decode of the encoded canvas
    context_pixels: np.ndarray  # (F,) bool: pixel frames inside context latents


def _context_request(gen: Generator, prompt: str, frames: int, given: dict[int, np.ndarray]) -> _Setup:
    canvas, known = _canvas(frames, given)
    td = gen.temporal_downsample
    ctx = context_latent_frames(known, td)
    latent = gen.encode(canvas)
    pixels = np.zeros(frames, bool)
    for (a, b), c in zip(latent_frame_spans(len(ctx), td), ctx):
        pixels[a:b] = c
    h, w = canvas.shape[1:3]
    return _Setup(Request(prompt, frames, h, w, context=latent, context_frames=ctx),
                  gen.decode(latent), pixels)


def _groups(frames: int, td: int) -> int:
    if frames < 1 or (frames - 1) % td:
        raise ModeError(f"{frames} frames: use 1 + {td}k")
    return (frames - 1) // td


def _usable(video: np.ndarray, need: int, what: str) -> None:
    if len(video) < need:
        raise ModeError(f"{what} has {len(video)} frames; this mode needs at least {need}")


def setup_mode(gen: Generator, mode: str, prompt: str, *, frames: int, height: int, width: int,
               inputs: Sequence[np.ndarray] = (), strength: float = 0.6) -> _Setup:
    """The request of a mode (without running the sampler); see the module docstring.

    Raises:
      ModeError: unknown mode, wrong number of inputs, inputs too short for the output.
    """
    if mode not in MODES:
        raise ModeError(f"unknown mode {mode!r}; choose from {MODES}")
    if len(inputs) != NUM_INPUTS[mode]:
        raise ModeError(f"mode {mode} takes {NUM_INPUTS[mode]} input file(s), got {len(inputs)}")
    td = gen.temporal_downsample
    if mode == "t2i":
        frames = 1
    n = _groups(frames, td)
    media = [fit_media(m, height, width) for m in inputs]
    none = np.zeros(frames, bool)
    if mode == "loop" and n < 1:
        raise ModeError(f"mode loop needs at least {1 + td} frames")
    if mode in ("t2v", "t2i", "loop"):
        return _Setup(Request(prompt, frames, height, width), None, none)
    if mode == "edit":
        video = media[0]
        _usable(video, frames, "the input video")
        latent = gen.encode(video[:frames])
        return _Setup(Request(prompt, frames, height, width, init=latent, strength=float(strength)),
                      gen.decode(latent), none)
    if n < 1 and mode != "i2v":
        raise ModeError(f"mode {mode} needs at least {1 + td} frames")
    if mode == "i2v":
        return _context_request(gen, prompt, frames, {0: media[0][0]})
    if mode == "extend-forward":
        video = media[0]
        a = min(n // 2, (len(video) - 1) // td)
        tail = video[len(video) - (1 + td * a):]
        return _context_request(gen, prompt, frames, dict(enumerate(tail)))
    if mode == "extend-backward":
        video = media[0]
        b = min(max(1, n // 2), len(video) // td)
        _usable(video, td, "the input video")
        head = video[:td * b]
        return _context_request(gen, prompt, frames, {frames - td * b + i: f for i, f in enumerate(head)})
    # connect
    a, b = (n - 1) // 2, max(1, (n - 1) // 2)
    if n - a - b < 1:
        raise ModeError(f"connect needs at least {1 + 2 * td} frames to leave a gap to generate")
    va, vb = media
    _usable(va, 1 + td * a, "video A")
    _usable(vb, td * b, "video B")
    given = dict(enumerate(va[len(va) - (1 + td * a):]))
    given.update({frames - td * b + i: f for i, f in enumerate(vb[:td * b])})
    return _context_request(gen, prompt, frames, given)


def _generate(gen: Generator, st: _Setup, kw: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Samples a mode's request and puts the given frames in the output.

    The causal decoder decodes a given frame that comes after generated frames from the
    generated history, which changes it (``decoded_context_psnr`` measures by how much); such
    frames are replaced by their VAE round trip, so the output holds every given frame as the
    autoencoder reproduces the input, and ``junction_ratio`` measures the cut: the difference
    across it over the median consecutive-frame difference (1 = a typical step).
    """
    latent = gen.sample_latents([st.request], **kw)[0]
    video = gen.decode(latent)
    info: dict[str, Any] = {}
    sel = st.context_pixels
    if sel.any():
        rt = st.canvas_roundtrip
        info["conditioned_frames"] = [int(i) for i in np.nonzero(sel)[0]]
        info["decoded_context_psnr"] = _psnr(video[sel], rt[sel])
        after = sel & (np.cumsum(~sel) > 0)  # given frames that follow a generated one
        if after.any():
            video = video.copy()
            video[after] = rt[after]
            j = int(np.argmax(after))
            cut = np.mean(np.abs(video[j].astype(np.float64) - video[j - 1]))
            info["junction_ratio"] = float(cut / _median_step(video))
        info["conditioned_frames_psnr"] = _psnr(video[sel], rt[sel])
    return video, info, latent


def run_mode(gen: Generator, mode: str, prompt: str, *, frames: int, height: int, width: int,
             seed: int, guidance: float | None, steps: int, solver: str = "euler",
             visual_guidance: float | None = None, inputs: Sequence[np.ndarray] = (),
             strength: float = 0.6) -> ModeResult:
    """Runs one mode end to end and measures it.

    Args:
      gen: a run's :class:`Generator`.
      mode: one of :data:`MODES`.
      prompt: text prompt (already extended).
      frames, height, width: output shape (frames = 1 + td k; ignored for t2i: 1). For loop,
        the clip's shape; the loop itself has td (k + max(1, k // 2)) frames.
      seed, guidance, steps, solver, visual_guidance: sampler settings
        (:meth:`Generator.sample_latents`); loop's second pass uses ``seed + 1``.
      inputs: uint8 media, (T, H, W, 3) videos or (H, W, 3) images, any size (scaled to
        cover and centre-cropped): one for i2v / extend-* / edit, two (A, B) for connect.
      strength: edit's SDEdit strength in [0, 1].

    Returns:
      :class:`ModeResult`; ``info`` holds ``mode``, ``frames``, and by mode
      ``conditioned_frames`` (pixel frame indices given as context), ``conditioned_frames_psnr``,
      ``decoded_context_psnr`` and ``junction_ratio`` (see :func:`_generate`), for loop
      ``loop_seam_ratio``, ``loop_period_psnr`` (:func:`periodic_decode`), ``clip_frames``,
      ``link_frames`` and ``clip_seam_ratio`` (the clip's own, decoded once), for edit
      ``strength`` and ``input_psnr``.

    Raises:
      ModeError: see :func:`setup_mode`. StageError: impossible shapes or settings.
    """
    kw = dict(seed=seed, guidance=guidance, steps=steps, solver=solver, visual_guidance=visual_guidance)
    st = setup_mode(gen, mode, prompt, frames=frames, height=height, width=width, inputs=inputs,
                    strength=strength)
    if mode == "loop":
        return _loop(gen, st.request, kw)
    video, measured, latent = _generate(gen, st, kw)
    info: dict[str, Any] = {"mode": mode, "frames": int(video.shape[0]), **measured}
    if mode == "edit":
        info["strength"] = float(strength)
        info["input_psnr"] = _psnr(video, st.canvas_roundtrip)
    return ModeResult(video, info, latent)


def _loop(gen: Generator, clip_request: Request, kw: dict[str, Any]) -> ModeResult:
    """The loop mode (module docstring): clip, generated link, periodic decode."""
    clip = gen.sample_latents([clip_request], **kw)[0]
    n = clip.shape[0] - 1
    m = max(1, n // 2)
    e = min(2, n)
    link_ctx = np.concatenate([clip, np.zeros_like(clip[:m]), clip[1:1 + e]])
    given = np.array([True] * (n + 1) + [False] * m + [True] * e)
    r = clip_request
    link_request = Request(r.prompt, 1 + gen.temporal_downsample * (n + m + e), r.height, r.width,
                           context=link_ctx, context_frames=given)
    link = gen.sample_latents([link_request], **dict(kw, seed=kw["seed"] + 1))[0]
    period = np.concatenate([clip[1:], link[n + 1:n + 1 + m]])
    video, period_psnr = periodic_decode(gen.decode, clip[0], period)
    clip_video = gen.decode(clip)
    info = {"mode": "loop", "frames": int(video.shape[0]), "clip_frames": int(clip_video.shape[0]),
            "link_frames": int(gen.temporal_downsample * m), "loop_seam_ratio": loop_seam_ratio(video),
            "clip_seam_ratio": loop_seam_ratio(clip_video), "loop_period_psnr": period_psnr}
    return ModeResult(video, info, np.concatenate([clip[:1], period]))
