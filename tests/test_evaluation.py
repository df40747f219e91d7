"""Tests for sora_jax.evaluation: PSNR / SSIM (against scikit-image) and the captioned Moving
MNIST evaluator.

The digit classifier is checked against the real MNIST labels of a held-out split (an
independent reference); the motion tracker against clips built from real MNIST digits pasted
at known positions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sora_jax.evaluation import digits, image_quality as metrics

STEPS = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}


# ----------------------------------------------------------------------------- metrics
# scikit-image is the independent reference: structural_similarity with the paper's settings
# (Gaussian window sigma 1.5, population covariances) and peak_signal_noise_ratio, in float64.


def _skimage_ssim_per_frame(a, b):
    """SSIM of each (H, W, C) frame of [-1, 1] videos, mapped to [0, 1], as skimage computes it."""
    out = []
    for x, y in zip(a.reshape((-1,) + a.shape[-3:]), b.reshape((-1,) + b.shape[-3:])):
        side = min(x.shape[:2])
        win = {} if side >= 11 else {"win_size": side if side % 2 else side - 1}
        out.append(structural_similarity((x + 1) / 2, (y + 1) / 2, channel_axis=-1, data_range=1.0,
                                         gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, **win))
    return np.array(out)


def test_psnr_matches_skimage_and_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.8, 0.8, size=(4, 8, 8, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), -1, 1)
    assert float(metrics.psnr(a, b)) == pytest.approx(
        peak_signal_noise_ratio(a, b, data_range=2.0), rel=1e-5)
    assert float(metrics.psnr(a, a)) == float("inf")
    # A constant offset d gives MSE = d^2, so PSNR = 10 log10(range^2 / d^2).
    for d in (0.01, 0.1, 0.2):
        assert float(metrics.psnr(a, a + d)) == pytest.approx(10 * np.log10(4.0 / d**2), rel=1e-5)
    assert float(metrics.psnr(a, a + 0.1, data_range=1.0)) == pytest.approx(20.0, rel=1e-5)
    per = np.asarray(metrics.psnr_per_item(np.stack([a, a, a]), np.stack([a + 0.1, a - 0.2, a])))
    np.testing.assert_allclose(per[:2], [10 * np.log10(400), 10 * np.log10(100)], rtol=1e-5)
    assert per[2] == np.inf
    # uint8 inputs are mapped to [-1, 1]: one grey level of 255 is a step of 2/255.
    u = rng.integers(0, 255, size=(2, 8, 8, 3), dtype=np.uint8)
    assert float(metrics.psnr(u, u + 1)) == pytest.approx(20 * np.log10(255.0), rel=1e-5)
    assert float(metrics.psnr(u, u + 1)) == pytest.approx(peak_signal_noise_ratio(u, u + 1), rel=1e-5)
    with pytest.raises(ValueError):
        metrics.psnr(a, a[:2])


@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 3), (1, 2, 24, 20, 1), (3, 8, 8, 3), (2, 4, 6, 3),
                                   (1, 5, 6, 3)])
def test_ssim_matches_skimage(shape):
    """Frames of 16 and 24 px, and under 11 px (a smaller window) and under 6 px (mirrored
    more than once)."""
    rng = np.random.default_rng(sum(shape))
    a = rng.uniform(-1, 1, shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), -1, 1)
    ref = _skimage_ssim_per_frame(a, b)
    got = np.asarray(jax.jit(metrics.ssim_per_frame)(a.astype(np.float32), b.astype(np.float32)))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert float(metrics.ssim(a, b)) == pytest.approx(ref.mean(), abs=1e-5)
    assert float(metrics.ssim(a, a)) == pytest.approx(1.0, abs=1e-6)


def test_ssim_closed_forms_uint8_and_gradient():
    # Two flat images: both variances are 0, so SSIM is the luminance term alone,
    # (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), on [0, 1] intensities with C1 = (0.01 * 1)^2.
    for v1, v2 in ((0.2, -0.4), (-1.0, 1.0), (0.5, 0.5)):
        m1, m2, c1 = (v1 + 1) / 2, (v2 + 1) / 2, 0.01**2
        expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
        got = metrics.ssim(np.full((2, 12, 12, 3), v1), np.full((2, 12, 12, 3), v2))
        assert float(got) == pytest.approx(expected, rel=1e-5)
    # uint8 and [-1, 1] floats of the same picture agree
    rng = np.random.default_rng(1)
    u = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(u.astype(int) + rng.integers(-20, 21, size=u.shape), 0, 255).astype(np.uint8)
    s = float(metrics.ssim(u, noisy))
    assert 0.0 < s < 1.0
    assert float(metrics.ssim(u / 127.5 - 1, noisy / 127.5 - 1)) == pytest.approx(s, abs=1e-6)
    # differentiable, and the identical pair is a minimum of 1 - SSIM (zero gradient there)
    a = jnp.asarray(rng.uniform(-1, 1, (1, 2, 16, 16, 3)), jnp.float32)
    g = jax.jit(jax.grad(lambda r: 1.0 - metrics.ssim(r, a)))(a)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) < 1e-5
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(a, a[:, :1])


def test_ssim_orders_distortions():
    rng = np.random.default_rng(2)
    base = np.tile(np.linspace(-1, 1, 24)[None, :, None], (24, 1, 3))[None]
    mild = np.clip(base + rng.normal(0, 0.05, base.shape), -1, 1)
    strong = np.clip(base + rng.normal(0, 0.3, base.shape), -1, 1)
    assert 1.0 > float(metrics.ssim(base, mild)) > float(metrics.ssim(base, strong))
    assert float(metrics.ssim(base[0], mild[0])) == pytest.approx(float(metrics.ssim(base, mild)))


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def classifier():
    return digits.get_classifier(seed=0)


@pytest.fixture(scope="module")
def eval_split():
    return digits.load_mnist_split("eval")


def make_clip(digit_image, size, canvas, direction, frames=8, step=2):
    """A (T, canvas, canvas, 3) uint8 clip of a digit resized to size x size px, moving
    `step` px per frame in `direction`, centred on the canvas at the middle frame."""
    patch = np.asarray(Image.fromarray(digit_image).resize((size, size), Image.Resampling.BILINEAR))
    dy, dx = STEPS[direction]
    middle = (canvas - size) // 2
    offsets = step * np.arange(frames) - step * (frames - 1) // 2
    assert middle + offsets.min() >= 0 and middle + offsets.max() + size <= canvas
    clip = np.zeros((frames, canvas, canvas, 3), np.uint8)
    for t, o in enumerate(offsets):
        oy, ox = middle + dy * o, middle + dx * o
        clip[t, oy : oy + size, ox : ox + size] = patch[..., None]
    return clip


def test_parse_caption():
    assert digits.parse_caption("the digit 3 moves right") == [(3, "right")]
    assert digits.parse_caption("The digit 3 moves left and the digit 7 moves up") == [(3, "left"), (7, "up")]
    assert digits.parse_caption("the digit 0 moves down while the digit 9 moves right.") == [(0, "down"), (9, "right")]
    assert digits.parse_caption("the digit 5") == [(5, None)]
    assert digits.parse_caption("a cat") == []


def test_mnist_splits():
    train_x, train_y = digits.load_mnist_split("train")
    eval_x, eval_y = digits.load_mnist_split("eval")
    assert train_x.shape == (4000, 28, 28) and eval_x.shape == (1000, 28, 28)
    assert train_x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train_y), [400] * 10)
    np.testing.assert_array_equal(np.bincount(eval_y), [100] * 10)
    all_x, all_y = digits.load_mnist()
    for c in (0, 9):  # per class: train then eval is the whole class in csv order
        np.testing.assert_array_equal(np.concatenate([train_x[train_y == c], eval_x[eval_y == c]]), all_x[all_y == c])
    with pytest.raises(ValueError):
        digits.load_mnist_split("test")


def test_classifier_accuracy_on_held_out_real_digits(classifier, eval_split):
    images, labels = eval_split
    probs = classifier.predict_proba(images)
    assert probs.shape == (1000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
    assert accuracy >= 0.9, accuracy
    # Float [-1, 1] input of the same digits gives the same predictions.
    subset = images[:50]
    np.testing.assert_array_equal(classifier.predict(subset.astype(np.float32) / 127.5 - 1), classifier.predict(subset))


@pytest.mark.parametrize("size,canvas", [(18, 32), (28, 64)])
def test_classifier_is_size_invariant(classifier, eval_split, size, canvas):
    """First 20 held-out digits of each class, rescaled and pasted off-centre on a larger canvas."""
    images, labels = eval_split
    pick = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])
    rng = np.random.default_rng(size)
    frames = np.zeros((len(pick), canvas, canvas), np.uint8)
    for i, k in enumerate(pick):
        patch = np.asarray(Image.fromarray(images[k]).resize((size, size), Image.Resampling.BILINEAR))
        oy, ox = rng.integers(0, canvas - size + 1, size=2)
        frames[i, oy : oy + size, ox : ox + size] = patch
    accuracy = classifier.score(frames, labels[pick])
    assert accuracy >= 0.9, accuracy


def _recognised_instance(classifier, eval_split, digit):
    """The first held-out instance of `digit` the classifier gets right at native 28x28 size, so
    the clip tests below check invariance to size, canvas and motion, not the 3% of hard digits."""
    images, labels = eval_split
    idx = np.flatnonzero(labels == digit)[:10]
    ok = idx[classifier.predict(images[idx]) == digit]
    assert len(ok), f"none of the first 10 held-out {digit}s is recognised"
    return images[ok[0]]


@pytest.mark.parametrize("size,canvas,step", [(18, 32, 2), (28, 64, 3)])
@pytest.mark.parametrize("direction,digit", [("right", 3), ("left", 7), ("up", 2), ("down", 5)])
def test_moving_real_digit_is_tracked_and_classified(classifier, eval_split, size, canvas, step, direction, digit):
    clip = make_clip(_recognised_instance(classifier, eval_split, digit), size, canvas, direction, step=step)
    assert digits.motion_direction(clip) == direction
    dy, dx = STEPS[direction]
    np.testing.assert_allclose(digits.motion_velocity(clip), [dy * step, dx * step], atol=1e-6)
    result = digits.evaluate_samples([clip], [f"the digit {digit} moves {direction}"], classifier)
    assert result["per_sample"][0]["pred_digit"] == digit
    assert result["digit_accuracy"] == 1.0 and result["direction_accuracy"] == 1.0


def test_tracking_ignores_background_noise_and_float_input(classifier, eval_split):
    clip = make_clip(_recognised_instance(classifier, eval_split, 4), 18, 32, "up", step=2)
    rng = np.random.default_rng(0)
    noisy = clip.astype(np.float32) / 127.5 - 1.0 + rng.uniform(0, 0.15, clip.shape).astype(np.float32)
    assert digits.motion_direction(noisy) == "up"
    assert digits.evaluate_samples([noisy], ["the digit 4 moves up"], classifier)["digit_accuracy"] == 1.0


def test_track_centres_exact_and_empty_frames():
    video = np.zeros((3, 20, 30, 3), np.uint8)
    video[0, 2:6, 3:5] = 255  # centre (3.5, 3.5)
    video[2, 10:13, 20:30] = 200  # centre (11, 24.5)
    centres = digits.track_centres(video)
    np.testing.assert_allclose(centres[0], [3.5, 3.5])
    assert np.isnan(centres[1]).all()
    np.testing.assert_allclose(centres[2], [11.0, 24.5])


def test_no_motion_cases():
    assert digits.motion_direction(np.zeros((8, 32, 32, 3), np.uint8)) == "none"
    assert digits.motion_direction(np.full((8, 32, 32, 3), -1.0, np.float32)) == "none"
    still = np.zeros((6, 32, 32, 3), np.uint8)
    still[:, 10:20, 12:18] = 255
    assert digits.motion_direction(still) == "none"
    assert digits.motion_direction(still[:1]) == "none"
    slow = np.zeros((8, 32, 32, 3), np.uint8)
    for t in range(8):  # one 1-px step halfway: a least-squares speed of 8/42 < 0.25 px/frame
        x = 10 + (t >= 4)
        slow[t, 10:20, x : x + 6] = 255
    np.testing.assert_allclose(digits.motion_velocity(slow), [0.0, 8 / 42])
    assert digits.motion_direction(slow) == "none"
    assert digits.motion_direction(slow, min_speed=0.1) == "right"


def test_evaluate_samples_fractions(classifier, eval_split):
    three = make_clip(_recognised_instance(classifier, eval_split, 3), 18, 32, "right")
    seven = make_clip(_recognised_instance(classifier, eval_split, 7), 18, 32, "down")
    videos = [three, three, seven, seven, three, np.zeros_like(three), seven[:1], three[:1]]
    captions = [
        "the digit 3 moves right",  # both right
        "the digit 8 moves right",  # wrong digit
        "the digit 7 moves up",  # wrong direction
        "the digit 1 moves left",  # both wrong
        "the digit 3 moves right and the digit 7 moves up",  # two digits: skipped
        "the digit 0 moves left",  # nothing drawn: both wrong
        "the digit 7",  # a still image: digit right, no direction to score
        "the digit 9",  # a still image: digit wrong
    ]
    result = digits.evaluate_samples(videos, captions, classifier)
    assert result["num_samples"] == 7 and result["num_skipped"] == 1
    assert result["num_direction_samples"] == 5
    assert result["digit_accuracy"] == pytest.approx(3 / 7)
    assert result["direction_accuracy"] == pytest.approx(2 / 5)
    assert result["joint_accuracy"] == pytest.approx(1 / 5)
    first, last = result["per_sample"][0], result["per_sample"][4]
    assert {"caption", "digit", "pred_digit", "direction", "pred_direction"} <= set(first)
    assert (first["digit"], first["pred_digit"], first["direction"], first["pred_direction"]) == (3, 3, "right", "right")
    assert last["pred_digit"] is None and last["pred_direction"] == "none"
    empty = digits.evaluate_samples([], [], classifier)
    assert empty["num_samples"] == 0 and np.isnan(empty["digit_accuracy"])
    with pytest.raises(ValueError):
        digits.evaluate_samples([three], [], classifier)
