"""Captioned Moving MNIST from the 5000 bundled real MNIST digits.

Text-to-video data in the style of Sync-DRAW's captioned bouncing MNIST (Mittal, Marwah and
Balasubramanian, "Sync-DRAW: Automatic Video Generation using Deep Recurrent Attentive
Architectures", ACM MM 2017): one or two digits move on a black canvas and the caption names each
digit and its direction, e.g. "the digit 3 moves left and the digit 7 moves up".

Held-out evaluation, two ways:
  * digit instances: within each class (csv order), instances 0..399 are ``train`` and
    400..499 are ``eval``; the record stores the csv row in ``mnist_index``.
  * digit/motion combinations: ``HELDOUT_COMBOS = {(d, DIRECTIONS[d % 4]) for d in range(10)}``,
    i.e. 0/4/8 left, 1/5/9 right, 2/6 up, 3/7 down: exactly one direction per digit (10 of the
    40 pairs), every direction held out for some digit. ``train`` never contains them, so a
    model that renders "the digit 4 moves left" must compose digit and motion.

Motion model: each digit is a ``digit_size`` square patch (the MNIST 28x28 box, resized) that
moves with a constant integer speed (pixels/frame) along one axis and reflects off the walls when
its patch would leave the canvas (bouncing MNIST, Srivastava et al. 2015). The speed is drawn
from the speeds in ``speed_range`` whose whole-clip travel fits in the canvas, and the start
position so that the patch never reaches a wall during the clip: the captioned direction is then
the true, monotone motion of the digit. Only when even the slowest allowed speed cannot fit
(canvas too small for the duration) does the digit start against the opposite wall and bounce;
the record's ``bounces`` field counts such reflections so consumers can filter them.

Single-frame examples (T = 1, images) carry no motion: their caption is "the digit 3" (or
"the digit 3 and the digit 7") and their ``directions`` are -1.
"""
from __future__ import annotations

import functools
import re
import zlib
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from sora_jax.data import sources

__all__ = [
    "DIRECTIONS",
    "HELDOUT_COMBOS",
    "TRAIN_PER_CLASS",
    "is_heldout",
    "split_instances",
    "caption_for",
    "parse_caption",
    "valid_duration",
    "generate_moving_mnist",
]

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# (dy, dx) unit steps in image coordinates (y grows downwards), aligned with DIRECTIONS.
_STEPS = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.int64)
HELDOUT_COMBOS: frozenset[tuple[int, str]] = frozenset((d, DIRECTIONS[d % 4]) for d in range(10))
TRAIN_PER_CLASS = 400
SPLITS = ("train", "eval")


def _direction_name(direction: Union[int, str, np.integer]) -> str:
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        return direction
    i = int(direction)
    if not 0 <= i < len(DIRECTIONS):
        raise ValueError(f"direction index {i} out of range 0..{len(DIRECTIONS) - 1}")
    return DIRECTIONS[i]


def is_heldout(digit: int, direction: Union[int, str]) -> bool:
    """Whether (digit, direction) is a held-out combination (never in ``train``).

    Args:
      digit: 0..9. direction: name in ``DIRECTIONS`` or its index.
    """
    return (int(digit), _direction_name(direction)) in HELDOUT_COMBOS


def valid_duration(t: int) -> bool:
    """T = 1 (an image) or T = 1 + 4k, k >= 1 (causal VAE with 4x temporal compression)."""
    return t == 1 or (t > 1 and (t - 1) % 4 == 0)


@functools.lru_cache(maxsize=2)
def split_instances(split: str) -> tuple[np.ndarray, ...]:
    """MNIST csv rows of a split, per class.

    Args:
      split: ``"train"`` (first 400 instances of each class, csv order) or ``"eval"`` (last 100).

    Returns:
      10 read-only int64 arrays; entry d holds the csv row indices of digit class d.

    Raises:
      ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = sources.load_mnist()
    out = []
    for d in range(10):
        rows = np.flatnonzero(labels == d)
        rows = rows[:TRAIN_PER_CLASS] if split == "train" else rows[TRAIN_PER_CLASS:]
        rows.setflags(write=False)
        out.append(rows)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _digit_patches(digit_size: int) -> np.ndarray:
    images, _ = sources.load_mnist()
    if digit_size == 28:
        return images
    from PIL import Image

    # Pillow's resize filters widen their support when shrinking, so small digits stay smooth
    # instead of aliasing.
    out = np.stack([
        np.asarray(Image.fromarray(im).resize((digit_size, digit_size), Image.Resampling.BILINEAR))
        for im in images
    ])
    out.setflags(write=False)
    return out


def caption_for(digits: Sequence[int], directions: Sequence[Union[int, str, None]]) -> str:
    """Caption of a clip: "the digit 3 moves right" / "the digit 3 moves left and the digit 7 moves up".

    Args:
      digits: digit classes 0..9, one per digit on the canvas.
      directions: per digit a name in ``DIRECTIONS``, its index, or None / -1 for no motion
        (single-frame images: "the digit 3").

    Raises:
      ValueError: lengths differ, empty, digit outside 0..9, or unknown direction.
    """
    if len(digits) != len(directions) or not len(digits):
        raise ValueError(f"need one direction per digit, got {list(digits)} / {list(directions)}")
    parts = []
    for digit, direction in zip(digits, directions):
        digit = int(digit)
        if not 0 <= digit <= 9:
            raise ValueError(f"digit must be 0..9, got {digit}")
        if direction is None or (not isinstance(direction, str) and int(direction) < 0):
            parts.append(f"the digit {digit}")
        else:
            parts.append(f"the digit {digit} moves {_direction_name(direction)}")
    return " and ".join(parts)


_PART = re.compile(r"the digit (\d)(?: moves (left|right|up|down))?")
_SEP = re.compile(r" (?:and|while) (?=the digit )")


def parse_caption(caption: str) -> list[tuple[int, Optional[str]]]:
    """Inverse of ``caption_for``.

    Case, repeated whitespace and a trailing period are ignored; "while" is accepted as a
    separator as well as "and".

    Returns:
      [(digit, direction name or None for no motion), ...] in caption order.

    Raises:
      ValueError: the caption is not in the Moving MNIST grammar.
    """
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    out = []
    for part in _SEP.split(text):
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"not a Moving MNIST caption: {caption!r} (bad part {part!r})")
        out.append((int(m.group(1)), m.group(2)))
    return out


def _stream_id(split: str, heldout_only: bool) -> int:
    # A stable 32-bit tag per generator kind, so seed s of train and seed s of eval draw
    # independent streams (Python's hash() is salted per process, crc32 is not).
    return zlib.crc32(f"moving_mnist/{split}/{int(heldout_only)}".encode())


def _simulate(start: int, velocity: int, room: int, frames: int) -> tuple[np.ndarray, int]:
    """1-D positions of a patch bouncing in [0, room]; returns (positions int64 (frames,), bounces)."""
    pos = np.empty(frames, dtype=np.int64)
    p, v, bounces = start, velocity, 0
    for t in range(frames):
        pos[t] = p
        if t == frames - 1:
            break  # no step after the last frame, or a wall touched at the end counts as a bounce
        p += v
        # A fast digit could in principle cross the canvas twice in one step on a tiny canvas.
        while p < 0 or p > room:
            p = -p if p < 0 else 2 * room - p
            v = -v
            bounces += 1
    return pos, bounces


def generate_moving_mnist(
    split: str,
    num_examples: int,
    *,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    durations: Sequence[int] = (9,),
    digit_size: int = 28,
    two_digit_prob: float = 0.3,
    speed_range: tuple[int, int] = (1, 3),
    image_fraction: float = 0.0,
    heldout_only: bool = False,
    fps: float = 8.0,
    seed: int = 0,
    start_index: int = 0,
) -> Iterator[dict]:
    """Yield captioned Moving MNIST examples.

    Example ``i`` is drawn from ``np.random.default_rng((seed, stream(split, heldout_only), i))``
    alone, so it does not depend on how many examples are built or in which order.

    Per example: a canvas size from ``sizes`` and a duration from ``durations`` (uniform), or
    T = 1 with probability ``image_fraction``; one digit, or two with probability
    ``two_digit_prob`` (two distinct classes, so captions are unambiguous); for each digit a
    class, an instance of that class from the split, a direction and a speed.

    Args:
      split: ``"train"`` (instances 0..399 per class; held-out combos never produced) or
        ``"eval"`` (instances 400..499; all combos, or only ``HELDOUT_COMBOS`` if
        ``heldout_only``).
      num_examples: number of examples to yield.
      sizes: canvas sizes (H, W) in pixels; each side must be >= digit_size.
      durations: frame counts, each 1 or 1 + 4k.
      digit_size: side of the digit patch in pixels (MNIST's 28x28 box resized with PIL).
      two_digit_prob: probability of two digits.
      speed_range: inclusive (min, max) speed in pixels per frame, min >= 1.
      image_fraction: extra probability of a 1-frame example (besides 1 in ``durations``).
      heldout_only: eval only: produce only held-out digit/direction combos (for the
        prompt-adherence evaluation); needs durations > 1 and image_fraction = 0.
      fps: frames per second stored in the record (playback speed of the clip).
      seed: integer seed.
      start_index: index of the first example (to build a range of a larger set).

    Yields:
      dict with
        ``video``       uint8 (T, H, W, 3), white digits on black, gray replicated to RGB;
        ``caption``     str (see ``caption_for``);
        ``digits``      int32 (n,) classes; ``directions`` int32 (n,) index into DIRECTIONS or
                        -1 for images; ``speeds`` int32 (n,) pixels/frame (0 for images);
        ``mnist_index`` int32 (n,) csv rows of the digit instances;
        ``positions``   float32 (T, n, 2) patch centre (y, x) per frame in pixel-index
                        coordinates (top-left pixel centre is (0, 0));
        ``bounces``     int32 (n,) wall reflections during the clip (0 unless unavoidable);
        ``split`` str; ``source`` "moving_mnist"; ``fps`` float; ``index`` int.

    Raises:
      ValueError: bad split, sizes, durations, speed range, probabilities or heldout_only use.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if heldout_only and split != "eval":
        raise ValueError("heldout_only=True is for split='eval': held-out combos never go to train")
    sizes = [tuple(int(v) for v in s) for s in sizes]
    durations = [int(t) for t in durations]
    if not sizes or any(len(s) != 2 or min(s) < digit_size for s in sizes):
        raise ValueError(f"every size (H, W) must be >= digit_size={digit_size}, got {sizes}")
    if not durations or not all(valid_duration(t) for t in durations):
        raise ValueError(f"durations must be 1 or 1 + 4k, got {durations}")
    lo, hi = int(speed_range[0]), int(speed_range[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"speed_range must satisfy 1 <= min <= max, got {speed_range}")
    if not (0.0 <= two_digit_prob <= 1.0 and 0.0 <= image_fraction <= 1.0):
        raise ValueError("two_digit_prob and image_fraction must be in [0, 1]")
    if heldout_only and (1 in durations or image_fraction > 0):
        raise ValueError("heldout_only needs motion: durations > 1 and image_fraction = 0")

    pools = split_instances(split)
    patches = _digit_patches(int(digit_size))
    _, labels = sources.load_mnist()
    allowed = []  # per digit: direction indices this split may use
    for d in range(10):
        held = [i for i, name in enumerate(DIRECTIONS) if (d, name) in HELDOUT_COMBOS]
        if split == "train":
            allowed.append([i for i in range(len(DIRECTIONS)) if i not in held])
        elif heldout_only:
            allowed.append(held)
        else:
            allowed.append(list(range(len(DIRECTIONS))))
    stream = _stream_id(split, heldout_only)
    s = int(digit_size)

    for index in range(start_index, start_index + num_examples):
        rng = np.random.default_rng((int(seed), stream, index))
        h, w = sizes[rng.integers(len(sizes))]
        frames = durations[rng.integers(len(durations))]
        if image_fraction > 0 and rng.random() < image_fraction:
            frames = 1
        n = 2 if rng.random() < two_digit_prob else 1
        digits = rng.choice(10, size=n, replace=False)

        video = np.zeros((frames, h, w), dtype=np.uint8)
        positions = np.zeros((frames, n, 2), dtype=np.float32)
        directions = np.full(n, -1, dtype=np.int32)
        speeds = np.zeros(n, dtype=np.int32)
        bounces = np.zeros(n, dtype=np.int32)
        rows = np.zeros(n, dtype=np.int32)
        rooms = np.array([h - s, w - s], dtype=np.int64)  # top-left range per axis (y, x)
        for j, digit in enumerate(digits):
            row = int(rng.choice(pools[digit]))
            rows[j] = row
            top_left = np.zeros((frames, 2), dtype=np.int64)
            if frames == 1:
                top_left[0] = [rng.integers(rooms[0] + 1), rng.integers(rooms[1] + 1)]
            else:
                k = int(rng.choice(allowed[digit]))
                step = _STEPS[k]
                axis = 0 if step[0] else 1
                room = int(rooms[axis])
                fitting = [v for v in range(lo, hi + 1) if v * (frames - 1) <= room]
                speed = int(rng.choice(fitting)) if fitting else lo
                travel = speed * (frames - 1)
                if travel <= room:
                    # Start so the whole travel stays inside: monotone motion, no bounce.
                    offset = int(rng.integers(room - travel + 1))
                    start = offset if step[axis] > 0 else room - offset
                else:
                    # Cannot fit: start against the wall behind the motion to move forward longest.
                    start = 0 if step[axis] > 0 else room
                along, bounces[j] = _simulate(start, speed * int(step[axis]), room, frames)
                top_left[:, axis] = along
                top_left[:, 1 - axis] = rng.integers(rooms[1 - axis] + 1)
                directions[j], speeds[j] = k, speed
            patch = patches[row]
            for t in range(frames):
                y, x = top_left[t]
                np.maximum(video[t, y:y + s, x:x + s], patch, out=video[t, y:y + s, x:x + s])
            positions[:, j] = top_left + (s - 1) / 2.0
        assert all(labels[r] == d for r, d in zip(rows, digits))
        yield {
            "video": np.repeat(video[..., None], 3, axis=-1),
            "caption": caption_for(digits, directions),
            "digits": digits.astype(np.int32),
            "directions": directions,
            "speeds": speeds,
            "mnist_index": rows,
            "positions": positions,
            "bounces": bounces,
            "split": split,
            "source": "moving_mnist",
            "fps": float(fps),
            "index": int(index),
        }
