"""Tests for sora_jax.io: pixel conversions, mp4 round trips, contact sheets, JSON."""
import json
import re
import warnings

import av
import numpy as np
import pytest
from PIL import Image

from sora_jax import io


def _smooth_video(t=12, h=32, w=32):
    """A smooth moving colour pattern in [-1, 1]: what a lossy codec should keep well."""
    tt = np.arange(t)[:, None, None]
    yy = np.arange(h)[None, :, None]
    xx = np.arange(w)[None, None, :]
    r = np.sin(0.15 * xx + 0.3 * tt) + 0 * yy
    g = np.cos(0.12 * yy - 0.2 * tt) + 0 * xx
    b = np.sin(0.08 * (xx + yy) + 0.1 * tt)
    return (0.7 * np.stack([r, g, b], axis=-1)).astype(np.float32)


def _psnr_db(a, b):
    mse = np.mean((io.to_float(a).astype(np.float64) - io.to_float(b)) ** 2)
    return 10 * np.log10(4.0 / mse)


def test_pixel_conversions():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 2.0, -3.0], np.float32)
    np.testing.assert_array_equal(io.to_uint8(x), [0, 64, 128, 255, 255, 0])
    u = np.arange(256, dtype=np.uint8)
    f = io.to_float(u)
    assert f.dtype == np.float32 and f[0] == -1.0 and f[-1] == 1.0
    np.testing.assert_array_equal(io.to_uint8(f), u)  # exact inverse on the uint8 grid
    assert io.to_uint8(u) is u
    with pytest.raises(TypeError):
        io.to_uint8(np.arange(3, dtype=np.int32))


def test_mp4_round_trip_even_size(tmp_path):
    video = _smooth_video()
    path = io.write_mp4(tmp_path / "a" / "clip.mp4", video, fps=8)
    back = io.read_video(path)
    assert back.dtype == np.uint8 and back.shape == video.shape
    assert _psnr_db(back, video) > 25.0
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 8
        assert stream.codec_context.name == ("h264" if io.default_codec() == "libx264" else "mpeg4")
    assert io.read_video(path, max_frames=3).shape == (3, 32, 32, 3)


def test_mp4_odd_size_is_padded_and_scale_upsamples(tmp_path):
    video = _smooth_video(t=5, h=33, w=31)
    back = io.read_video(io.write_mp4(tmp_path / "odd.mp4", video))
    assert back.shape == (5, 34, 32, 3)
    assert _psnr_db(back[:, :33, :31], video) > 25.0
    big = io.read_video(io.write_mp4(tmp_path / "big.mp4", io.to_uint8(video[:, :32, :30]), scale=3))
    assert big.shape == (5, 96, 90, 3)
    with pytest.raises(ValueError):
        io.write_mp4(tmp_path / "bad.mp4", video, scale=0)
    with pytest.raises(ValueError):
        io.write_mp4(tmp_path / "bad.mp4", video[..., 0])


def test_mp4_metadata_round_trip(tmp_path):
    meta = {"prompt": "the digit 3 moves right", "seed": 7, "title": "sample 0"}
    path = io.write_mp4(tmp_path / "m.mp4", _smooth_video(t=2), metadata=meta)
    got = io.read_metadata(path)
    assert got["prompt"] == "the digit 3 moves right"
    assert got["seed"] == "7"
    assert got["title"] == "sample 0"


def test_mpeg4_fallback_when_libx264_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "default_codec", lambda: "mpeg4")
    video = _smooth_video(t=4)
    with pytest.warns(RuntimeWarning, match="libx264"):
        path = io.write_mp4(tmp_path / "f.mp4", video)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    assert _psnr_db(io.read_video(path), video) > 25.0


def test_explicit_codec_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        path = io.write_mp4(tmp_path / "e.mp4", _smooth_video(t=2), codec="mpeg4")
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_file_raises_value_error_naming_path(tmp_path, kind):
    bad = tmp_path / f"{kind}.mp4"
    if kind == "garbage":
        bad.write_bytes(b"this is not a video" * 50)
    elif kind == "truncated":
        good = io.write_mp4(tmp_path / "good.mp4", _smooth_video(t=8))
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    else:
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        io.read_video(bad)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read_video(tmp_path / "nope.mp4")


def test_contact_sheet_size_and_content(tmp_path):
    a = io.to_uint8(_smooth_video(t=12, h=16, w=16))
    b = io.to_uint8(_smooth_video(t=3, h=10, w=20))
    pad, label_h, scale = 2, 14, 2
    path = io.write_contact_sheet(tmp_path / "s.png", [a, b], labels=None, max_frames=5, scale=scale)
    img = np.asarray(Image.open(path).convert("RGB"))
    n_cols, cell_w = 5, 20 * scale
    assert img.shape[1] == pad + n_cols * (cell_w + pad)
    assert img.shape[0] == pad + (16 * scale + pad) + (10 * scale + pad)
    # The first cell is frame 0, the fifth the last frame (evenly spaced, ends included).
    up = lambda f: np.repeat(np.repeat(f, scale, 0), scale, 1)  # noqa: E731
    np.testing.assert_array_equal(img[pad : pad + 32, pad : pad + 32], up(a[0]))
    x4 = pad + 4 * (cell_w + pad)
    np.testing.assert_array_equal(img[pad : pad + 32, x4 : x4 + 32], up(a[-1]))

    labelled = io.write_contact_sheet(tmp_path / "l.png", [a, b], labels=["digit 3", "digit 7"], max_frames=5, scale=scale)
    limg = np.asarray(Image.open(labelled).convert("RGB"))
    assert limg.shape == (img.shape[0] + 2 * label_h, img.shape[1], 3)
    band = limg[pad : pad + label_h, pad : pad + 60]
    assert (band < 128).any(), "label text should be drawn in the band above the row"
    with pytest.raises(ValueError):
        io.write_contact_sheet(tmp_path / "x.png", [a], labels=["one", "two"])


def test_write_json_converts_numpy(tmp_path):
    obj = {"b": np.float32(0.5), "a": np.arange(3), "c": {"z": np.int64(2), "y": True}}
    path = io.write_json(tmp_path / "sub" / "o.json", obj)
    text = path.read_text()
    assert json.loads(text) == {"a": [0, 1, 2], "b": 0.5, "c": {"y": True, "z": 2}}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert text.endswith("\n") and "\n  " in text
    assert [p.name for p in path.parent.iterdir()] == ["o.json"]  # no temporary file left
