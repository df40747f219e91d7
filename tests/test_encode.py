"""Offline latent encoding of an ingested dataset with a tiny VAE run and the MiniLM encoder."""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines import encode as encode_lib
from data_pipelines.encode import encode, main
from data_pipelines.ingest import ingest
from sora_jax.data.encoded import list_encoded, process_prefix, read_encoded
from sora_jax.data.records import write_array_record
from sora_jax.io import to_float, write_mp4
from sora_jax.models.vae_gan import VAETrainModel

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
CAPTIONS = ["a white square slides to the right", "a bar", "noise, seen once"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """An ingested dataset: 3 video clips (9, 16, 32) and 1 image (1, 16, 32)."""
    root = tmp_path_factory.mktemp("media")
    frames = np.zeros((54, 48, 64, 3), np.uint8)
    for i in range(54):
        frames[i, 16:28, i : i + 10] = 255
    write_mp4(root / "in" / "a.mp4", frames, fps=24)  # 2.25 s -> 18 frames -> 9 + 9
    write_mp4(root / "in" / "b.mp4", frames[:29, :, ::-1], fps=24)  # 1.2 s -> 9 frames
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(root / "in" / "c.png")
    with open(root / "captions.jsonl", "w") as f:
        for path, caption in zip(["a.mp4", "b.mp4", "c.png"], CAPTIONS):
            f.write(json.dumps({"path": path, "caption": caption}) + "\n")
    prefix = str(root / "clips")
    report = ingest(str(root / "in"), prefix, str(root / "captions.jsonl"), fps=8.0,
                    clip_seconds=1.125, max_side=32, size_multiple=16, workers=0, progress=False)
    assert report["num_clips"] == 4 and report["skipped"] == 0
    return prefix


def _by_key(ds):
    return {(r["source"], r["start_s"]): r for r in ds}


@pytest.fixture(scope="module")
def single(vae_run, clips, tmp_path_factory):
    wd, _ = vae_run
    out = str(tmp_path_factory.mktemp("enc") / "latents")
    info = encode(clips, wd, out, batch_size=2, process_index=0, process_count=1, progress=False)
    return out, info


def test_latents_match_the_vae_and_latent_shape(vae_run, clips, single):
    from sora_jax.data.records import read_dataset
    from sora_jax.inference.latents import load_codec
    from sora_jax.models.factory import latent_shape

    wd, cfg = vae_run
    out, info = single
    assert info["num_inputs"] == info["num_encoded"] == 4 and info["skipped"] == 0
    assert not info["reused"]
    src = {(r["source"], r["start_s"]): r for r in read_dataset(clips)}
    enc = _by_key(read_encoded(out))
    assert enc.keys() == src.keys()
    for k, r in enc.items():
        video = src[k]["video"]
        assert r["latent"].dtype == np.float32
        assert r["latent"].shape == latent_shape(cfg, *video.shape[:3])
        assert (r["frames"], r["height"], r["width"]) == video.shape[:3]
        assert r["caption"] == src[k]["caption"] and r["kind"] == src[k]["kind"]
        assert r["fps"] == 8.0 and r["end_s"] == src[k]["end_s"]
    # the stored latent is the run's VAE posterior mean, normalised with its statistics
    image = src[("c.png", 0.0)]["video"]
    codec = load_codec(cfg, wd)
    expected = codec.encode(to_float(image[None]))[0]
    np.testing.assert_allclose(enc[("c.png", 0.0)]["latent"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(codec.shift, np.linspace(-0.2, 0.2, cfg.vae.latent_channels),
                               atol=1e-7)  # the checkpoint's statistics came back
    raw = expected * codec.scale + codec.shift
    assert not np.allclose(expected, raw, atol=1e-3)  # statistics were applied


def test_text_states_are_the_kept_caption_tokens(vae_run, single):
    from sora_jax.models.text_encoder import TextEncoder
    from sora_jax.models.factory import text_encoder as cached_text_encoder

    _, cfg = vae_run
    out, _ = single
    encoder = cached_text_encoder(cfg.text.max_length)
    assert isinstance(encoder, TextEncoder)
    for r in read_encoded(out):
        states, mask = encoder.encode([r["caption"]], pad_to=cfg.text.max_length)
        kept = states[0][mask[0]]
        assert r["text"].dtype == np.float32 and r["text"].shape == kept.shape
        assert 2 < kept.shape[0] < cfg.text.max_length  # [CLS] words [SEP], no padding
        np.testing.assert_allclose(r["text"], kept, rtol=1e-4, atol=1e-4)


def test_process_sharding_is_disjoint_and_complete(vae_run, clips, single, tmp_path):
    wd, _ = vae_run
    out = str(tmp_path / "latents")
    p0 = encode(clips, wd, out, batch_size=2, process_index=0, process_count=2, progress=False)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 processes done \(missing \[1\]\)"):
        list_encoded(out)
    p1 = encode(clips, wd, out, batch_size=2, process_index=1, process_count=2, progress=False)
    assert p0["num_inputs"] == p1["num_inputs"] == 2
    assert list_encoded(out) == [process_prefix(os.path.abspath(out), i, 2) for i in range(2)]
    from sora_jax.data.records import read_dataset

    part0 = {(r["source"], r["start_s"]) for r in read_dataset(list_encoded(out)[0])}
    part1 = {(r["source"], r["start_s"]) for r in read_dataset(list_encoded(out)[1])}
    assert not part0 & part1
    assert sorted(r["index"] for r in read_dataset(list_encoded(out)[0])) == [0, 2]
    whole = _by_key(read_encoded(single[0]))
    split = _by_key(read_encoded(out))
    assert split.keys() == whole.keys() == part0 | part1
    for k in whole:
        np.testing.assert_allclose(split[k]["latent"], whole[k]["latent"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(split[k]["text"], whole[k]["text"], rtol=1e-4, atol=1e-4)


def test_rerun_is_a_no_op(vae_run, clips, single, monkeypatch, capsys):
    wd, _ = vae_run
    out, first = single
    prefix = first["output"]
    files = sorted(p for p in os.listdir(os.path.dirname(prefix)) if p.startswith("latents"))
    mtimes = {p: os.stat(os.path.join(os.path.dirname(prefix), p)).st_mtime_ns for p in files}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an up-to-date output")

    monkeypatch.setattr(encode_lib, "_codec", no_model)
    again = encode(clips, wd, out, batch_size=2, process_index=0, process_count=1, progress=False)
    assert again["reused"] and again["key"] == first["key"]
    code = main(["--data", clips, "--vae-workdir", wd, "--output", out, "--process-index", "0",
                 "--process-count", "1", "--no-progress"])
    assert code == 0 and "up to date" in capsys.readouterr().out
    assert {p: os.stat(os.path.join(os.path.dirname(prefix), p)).st_mtime_ns for p in files} == mtimes


def test_invalid_shapes_are_skipped_and_counted(vae_run, tmp_path):
    wd, _ = vae_run
    rng = np.random.default_rng(1)

    def rec(t, h, w, source):
        return dict(video=rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8), caption="x",
                    source=source, frames=t, height=h, width=w, fps=8.0, kind="video",
                    start_s=0.0, end_s=t / 8)

    data = str(tmp_path / "odd")
    write_array_record(data, [rec(4, 16, 32, "four_frames"), rec(1, 18, 32, "odd_height"),
                              rec(1, 16, 32, "fine")])
    info = encode(data, wd, str(tmp_path / "latents"), batch_size=2, process_index=0,
                  process_count=1, progress=False)
    assert info["num_encoded"] == 1 and info["skipped"] == 2
    assert info["skipped_by_reason"] == {"bad_frames": 1, "bad_size": 1}
    assert {(s["source"], s["reason"]) for s in info["skipped_records"]} == {
        ("four_frames", "bad_frames"), ("odd_height", "bad_size")}
    assert [r["source"] for r in read_encoded(str(tmp_path / "latents"))] == ["fine"]


def test_missing_run_is_a_clear_error(clips, tmp_path, capsys):
    code = main(["--data", clips, "--vae-workdir", str(tmp_path / "none"), "--output",
                 str(tmp_path / "x"), "--process-index", "0", "--process-count", "1"])
    assert code == 2 and "no config.json" in capsys.readouterr().err


@pytest.mark.slow  # 18 s; CI headroom (one compiled step over mixed sizes: also test_pixel.py, test_train.py)
def test_train_dit_on_ingested_data_compiles_its_step_once(single, tmp_path, capsys):
    """ingest -> encode -> train-dit on the user's latents: mixed images and videos at random
    resolutions with token dropping, one compiled train step, resumable."""
    from sora_jax.cli import run

    out, _ = single
    wd = str(tmp_path / "dit_run")
    argv = ["train-dit", "--config", str(CONFIG), "--workdir", wd, "--no-progress",
            f"--config.dit_train.data={out}:1.0", "--config.dit_train.resolution=uniform",
            "--config.dit_train.min_scale=0.5", "--config.dit_train.token_drop_rate=0.3",
            "--config.dit_train.token_drop_distribution=uniform", "--config.dit_train.steps=4"]
    assert run(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_step_compiles"] == 1 and summary["resumed_from"] == 0
    assert np.isfinite(summary["final_loss"])
    assert 0 < summary["final_metrics"]["examples_per_row"]
    # continuing the run restores the iterator position saved in the checkpoint
    assert run(argv[:-1] + ["--config.dit_train.steps=6"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 4
    bad = argv[:6] + ["--config.dit_train.data=/nonexistent/latents"]
    assert run(bad) == 2 and "dit_train.data" in capsys.readouterr().err
    other_vae = argv[:7] + ["--config.vae.latent_channels=3"]
    assert run(other_vae) == 2 and "4-channel latents" in capsys.readouterr().err


def test_a_copied_run_reuses_and_a_new_checkpoint_re_encodes(vae_run, clips, single, tmp_path):
    """The stamp keys on the checkpoint's contents (weights and latent statistics), not on its
    path or step alone: a copied run folder is up to date, new statistics at the same step are not."""
    import shutil

    from sora_jax.models.factory import build_vae
    from sora_jax.train.run_folder import paths
    from sora_jax.train.checkpoint import Checkpointer

    wd, cfg = vae_run
    out, first = single
    copy = str(tmp_path / "copied_run")
    shutil.copytree(wd, copy)
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    for name in os.listdir(os.path.dirname(first["output"])):
        if name.startswith("latents"):
            shutil.copy2(os.path.join(os.path.dirname(first["output"]), name), enc_dir / name)
    out2 = str(enc_dir / "latents")
    again = encode(clips, copy, out2, batch_size=2, process_index=0, process_count=1, progress=False)
    assert again["reused"] and again["key"]["vae_checkpoint_sha256"] == first["key"]["vae_checkpoint_sha256"]

    ckpt_dir = os.path.join(paths(copy)["vae"], "checkpoints")
    shutil.rmtree(os.path.join(ckpt_dir, "2"))
    vae = build_vae(cfg)
    vae.latent_shift[...] = np.full((cfg.vae.latent_channels,), 0.5, np.float32)  # new statistics
    ck = Checkpointer(ckpt_dir, async_save=False)
    ck.save(2, VAETrainModel(vae), None, {})
    ck.close()
    redone = encode(clips, copy, out2, batch_size=2, process_index=0, process_count=1, progress=False)
    assert not redone["reused"] and redone["key"]["vae_step"] == first["key"]["vae_step"] == 2
    assert redone["key"]["vae_checkpoint_sha256"] != first["key"]["vae_checkpoint_sha256"]
    old, new = _by_key(read_encoded(out)), _by_key(read_encoded(out2))
    k = ("c.png", 0.0)  # same weights (same seed), so the raw latents agree
    np.testing.assert_allclose(new[k]["latent"] * 1.0 + 0.5,
                               old[k]["latent"] * 1.5 + np.linspace(-0.2, 0.2, cfg.vae.latent_channels),
                               rtol=1e-4, atol=1e-4)


def test_parse_mix_reads_prefixes_and_weights():
    from sora_jax.data.encoded import parse_mix

    assert parse_mix("") == [] and parse_mix(" , ") == []
    assert parse_mix("a:2, gs://bucket/b ,c:0.5") == [("a", 2.0), ("gs://bucket/b", 1.0), ("c", 0.5)]
    for bad in ("a:0", "a:-1", ":3", "a:nan", "a:inf"):
        with pytest.raises(ValueError, match="positive weight"):
            parse_mix(bad)


def test_an_imported_wan_run_encodes_with_its_own_umt5(clips, tmp_path):
    """A run whose text encoder is umT5 (import-weights of Wan 2.1) encodes captions with it:
    512 tokens each, all kept (Wan's DiT attends to the zero padding too)."""
    from sora_jax.inference.text import load_text_encoder
    from sora_jax.interop.diffusers_import import import_diffusers
    from sora_jax.train.run_folder import read_config

    run = str(tmp_path / "wan")
    import_diffusers(pathlib.Path(__file__).parent / "fixtures" / "wan" / "tiny", run)
    out = str(tmp_path / "latents")
    info = encode(clips, run, out, batch_size=2, process_index=0, process_count=1, progress=False)
    assert info["num_encoded"] == 4
    cfg = read_config(run)
    text = load_text_encoder(cfg, run)
    for r in read_encoded(out):
        states, mask = text.encode([r["caption"]], pad_to=cfg.text.max_length)
        assert mask.all() and r["text"].shape == (512, cfg.text.umt5.d_model)
        np.testing.assert_allclose(r["text"], states[0], rtol=1e-5, atol=1e-5)
        assert r["latent"].shape[-1] == cfg.vae.latent_channels
