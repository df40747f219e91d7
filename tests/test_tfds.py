"""TFDS support: ``tfds:`` specs, the ``moving_mnist_captioned`` builder (no TensorFlow), and
latent encoding straight from a TFDS dataset."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
# tensorflow-metadata's protos call protobuf's deprecated FieldDescriptor.label (protobuf 6).
pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")

from data_pipelines import tfds_moving_mnist  # noqa: E402  (registers moving_mnist_captioned)
from data_pipelines.encode import encode  # noqa: E402
from sora_jax.data import tfds as tfds_lib  # noqa: E402
from sora_jax.data.moving_mnist import generate_moving_mnist  # noqa: E402

NAME = "moving_mnist_captioned"
# Seed 2 gives both durations (T = 1 and 5) and both digit counts in each split, so the dynamic
# (T, H, W, 3) and (T, n, 2) tensors really vary.
GEN = dict(sizes=((32, 32),), durations=(1, 5), digit_size=16, seed=2)
COUNTS = dict(train=6, eval=3)
CLI = ["--train", "6", "--eval", "3", "--sizes", "32x32", "--durations", "1,5",
       "--digit-size", "16", "--seed", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir with a tiny moving_mnist_captioned, built through the CLI."""
    dd = str(tmp_path_factory.mktemp("tfds"))
    assert tfds_moving_mnist.main(["--data-dir", dd] + CLI) == 0
    return dd


def _assert_same_record(got: dict, want: dict):
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, key
            np.testing.assert_array_equal(g, w, err_msg=key)
        else:
            assert type(g) is type(w) and g == w, key


@pytest.mark.parametrize("split", ["train", "eval"])
def test_records_are_the_generator_examples(data_dir, split):
    ds = tfds_lib.read_tfds(f"tfds:{NAME}:{split}", data_dir=data_dir)
    got = [ds[i] for i in range(len(ds))]
    want = list(generate_moving_mnist(split, COUNTS[split], **GEN))
    assert len(got) == len(want) == COUNTS[split]
    # TFDS reorders examples when writing: compare as multisets, keyed by the unique index.
    assert sorted(r["index"] for r in got) == [w["index"] for w in want]
    by_index = {r["index"]: r for r in got}
    for w in want:
        r = by_index[w["index"]]
        assert r["video"].dtype == np.uint8 and r["video"].ndim == 4 and r["video"].shape[-1] == 3
        assert isinstance(r["caption"], str) and r["caption"] == w["caption"]
        _assert_same_record(r, w)  # every field, video bit-equal
    assert {w["video"].shape[0] for w in want} == {1, 5}
    assert {len(w["digits"]) for w in want} == {1, 2}
    # open_records dispatches tfds: specs to read_tfds
    assert len(tfds_lib.open_records(f"tfds:{NAME}:{split}", data_dir=data_dir)) == len(want)


def test_builder_records_settings_and_cli_refuses_other_settings(data_dir, capsys):
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAME, data_dir=data_dir)
    assert builder.info.metadata["settings"]["num_train"] == 6
    assert builder.info.metadata["settings"]["sizes"] == [[32, 32]]
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == COUNTS
    assert tfds_moving_mnist.main(["--data-dir", data_dir] + CLI) == 0  # same settings: no-op
    assert "already prepared" in capsys.readouterr().out
    assert tfds_moving_mnist.main(["--data-dir", data_dir] + CLI + ["--seed", "5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_parse_tfds_spec():
    p = tfds_lib.parse_tfds_spec
    assert p(f"tfds:{NAME}") == (NAME, "train")
    assert p(f"tfds:{NAME}:eval") == (NAME, "eval")
    assert p(f"tfds:{NAME}:1.0.0") == (f"{NAME}:1.0.0", "train")
    assert p(f"tfds:{NAME}:1.0.0:eval") == (f"{NAME}:1.0.0", "eval")
    assert p("tfds:some_ds/cfg-1:test[:10%]") == ("some_ds/cfg-1", "test[:10%]")
    assert p("tfds:mnist:3.*.*:train[2:]+test") == ("mnist:3.*.*", "train[2:]+test")
    for bad in [NAME, "tfds:", "tfds:Moving-MNIST", f"tfds:{NAME}:", f"tfds:{NAME}:train:x",
                f"tfds:{NAME}:1.0:train", f"tfds:{NAME}: train", f"tfds:{NAME}:train[:2"]:
        with pytest.raises(ValueError, match=r"tfds:NAME\[/CONFIG\]\[:VERSION\]\[:SPLIT\]"):
            p(bad)
    assert tfds_lib.is_tfds_spec(f"tfds:{NAME}") and tfds_lib.is_tfds_spec("tfds:")
    assert not tfds_lib.is_tfds_spec("/data/clips") and not tfds_lib.is_tfds_spec(None)


def test_versions_slices_and_clear_errors(data_dir, tmp_path):
    read = tfds_lib.read_tfds
    assert len(read(f"tfds:{NAME}:1.0.0:eval", data_dir=data_dir)) == 3
    assert len(read(f"tfds:{NAME}:train[:2]", data_dir=data_dir)) == 2
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*not found"):
        read("tfds:no_such_dataset", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="not found"):
        read(f"tfds:{NAME}:9.9.9:train", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="not prepared"):  # registered, not built here
        read(f"tfds:{NAME}", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no split 'test'"):
        read(f"tfds:{NAME}:test", data_dir=data_dir)
    with pytest.raises(FileNotFoundError):
        tfds_lib.open_records(str(tmp_path / "no_records"))


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'sora-jax\[tfds\]'"):
        tfds_lib.read_tfds(f"tfds:{NAME}", data_dir="/nonexistent")


def test_fingerprint(data_dir, monkeypatch):
    fp = tfds_lib.tfds_fingerprint(f"tfds:{NAME}:train", data_dir=data_dir)
    assert (fp["kind"], fp["name"], fp["version"], fp["split"], fp["count"]) == (
        "tfds", NAME, "1.0.0", "train", 6)
    assert len(fp["info_sha256"]) == 64
    assert [f[0] for f in fp["files"]] == [f"{NAME}-train.array_record-00000-of-00001"]
    assert fp["files"][0][1] == os.path.getsize(
        os.path.join(data_dir, NAME, "1.0.0", fp["files"][0][0]))
    assert tfds_lib.tfds_fingerprint(f"tfds:{NAME}:train", data_dir=data_dir) == fp  # stable
    ev = tfds_lib.tfds_fingerprint(f"tfds:{NAME}:eval", data_dir=data_dir)
    assert ev["count"] == 3 and ev["files"] != fp["files"]
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # read at call time, not at tfds import
    assert tfds_lib.tfds_data_dir() == data_dir
    assert tfds_lib.records_fingerprint(f"tfds:{NAME}:train") == fp


def test_encode_reads_tfds_and_reuses_its_output(data_dir, vae_run, tmp_path, monkeypatch):
    from sora_jax.data.encoded import read_encoded

    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    wd, cfg = vae_run
    spec, out = f"tfds:{NAME}:train", str(tmp_path / "latents")
    info = encode(spec, wd, out, batch_size=8, process_index=0, process_count=1, progress=False)
    assert not info["reused"]
    assert info["num_inputs"] == info["num_encoded"] == 6 and info["skipped"] == 0
    assert info["key"]["dataset_fingerprint"] == tfds_lib.tfds_fingerprint(spec)
    src = tfds_lib.read_tfds(spec)
    enc = list(read_encoded(out))
    assert sorted(r["index"] for r in enc) == list(range(6))
    tds, sds, c = cfg.vae.temporal_downsample, cfg.vae.spatial_downsample, cfg.vae.latent_channels
    for r in enc:
        t, h, w, _ = src[r["index"]]["video"].shape
        assert r["latent"].dtype == np.float32
        assert r["latent"].shape == (1 + (t - 1) // tds, h // sds, w // sds, c)
        assert np.isfinite(r["latent"]).all()
        assert (r["frames"], r["height"], r["width"]) == (t, h, w)
        assert r["caption"] == src[r["index"]]["caption"] and r["source"] == "moving_mnist"
        assert r["kind"] == ("image" if t == 1 else "video") and r["fps"] == 8.0
    assert sum(info["latent_shapes"].values()) == 6 and len(info["latent_shapes"]) == 2
    again = encode(spec, wd, out, batch_size=8, process_index=0, process_count=1,
                   progress=False)
    assert again["reused"] and again["key"] == info["key"]
    assert "tensorflow" not in sys.modules  # the whole TFDS path ran without TensorFlow
