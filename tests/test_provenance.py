"""Tests for sora_jax.provenance and the single-image helpers of sora_jax.io."""
import datetime
import json

import numpy as np
import pytest
from PIL import Image

import sora_jax
from sora_jax import io
from sora_jax.inference import provenance


def _record(**extra):
    fields = dict(
        mode="t2v",
        prompt="3 right",
        extended_prompt="the digit 3 moves right",
        seed=np.int64(7),
        sampler="euler",
        steps=20,
        guidance=4.5,
        checkpoint_sha256="ab" * 32,
        inputs=[{"path": "in.png", "sha256": "cd" * 32}],
        prompt_unicode="caf\u00e9 \u2192 \u2603",  # extra keys are kept
    )
    fields.update(extra)
    return provenance.provenance_record(**fields)


def test_record_fills_and_validates():
    rec = _record()
    assert set(provenance.PROVENANCE_KEYS) <= set(rec)
    assert rec["seed"] == 7 and type(rec["seed"]) is int  # numpy scalar made plain JSON
    assert rec["sora_jax_version"] == sora_jax.__version__
    created = datetime.datetime.fromisoformat(rec["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert _record(created="2020-01-01T00:00:00+00:00")["created"] == "2020-01-01T00:00:00+00:00"
    json.dumps(rec)
    with pytest.raises(ValueError, match=r"\['sampler', 'steps'\]"):
        provenance.provenance_record(**{k: v for k, v in rec.items() if k not in ("sampler", "steps")})
    with pytest.raises(TypeError):
        _record(model=object())


def test_png_round_trip(tmp_path):
    rec = _record(frames=1, height=8, width=6)
    image = np.random.default_rng(0).integers(0, 256, (1, 8, 6, 3), dtype=np.uint8)
    out = provenance.write_outputs(tmp_path / "s" / "sample.v1", image, rec, scale=2)
    assert out == {"media": str(tmp_path / "s" / "sample.v1.png"),
                   "sidecar": str(tmp_path / "s" / "sample.v1.json")}
    assert provenance.read_provenance(out["media"]) == rec
    assert provenance.read_provenance(out["sidecar"]) == rec
    assert json.loads((tmp_path / "s" / "sample.v1.json").read_text()) == rec
    chunks = io.read_png_text(out["media"])
    assert chunks["prompt"] == "3 right" and chunks["seed"] == "7" and chunks["guidance"] == "4.5"
    assert json.loads(chunks["inputs"]) == rec["inputs"]
    pixels = io.read_image(out["media"])
    np.testing.assert_array_equal(pixels, np.repeat(np.repeat(image[0], 2, 0), 2, 1))


def test_mp4_round_trip(tmp_path):
    rec = _record(frames=5, conditioned_frames_psnr=float("inf"))
    video = np.zeros((5, 16, 16, 3), np.uint8)
    out = provenance.write_outputs(tmp_path / "clip", video, rec, fps=8)
    assert out["media"].endswith("clip.mp4") and out["sidecar"].endswith("clip.json")
    assert provenance.read_provenance(out["media"]) == rec
    assert provenance.read_provenance(out["sidecar"]) == rec
    tags = io.read_metadata(out["media"])
    assert tags["extended_prompt"] == "the digit 3 moves right"
    assert tags["prompt_unicode"] == "caf\u00e9 \u2192 \u2603"
    assert io.read_video(out["media"]).shape == (5, 16, 16, 3)


def test_read_provenance_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        provenance.read_provenance(tmp_path / "none.png")
    with pytest.raises(ValueError, match="expected .png"):
        provenance.read_provenance(tmp_path / "x.gif")


def test_image_io_errors_and_conversion(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="bad.png"):
        io.read_image(tmp_path / "bad.png")
    Image.fromarray(np.full((3, 4), 200, np.uint8)).save(tmp_path / "gray.png")
    rgb = io.read_image(tmp_path / "gray.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and (rgb == 200).all()
    assert io.read_png_text(io.write_png(tmp_path / "plain.png", np.zeros((2, 2, 3)))) == {}
    with pytest.raises(ValueError, match="shape"):
        io.write_png(tmp_path / "two.png", np.zeros((2, 2, 2, 3), np.uint8))
