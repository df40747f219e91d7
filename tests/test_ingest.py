"""Ingestion of users' media: resampling, clipping, resizing, bad input, resume, parallel order."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import ingest as ingest_lib
from data_pipelines.ingest import clip_lengths, ingest, main, read_captions, target_size
from sora_jax.data.records import read_dataset, read_meta
from sora_jax.io import write_mp4

SETTINGS = dict(fps=8.0, clip_seconds=1.5, max_side=32, size_multiple=16, frame_multiple=4)
BAD = {  # path -> reason
    "zero.mp4": "empty_file",
    "random.mp4": "corrupt",
    "trunc.mp4": "corrupt",
    "text.png": "corrupt",
    "gone.mp4": "missing",
    "nocap.jpg": "no_caption",
    "folder.mp4": "unreadable",
    "cut.mkv": "truncated",  # decodes cleanly, but stops at half the declared length
    "cut_faststart.mp4": "decode_error",  # index up front, sample data missing
}


def _moving_square(frames=48, height=48, width=64):
    """Frame i: a white 8x8 square whose left edge is at x = i (1 px per frame)."""
    v = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        v[i, 16:24, i : i + 8] = 255
    return v


def _ramp(frames=72, height=32, width=48):
    """Frame i is uniformly grey at level 10 + 3 i: the level tells which frame was picked."""
    return np.broadcast_to((10 + 3 * np.arange(frames, dtype=np.uint8))[:, None, None, None],
                           (frames, height, width, 3)).copy()


def _write_raw(path, video, fmt, options=None, gop=None):
    """uint8 (T, H, W, 3) at 24 fps with PyAV directly: containers and keyframe spacing that
    write_mp4 does not offer."""
    import av

    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=24)
        s.height, s.width = video.shape[1:3]
        s.pix_fmt = "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
            s.options = {"keyint_min": str(gop), "sc_threshold": "0"}
        for i, frame in enumerate(video):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def _write_noise(path, fmt, frames=96, options=None):
    noise = np.random.default_rng(1).integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8)
    _write_raw(path, noise, fmt, options)


def _cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(fraction * len(data))])


def _level_at(t):
    """Grey level of ``_ramp`` at time t (s) at 24 fps."""
    return 10 + 3 * round(t * 24)


def _jsonl(path, entries, extra_lines=()):
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    d = root / "in"
    write_mp4(d / "move.mp4", _moving_square(), fps=24)  # 2.0 s
    write_mp4(d / "sub" / "ramp.mp4", _ramp(), fps=24)  # 3.0 s
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(d / "still.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "sub" / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "nocap.jpg")
    gif = [Image.fromarray(np.full((32, 48, 3), 20 * i, np.uint8)) for i in range(10)]
    gif[0].save(d / "spin.gif", save_all=True, append_images=gif[1:], duration=125, loop=0)
    (d / "zero.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    good = (d / "move.mp4").read_bytes()
    (d / "trunc.mp4").write_bytes(good[: int(0.3 * len(good))])
    (d / "text.png").write_text("this is not a picture")
    (d / "folder.mp4").mkdir()
    _write_noise(d / "sub" / "noise.mkv", "matroska")  # the uncut original of cut.mkv
    _write_noise(d / "cut.mkv", "matroska")
    _cut(d / "cut.mkv", 0.5)
    _write_noise(d / "cut_faststart.mp4", "mp4", options={"movflags": "faststart"})
    _cut(d / "cut_faststart.mp4", 0.5)
    entries = [
        {"path": "move.mp4", "caption": "a white square moves right"},
        {"path": "sub/ramp.mp4", "caption": "the screen brightens", "start": 0.5, "end": 2.75},
        {"path": "sub/ramp.mp4", "caption": "it keeps brightening", "start": 2.0},
        {"path": "still.png", "caption": "noise"},
        {"path": "spin.gif", "caption": "an animated gif fades in"},
        {"path": "sub/noise.mkv", "caption": "static"},
        {"path": str(d / "sub" / "photo.jpg"), "caption": "a small noisy photo"},  # absolute
        {"path": "move.mp4", "caption": "backwards range", "start": 1.5, "end": 0.5},
    ] + [{"path": p, "caption": f"bad {p}"} for p in BAD if p != "nocap.jpg"]
    captions = _jsonl(root / "captions.jsonl", entries, extra_lines=["{not json"])
    return dict(root=root, input=str(d), captions=captions)


@pytest.fixture(scope="module")
def full(media, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "ds")
    report = ingest(media["input"], out, media["captions"], workers=0, progress=False, **SETTINGS)
    return out, report


def _records(prefix):
    return [dict(r) for r in read_dataset(prefix)]


def _assert_same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_bad_inputs_are_skipped_counted_and_listed(full):
    out, report = full
    assert report["skipped_by_reason"] == {
        "bad_entry": 1, "bad_range": 1, "corrupt": 3, "decode_error": 1, "empty_file": 1,
        "missing": 1, "no_caption": 1, "truncated": 1, "unreadable": 1}
    assert report["skipped"] == 11 == len(report["skipped_files"])
    listed = {(s["path"], s["reason"]) for s in report["skipped_files"]}
    assert {(p, r) for p, r in BAD.items()} <= listed
    assert ("move.mp4", "bad_range") in listed and ("captions.jsonl:17", "bad_entry") in listed
    assert all(s["error"] for s in report["skipped_files"])
    # every input is accounted for: ingested or skipped
    assert report["num_inputs"] == 18 == report["num_entries_ingested"] + report["skipped"]
    with open(out + ".report.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    for key in ("num_clips", "num_frames", "output_prefix", "num_shards", "settings"):
        assert key in report
    assert report["num_clips"] == len(read_dataset(out)) == read_meta(out)["count"]


def test_skips_are_logged(media, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="data_pipelines.ingest"):
        ingest(media["input"], str(tmp_path / "ds"), media["captions"], workers=0,
               progress=False, **SETTINGS)
    for path, reason in BAD.items():
        assert any(path in m and reason in m for m in caplog.messages), path


def test_records_have_valid_shapes_and_fields(full):
    out, report = full
    recs = _records(out)
    assert report["num_images"] == 2 and report["num_videos"] == len(recs) - 2
    for r in recs:
        v = r["video"]
        t, h, w, c = v.shape
        assert v.dtype == np.uint8 and c == 3
        assert (t - 1) % 4 == 0 and h % 16 == 0 and w % 16 == 0 and max(h, w) <= 32
        assert (r["frames"], r["height"], r["width"]) == (t, h, w)
        assert r["fps"] == 8.0 and isinstance(r["caption"], str) and r["caption"]
        if r["kind"] == "image":
            assert t == 1 and r["start_s"] == r["end_s"] == 0.0
        else:
            assert r["kind"] == "video" and t >= 5
            assert r["end_s"] - r["start_s"] == pytest.approx(t / 8.0)
    # 50x70 -> 23x32 -> centre crop 16x32; 40x30 -> 32x24 -> 32x16
    shapes = {r["source"]: r["video"].shape for r in recs if r["kind"] == "image"}
    assert shapes == {"still.png": (1, 16, 32, 3), "sub/photo.jpg": (1, 32, 16, 3)}
    # a GIF is a video too: 10 frames at 8 fps (1.2 s) -> 9
    assert [r["frames"] for r in recs if r["source"] == "spin.gif"] == [9]
    # 4.0 s of mkv at 8 fps = 32 frames in clips of at most 1.5 s: 9 + 9 + 9 + 5
    assert [r["frames"] for r in recs if r["source"] == "sub/noise.mkv"] == [9, 9, 9, 5]
    # sorted by source, then start time
    keys = [(r["source"], r["start_s"]) for r in recs]
    assert keys == sorted(keys)


def test_fps_resampling_picks_the_nearest_frames(media, tmp_path):
    captions = _jsonl(tmp_path / "c.jsonl", [{"path": "move.mp4", "caption": "square"}])
    report = ingest(media["input"], str(tmp_path / "ds"), captions, fps=8.0, clip_seconds=10.0,
                    max_side=64, workers=0, progress=False)
    (r,) = _records(str(tmp_path / "ds"))
    # 2.0 s at 8 fps = 16 frames, trimmed to 1 + 4k = 13
    assert r["video"].shape == (13, 48, 64, 3) and report["num_frames"] == 13
    assert (r["start_s"], r["end_s"]) == (0.0, 13 / 8)
    # output frame k shows source frame 3k (24 -> 8 fps): the square's left edge at x = 3k
    left = [int(np.argmax(f[20, :, 0] > 128)) for f in r["video"]]
    assert np.abs(np.array(left) - 3 * np.arange(13)).max() <= 1


@pytest.mark.parametrize("fps, frames", [(10.0, 9), (40.0, 37)])
def test_fps_resampling_at_other_rates_picks_nearest_timestamps(media, tmp_path, fps, frames):
    # 24 -> 10 fps drops frames unevenly, 24 -> 40 fps repeats some: either way output frame k
    # is the source frame nearest to k / fps (never the first one after it)
    captions = _jsonl(tmp_path / "c.jsonl", [{"path": "sub/ramp.mp4", "caption": "x"}])
    ingest(media["input"], str(tmp_path / "ds"), captions, fps=fps, max_seconds=1.0,
           clip_seconds=4.0, workers=0, progress=False)
    (r,) = _records(str(tmp_path / "ds"))
    assert r["frames"] == frames and r["fps"] == fps
    levels = r["video"].reshape(frames, -1).mean(1)
    np.testing.assert_allclose(levels, [_level_at(k / fps) for k in range(frames)], atol=1.5)


def test_long_ranges_split_into_clips_and_ranges_are_honoured(media, tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("path,caption,start,end\n"
                        "sub/ramp.mp4,\"brightens, slowly\",0.5,2.75\n"
                        "sub/ramp.mp4,tail,2.0,\n"
                        "still.png,noise,,\n")
    report = ingest(media["input"], str(tmp_path / "ds"), str(csv_path), fps=8.0,
                    clip_seconds=1.0, max_side=32, workers=0, progress=False)
    recs = _records(str(tmp_path / "ds"))
    ramp = [r for r in recs if r["source"] == "sub/ramp.mp4"]
    # [0.5, 2.75) = 18 frames; clips of at most 1.0 s = 8 frames -> 5; 5 + 5 + 5, 3 dropped
    first = [r for r in ramp if r["caption"] == "brightens, slowly"]
    assert [r["frames"] for r in first] == [5, 5, 5]
    assert [r["start_s"] for r in first] == [0.5, 1.125, 1.75]
    for a, b in zip(first, first[1:]):
        assert a["end_s"] == b["start_s"]  # consecutive, no gap, no overlap
    tail = [r for r in ramp if r["caption"] == "tail"]
    assert [(r["start_s"], r["frames"]) for r in tail] == [(2.0, 5)]  # 1.0 s left of 3.0
    for r in ramp:
        assert r["end_s"] - r["start_s"] <= 1.0
        levels = r["video"].reshape(r["frames"], -1).mean(1)
        expected = [_level_at(r["start_s"] + k / 8) for k in range(r["frames"])]
        np.testing.assert_allclose(levels, expected, atol=1.5)
    assert report["skipped_by_reason"].keys() >= {"no_caption"}
    assert [r["kind"] for r in recs if r["source"] == "still.png"] == ["image"]


def test_ranges_after_seeking_to_a_keyframe(tmp_path):
    # keyframes every 6 frames (0.25 s): a start inside a GOP seeks to the keyframe before it
    d = tmp_path / "in"
    d.mkdir()
    _write_raw(d / "gop.mp4", _ramp(), "mp4", gop=6)
    starts = [0.3, 1.1, 2.2]
    captions = _jsonl(tmp_path / "c.jsonl", [{"path": "gop.mp4", "caption": f"from {t}",
                                              "start": t, "end": t + 0.6} for t in starts])
    ingest(str(d), str(tmp_path / "ds"), captions, fps=8.0, workers=0, progress=False)
    recs = _records(str(tmp_path / "ds"))
    assert [(r["start_s"], r["frames"]) for r in recs] == [(t, 5) for t in starts]
    for r in recs:
        levels = r["video"].reshape(5, -1).mean(1)
        np.testing.assert_allclose(levels, [_level_at(r["start_s"] + k / 8) for k in range(5)],
                                   atol=1.5)


def test_max_seconds_caps_each_entry(media, tmp_path):
    captions = _jsonl(tmp_path / "c.jsonl", [{"path": "sub/ramp.mp4", "caption": "x"}])
    ingest(media["input"], str(tmp_path / "ds"), captions, fps=8.0, max_seconds=1.25,
           clip_seconds=4.0, workers=0, progress=False)
    (r,) = _records(str(tmp_path / "ds"))
    assert r["frames"] == 9 and r["end_s"] <= 1.25  # 10 frames in 1.25 s -> 9


def test_resume_reuses_parts_and_gives_identical_output(media, tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    first = ingest(media["input"], out, media["captions"], workers=0, progress=False, **SETTINGS)
    assert first["units_processed"] == first["units"] and first["units_reused"] == 0
    before = _records(out)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a finished unit was decoded again")

    with monkeypatch.context() as m:
        m.setattr(ingest_lib, "_process", no_decoding)
        again = ingest(media["input"], out, media["captions"], workers=0, progress=False,
                       **SETTINGS)
    assert again["units_processed"] == 0 and again["units_reused"] == first["units"]
    _assert_same_records(before, _records(out))
    assert again["skipped_by_reason"] == first["skipped_by_reason"]

    # an interrupted run: one unit's done marker is missing, only that unit is redone
    parts = sorted(p for p in os.listdir(out + ".parts") if p.endswith(".json"))
    os.remove(os.path.join(out + ".parts", parts[0]))
    partial = ingest(media["input"], out, media["captions"], workers=0, progress=False,
                     **SETTINGS)
    assert partial["units_processed"] == 1
    _assert_same_records(before, _records(out))

    # other settings: nothing is reused
    changed = ingest(media["input"], out, media["captions"], workers=0, progress=False,
                     **dict(SETTINGS, fps=4.0))
    assert changed["units_reused"] == 0 and changed["units_processed"] == first["units"]


def test_workers_give_the_same_output_as_in_process(media, full, tmp_path):
    out, report = full
    par = ingest(media["input"], str(tmp_path / "ds"), media["captions"], workers=2,
                 progress=False, **SETTINGS)
    _assert_same_records(_records(out), _records(str(tmp_path / "ds")))
    assert par["skipped_files"] == report["skipped_files"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_permission_denied_is_skipped(media, tmp_path):
    d = tmp_path / "in"
    write_mp4(d / "locked.mp4", _moving_square(frames=12), fps=24)
    os.chmod(d / "locked.mp4", 0)
    captions = _jsonl(tmp_path / "c.jsonl", [{"path": "locked.mp4", "caption": "x"}])
    try:
        report = ingest(str(d), str(tmp_path / "ds"), captions, workers=0, progress=False)
    finally:
        os.chmod(d / "locked.mp4", 0o644)
    assert report["skipped_by_reason"] == {"unreadable": 1} and report["num_clips"] == 0


def test_main_prints_summary_and_report_path(media, tmp_path, capsys):
    out = str(tmp_path / "ds")
    code = main(["--input", media["input"], "--captions", media["captions"], "--output", out,
                 "--max-side", "32", "--clip-seconds", "1.5", "--workers", "0", "--no-progress"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("ingested ") and "skipped 11" in lines[0]
    assert lines[1] == f"report: {out}.report.json"
    code = main(["--input", str(tmp_path / "nope"), "--output", out])
    assert code == 2 and "input folder not found" in capsys.readouterr().err


def test_read_captions_reports_bad_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"path": "a.mp4", "caption": "ok", "start": "1.5"}\n\n'
                 '{"path": "b.mp4", "caption": "  "}\n[1, 2]\n'
                 '{"path": "c.mp4", "caption": "t", "end": "soon"}\n')
    entries, bad = read_captions(str(p))
    assert [(e["path"], e["start"], e["line"]) for e in entries] == [("a.mp4", 1.5, 1), ("c.mp4", None, 5)]
    assert "range_error" in entries[1]
    assert [(b["line"], b["reason"]) for b in bad] == [(3, "bad_entry"), (4, "bad_entry")]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("file,text\nx,y\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        read_captions(str(csv_path))


def test_clip_lengths_and_target_size():
    assert clip_lengths(16, 13, 4) == [13]
    assert clip_lengths(36, 29, 4) == [29, 5]
    assert clip_lengths(18, 5, 4) == [5, 5, 5]
    assert clip_lengths(4, 13, 4) == []  # too short for one clip
    assert clip_lengths(20, 12, 4) == [9, 9]  # the longest clip is rounded to 1 + 4k
    assert target_size(720, 1280, 256, 16) == ((144, 256), (144, 256))
    assert target_size(50, 70, 32, 16) == ((23, 32), (16, 32))
    assert target_size(40, 30, None, 16) == ((40, 30), (32, 16))
    with pytest.raises(ingest_lib._Skip, match="size multiple"):
        target_size(600, 20, 64, 16)  # 600x20 -> 64x2
