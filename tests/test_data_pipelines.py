"""Offline real-data builders: records, Grain reading, Moving MNIST, real crops, the builder."""
import os

import numpy as np
import pytest

from sora_jax.data import bundled as build, moving_mnist, real_clips, records, sources
from sora_jax.data.moving_mnist import DIRECTIONS, HELDOUT_COMBOS

SIZES = [(32, 32), (32, 48), (48, 32)]
TINY_BUILD = dict(mnist_train=24, mnist_eval=12, heldout_prompts=10, clips_train=10, clips_eval=6,
                  sizes=SIZES, durations=(1, 5, 9), clip_sizes=[(32, 32), (32, 48)],
                  clip_durations=(1, 9), digit_size=16, two_digit_prob=0.3, speed_range=(1, 3),
                  mnist_fps=8.0, photo_fraction=0.2, clip_scale_range=(2.0, 8.0), num_shards=1,
                  progress=False)


# ----------------------------------------------------------------------------- records

def test_record_round_trip():
    example = {
        "video": np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3),
        "zeros": np.zeros((9, 32, 32, 3), np.uint8),  # compressible, exercises the zlib path
        "positions": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 2, 2),
        "big_endian": np.arange(5, dtype=">i4"),
        "scalar": np.float32(2.5),
        "names": np.array(["ab", "c"]),
        "flags": np.array([True, False]),
        "caption": "the digit 3 moves right",
        "fps": 8.0, "index": -7, "ok": True, "raw": b"\x00\x01", "none": None,
    }
    for compress in (False, True):
        out = records.decode_record(records.encode_record(example, compress=compress))
        assert set(out) == set(example)
        for key, value in example.items():
            if isinstance(value, (np.ndarray, np.generic)):
                assert isinstance(out[key], np.ndarray)
                assert out[key].dtype == np.asarray(value).dtype
                np.testing.assert_array_equal(out[key], value)
            else:
                assert type(out[key]) is type(value) and out[key] == value
        out["video"][0, 0, 0, 0] = 1  # decoded arrays are writable
    assert len(records.encode_record(example, True)) < len(records.encode_record(example)) / 5


def test_record_errors():
    with pytest.raises(TypeError):
        records.encode_record({"x": [1, 2]})
    with pytest.raises(TypeError):
        records.encode_record({"x": np.array([object()])})
    with pytest.raises(ValueError):
        records.encode_record({"__x": 1})
    with pytest.raises(ValueError):
        records.decode_record(b"not a record")


def test_write_read_grain(tmp_path):
    examples = [{"video": np.full((1 + 4 * (i % 2), 3, 5, 3), i, np.uint8),
                 "caption": f"clip {i}", "index": i} for i in range(7)]
    prefix = str(tmp_path / "ds")
    paths = records.write_array_record(prefix, iter(examples), num_shards=3,
                                       metadata={"seed": 5})
    assert [os.path.basename(p) for p in paths] == [
        f"ds-0000{i}-of-00003.array_record" for i in range(3)]
    meta = records.read_meta(prefix)
    assert meta["count"] == 7 and meta["shard_counts"] == [3, 2, 2]
    assert meta["metadata"] == {"seed": 5}
    ds = records.read_dataset(prefix)
    assert len(ds) == 7
    for i, got in enumerate(ds):  # Grain order equals write order despite round-robin shards
        assert got["caption"] == examples[i]["caption"] and got["index"] == i
        np.testing.assert_array_equal(got["video"], examples[i]["video"])
    assert ds[-1]["index"] == 6
    # Rewriting with fewer shards removes the stale ones.
    records.write_array_record(prefix, examples[:2], num_shards=1)
    assert sorted(os.listdir(tmp_path)) == ["ds-00000-of-00001.array_record", "ds.meta.json"]
    assert [r["index"] for r in records.read_dataset(prefix)] == [0, 1]


def test_read_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        records.read_dataset(str(tmp_path / "absent"))
    prefix = str(tmp_path / "ds")
    paths = records.write_array_record(prefix, [{"a": 1}] * 4, num_shards=2)
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        records.read_dataset(prefix)


# ----------------------------------------------------------------------------- bundled sources

def test_mnist_source():
    images, labels = sources.load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images > 0).mean() > 0.1  # real strokes, not blank


def test_bundled_video_decode():
    for name, (frames, height, width) in sources.VIDEOS.items():
        info = sources.video_info(name)
        assert (info["frames"], info["height"], info["width"]) == (frames, height, width)
        first = sources.load_video(name, max_frames=2)
        assert first.shape == (2, height, width, 3) and first.dtype == np.uint8
        assert first.std() > 5  # real picture content
    assert sources.video_info("bikes")["fps"] == 25.0
    full = sources.load_video("carphone_pristine")  # the small one: full decode is cheap
    assert full.shape == (120, 144, 176, 3)
    np.testing.assert_array_equal(sources.load_video("carphone_pristine", max_frames=2),
                                  full[:2])
    with pytest.raises(KeyError):
        sources.load_video("no_such_clip")


def test_photos():
    photos = sources.load_photos()
    assert set(photos) == set(sources.PHOTOS)
    for name, photo in photos.items():
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8, name
        assert min(photo.shape[:2]) >= 144, name


# ----------------------------------------------------------------------------- Moving MNIST

def test_heldout_rule():
    assert len(HELDOUT_COMBOS) == 10
    assert sorted(d for d, _ in HELDOUT_COMBOS) == list(range(10))  # one per digit
    assert {direction for _, direction in HELDOUT_COMBOS} == set(DIRECTIONS)
    assert moving_mnist.is_heldout(4, "left") and moving_mnist.is_heldout(4, 0)
    assert not moving_mnist.is_heldout(4, "right")


def test_caption_round_trip():
    for digit in range(10):
        for k, direction in enumerate(DIRECTIONS):
            caption = moving_mnist.caption_for([digit], [k])
            assert caption == f"the digit {digit} moves {direction}"
            assert moving_mnist.parse_caption(caption) == [(digit, direction)]
    two = moving_mnist.caption_for([3, 7], ["left", "up"])
    assert two == "the digit 3 moves left and the digit 7 moves up"
    assert moving_mnist.parse_caption(two) == [(3, "left"), (7, "up")]
    assert moving_mnist.parse_caption("The digit 3 moves right  while the digit 7 moves up.") == [
        (3, "right"), (7, "up")]
    image = moving_mnist.caption_for([2, 5], [-1, None])
    assert image == "the digit 2 and the digit 5"
    assert moving_mnist.parse_caption(image) == [(2, None), (5, None)]
    for bad in ("a dog runs", "the digit 12 moves left", "the digit 3 moves sideways"):
        with pytest.raises(ValueError):
            moving_mnist.parse_caption(bad)


def test_split_instances_disjoint():
    _, labels = sources.load_mnist()
    train, evals = moving_mnist.split_instances("train"), moving_mnist.split_instances("eval")
    for d in range(10):
        assert len(train[d]) == 400 and len(evals[d]) == 100
        assert (labels[train[d]] == d).all() and (labels[evals[d]] == d).all()
        assert not set(train[d]) & set(evals[d])
        assert train[d].max() < evals[d].min()  # first 400 in csv order within the class


def _mm(split, n, **kw):
    args = dict(sizes=SIZES, durations=[1, 5, 9, 17], digit_size=16, seed=3)
    args.update(kw)
    return list(moving_mnist.generate_moving_mnist(split, n, **args))


def test_moving_mnist_splits_and_heldout():
    _, labels = sources.load_mnist()
    train, evals = _mm("train", 300), _mm("eval", 150)
    train_rows = {int(r) for e in train for r in e["mnist_index"]}
    eval_rows = {int(r) for e in evals for r in e["mnist_index"]}
    assert train_rows and eval_rows and not train_rows & eval_rows
    for e in train + evals:
        np.testing.assert_array_equal(labels[e["mnist_index"]], e["digits"])
        parsed = moving_mnist.parse_caption(e["caption"])
        assert [d for d, _ in parsed] == e["digits"].tolist()
        assert [DIRECTIONS.index(k) if k else -1 for _, k in parsed] == e["directions"].tolist()
    train_combos = {c for e in train for c in moving_mnist.parse_caption(e["caption"])}
    assert not train_combos & HELDOUT_COMBOS
    assert len({c for c in train_combos if c[1]}) == 30  # every allowed combo does occur
    eval_combos = {c for e in evals for c in moving_mnist.parse_caption(e["caption"])}
    assert eval_combos & HELDOUT_COMBOS  # plain eval has all combos
    held = _mm("eval", 40, durations=[9], two_digit_prob=0.0, heldout_only=True)
    for e in held:
        (combo,) = moving_mnist.parse_caption(e["caption"])
        assert combo in HELDOUT_COMBOS
    with pytest.raises(ValueError):
        _mm("train", 1, heldout_only=True)


def test_moving_mnist_shapes_and_durations():
    examples = _mm("train", 120, image_fraction=0.1)
    assert {e["video"].shape[1:3] for e in examples} == set(SIZES)
    assert {e["video"].shape[0] for e in examples} == {1, 5, 9, 17}
    for e in examples:
        t, h, w, c = e["video"].shape
        assert moving_mnist.valid_duration(t) and c == 3 and e["video"].dtype == np.uint8
        assert (e["video"][..., 0] == e["video"][..., 2]).all()  # gray replicated to RGB
        n = len(e["digits"])
        assert e["positions"].shape == (t, n, 2) and e["positions"].dtype == np.float32
        assert e["source"] == "moving_mnist" and e["split"] == "train" and e["fps"] == 8.0
    with pytest.raises(ValueError):
        _mm("train", 1, durations=[4])


def test_moving_mnist_determinism():
    a = _mm("train", 12)
    b = list(moving_mnist.generate_moving_mnist(
        "train", 4, sizes=SIZES, durations=[1, 5, 9, 17], digit_size=16, seed=3, start_index=8))
    for x, y in zip(a[8:], b):  # an example depends only on (seed, index)
        assert records.encode_record(x) == records.encode_record(y)
    c = _mm("train", 12, seed=4)
    assert sum(records.encode_record(x) != records.encode_record(y) for x, y in zip(a, c)) >= 10


def _centre_of_mass(frame):
    gray = frame[..., 0].astype(np.float64)
    ys, xs = np.indices(gray.shape)
    return np.array([(gray * ys).sum(), (gray * xs).sum()]) / gray.sum()


def test_moving_mnist_motion_matches_caption():
    unit = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    examples = _mm("eval", 60, durations=[5, 9, 17], two_digit_prob=0.0, speed_range=(1, 2))
    assert {e["video"].shape[0] for e in examples} == {5, 9, 17}
    for e in examples:
        (digit, direction), = moving_mnist.parse_caption(e["caption"])
        step = np.array(unit[direction], dtype=np.float64) * int(e["speeds"][0])
        assert e["bounces"].tolist() == [0]  # these canvases always fit the travel
        track = e["positions"][:, 0].astype(np.float64)
        # The recorded centre moves exactly `speed` pixels per frame in the captioned direction.
        np.testing.assert_allclose(np.diff(track, axis=0), np.broadcast_to(step, (len(track) - 1, 2)))
        # The ink itself moves the same way: a pure translation, nothing clipped at the walls.
        com = np.stack([_centre_of_mass(f) for f in e["video"]])
        np.testing.assert_allclose(com - com[0], track - track[0], atol=1e-6)
        assert np.dot(com[-1] - com[0], step) > 0


def test_moving_mnist_bounce_when_canvas_too_small():
    (e,) = _mm("train", 1, sizes=[(32, 32)], durations=[17], digit_size=28,
               two_digit_prob=0.0, speed_range=(1, 1))
    assert e["bounces"][0] >= 1
    axis_track = e["positions"][:, 0]
    assert axis_track.min() >= 13.5 and axis_track.max() <= 17.5  # stays on the 32x32 canvas


# ----------------------------------------------------------------------------- real clips

def test_heldout_sources_refused_for_training():
    with pytest.raises(ValueError, match="held out"):
        next(real_clips.generate_video_crops([real_clips.HELDOUT_VIDEO], 1, split="train"))
    with pytest.raises(ValueError, match="held out"):
        next(real_clips.generate_photo_crops(["astronaut", "coffee"], 1, split="train"))
    assert real_clips.HELDOUT_VIDEO not in real_clips.TRAIN_VIDEOS
    assert not set(real_clips.HELDOUT_PHOTOS) & set(real_clips.TRAIN_PHOTOS)


def test_video_crops():
    crops = list(real_clips.generate_video_crops(
        [real_clips.HELDOUT_VIDEO], 12, crop_size=[(32, 32), (48, 32)], durations=[1, 5, 9],
        scale_range=(1.0, 3.0), split="eval", seed=1))
    video = sources.load_video(real_clips.HELDOUT_VIDEO)
    for c in crops:
        t, h, w, _ = c["video"].shape
        assert t in (1, 5, 9) and (h, w) in ((32, 32), (48, 32)) and c["video"].dtype == np.uint8
        assert c["source"] == "carphone_pristine" and c["split"] == "eval"
        assert c["caption"] == ("a clip from carphone" if t > 1 else "a frame from carphone")
        assert abs(c["fps"] - 30000 / 1001) < 1e-9
        y0, x0, wh, ww = c["crop_box"].tolist()
        assert y0 + wh <= 144 and x0 + ww <= 176 and 1.0 <= c["scale"] <= 3.0
    exact = list(real_clips.generate_video_crops(
        [real_clips.HELDOUT_VIDEO], 3, crop_size=(16, 24), durations=[5], scale_range=(1, 1),
        frame_stride=2, split="eval", seed=2))
    for c in exact:  # scale 1 is a pure pixel crop of the decoded frames
        y0, x0, _, _ = c["crop_box"].tolist()
        f0 = c["frame_start"]
        np.testing.assert_array_equal(c["video"], video[f0:f0 + 9:2, y0:y0 + 16, x0:x0 + 24])
        assert abs(c["fps"] - 30000 / 1001 / 2) < 1e-9
    again = list(real_clips.generate_video_crops(
        [real_clips.HELDOUT_VIDEO], 12, crop_size=[(32, 32), (48, 32)], durations=[1, 5, 9],
        scale_range=(1.0, 3.0), split="eval", seed=1))
    assert all(np.array_equal(a["video"], b["video"]) for a, b in zip(crops, again))
    with pytest.raises(ValueError):  # 200 frames do not fit a 1 s window of a 25 fps clip
        next(real_clips.generate_video_crops(["bikes"], 1, durations=[41], frame_range=(0, 1)))


def test_photo_crops():
    crops = list(real_clips.generate_photo_crops(
        list(real_clips.HELDOUT_PHOTOS), 6, crop_size=(32, 48), scale_range=(2, 6),
        split="eval", seed=0))
    for c in crops:
        assert c["video"].shape == (1, 32, 48, 3) and c["video"].dtype == np.uint8
        assert c["source"] in real_clips.HELDOUT_PHOTOS
        assert c["caption"] == f"a photo of {c['source']}"


# ----------------------------------------------------------------------------- builder

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    out = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        out[tag] = build.build_datasets(str(root / tag), seed=seed, **TINY_BUILD)
    return root, out


def _shard_bytes(prefix):
    meta = records.read_meta(prefix)
    folder = os.path.dirname(prefix)
    return b"".join(open(os.path.join(folder, s), "rb").read() for s in meta["shards"])


def test_build_deterministic(built):
    _, out = built
    assert set(out["a"]) == set(build.DATASETS)
    for name in build.DATASETS:
        assert _shard_bytes(out["a"][name]) == _shard_bytes(out["b"][name]), name
        assert _shard_bytes(out["a"][name]) != _shard_bytes(out["c"][name]), name


def test_build_idempotent(built):
    root, out = built
    shard = os.path.join(root / "a", records.read_meta(out["a"]["moving_mnist_train"])["shards"][0])
    before = os.stat(shard).st_mtime_ns
    assert build.build_datasets(str(root / "a"), seed=0, **TINY_BUILD) == out["a"]
    assert os.stat(shard).st_mtime_ns == before  # nothing rewritten
    manifest = build.load_manifest(str(root / "a"))
    assert manifest["args"]["seed"] == 0 and manifest["datasets"] == out["a"]
    assert manifest["stats"]["moving_mnist_train"]["count"] == TINY_BUILD["mnist_train"]


def test_build_contents(built):
    _, out = built
    ds = {name: list(records.read_dataset(prefix)) for name, prefix in out["a"].items()}
    counts = {k: TINY_BUILD[k] for k in
              ("mnist_train", "mnist_eval", "heldout_prompts", "clips_train", "clips_eval")}
    assert [len(ds[n]) for n in build.DATASETS] == list(counts.values())
    train_rows = {int(r) for e in ds["moving_mnist_train"] for r in e["mnist_index"]}
    for name in ("moving_mnist_eval", "moving_mnist_heldout_prompts"):
        assert not train_rows & {int(r) for e in ds[name] for r in e["mnist_index"]}
    for e in ds["moving_mnist_train"]:
        assert not set(moving_mnist.parse_caption(e["caption"])) & HELDOUT_COMBOS
    for e in ds["moving_mnist_heldout_prompts"]:
        assert e["video"].shape[0] > 1 and len(e["digits"]) == 1
        assert set(moving_mnist.parse_caption(e["caption"])) <= HELDOUT_COMBOS
    held = {real_clips.HELDOUT_VIDEO, *real_clips.HELDOUT_PHOTOS}
    assert not {e["source"] for e in ds["real_clips_train"]} & held
    assert {e["source"] for e in ds["real_clips_eval"]} <= held
    assert {e["source"] for e in ds["real_clips_eval"]} & set(real_clips.HELDOUT_PHOTOS)
    for name, examples in ds.items():
        mnist = name.startswith("moving_mnist")
        sizes = TINY_BUILD["sizes"] if mnist else TINY_BUILD["clip_sizes"]
        durations = TINY_BUILD["durations"] if mnist else TINY_BUILD["clip_durations"]
        for e in examples:
            t, h, w, c = e["video"].shape
            assert t in durations and (h, w) in sizes and c == 3, name
            assert isinstance(e["caption"], str) and isinstance(e["fps"], float), name
