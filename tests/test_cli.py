"""The ``sora-jax`` command line on the tiny config: every stage end to end, and clear errors."""

import json
import os

import numpy as np
import pytest

from sora_jax.cli import run

TINY = ["--config", "configs/tiny.py", "--no-progress"]


def test_generate_writes_video_sheet_and_json(trained_run, tmp_path, capsys):
    out = str(tmp_path / "gen")
    code = run(["generate", "--workdir", trained_run, "--prompt", "the digit 3 moves right",
                "--prompt", "the digit 5 moves up", "--frames", "5", "--height", "32", "--width", "32",
                "--seed", "3", "--guidance", "2.5", "--steps", "2", "--out", out, "--no-progress"])
    assert code == 0
    info = json.load(open(os.path.join(out, "samples.json")))
    assert [s["prompt"] for s in info["samples"]] == ["the digit 3 moves right", "the digit 5 moves up"]
    assert info["seed"] == 3 and info["guidance"] == 2.5 and info["checkpoint_step"] == 3
    assert info["config"]["dit"]["hidden_size"] == 32
    from sora_jax.io import read_video

    video = read_video(info["samples"][0]["path"])
    assert video.shape[0] == 5 and video.dtype == np.uint8
    assert os.path.getsize(os.path.join(out, "contact_sheet.png")) > 0


def test_generate_samples_from_the_ema_weights_unless_told_raw(trained_run, tmp_path):
    runs = {}
    for weights in ("ema", "raw"):
        out = str(tmp_path / weights)
        flag = [] if weights == "ema" else ["--weights", "raw"]
        assert run(["generate", "--workdir", trained_run, "--prompt", "the digit 3 moves right",
                    "--frames", "5", "--steps", "2", "--out", out, "--no-progress", *flag]) == 0
        sample = json.load(open(os.path.join(out, "samples.json")))["samples"][0]
        side = json.load(open(os.path.splitext(sample["path"])[0] + ".json"))
        runs[weights] = side
    assert runs["ema"]["weights"] == "ema" and runs["raw"]["weights"] == "raw"
    # the two are different weights (3 steps: the average still lags), hashed apart
    assert runs["ema"]["checkpoint_sha256"] != runs["raw"]["checkpoint_sha256"]


def test_with_weights_shares_the_autoencoder_and_swaps_the_dit(trained_run):
    from sora_jax import config as config_lib
    from sora_jax.inference.generate import Generator
    from sora_jax.train.run_folder import paths

    cfg = config_lib.from_json(open(paths(trained_run)["config"]).read())
    ema = Generator(cfg, trained_run)
    raw = ema.with_weights("raw")
    assert (ema.weights, raw.weights) == ("ema", "raw") and raw.codec is ema.codec
    assert raw.checkpoint_hashes()["checkpoint_sha256"] != ema.checkpoint_hashes()["checkpoint_sha256"]
    assert Generator(cfg, trained_run, weights="raw").checkpoint_hashes() == raw.checkpoint_hashes()


def test_generate_is_deterministic_given_seed(trained_run):
    from sora_jax import config as config_lib
    from sora_jax.inference.generate import Generator
    from sora_jax.train.run_folder import paths

    cfg = config_lib.from_json(open(paths(trained_run)["config"]).read())
    gen = Generator(cfg, trained_run)
    kw = dict(frames=5, height=32, width=32, guidance=2.0, steps=2)
    a = gen(["the digit 1 moves left"], seed=0, **kw)[0]
    b = gen(["the digit 1 moves left", "the digit 2 moves down"], seed=0, **kw)[0]
    np.testing.assert_array_equal(a, b)  # packing with another request does not change a sample


def test_generate_packs_requests_of_different_shapes_into_one_call(trained_run, tmp_path, monkeypatch):
    from sora_jax import config as config_lib
    from sora_jax.inference.generate import Generator, Request
    from sora_jax.train.run_folder import paths

    cfg = config_lib.from_json(open(paths(trained_run)["config"]).read())
    gen = Generator(cfg, trained_run)
    calls = []
    import sora_jax.inference.generate as generate

    real = generate.sample
    monkeypatch.setattr(generate, "sample",
                        lambda *a, **k: calls.append(k["segment_ids"].shape) or real(*a, **k))
    reqs = [Request("the digit 1 moves left", 5, 32, 32), Request("the digit 4 moves up", 1, 48, 32),
            Request("the digit 8 moves right", 9, 32, 48)]
    videos = gen.generate(reqs, seed=0, guidance=2.0, steps=2)
    alone = gen.generate(reqs[1:2], seed=0, guidance=2.0, steps=2)
    assert [v.shape for v in videos] == [(5, 32, 32, 3), (1, 48, 32, 3), (9, 32, 48, 3)]
    assert len(calls) == 2  # one sampler call per generate(), whatever the mix of shapes
    # the same request (index 1 -> noise seed [0, 1] vs [0, 0] alone) differs only by its noise;
    # with equal noise indices the packed sample equals the lone one:
    solo = gen.generate([Request("the digit 1 moves left", 5, 32, 32)], seed=0, guidance=2.0, steps=2)
    np.testing.assert_array_equal(videos[0], solo[0])
    assert alone[0].shape == (1, 48, 32, 3)
    out = str(tmp_path / "mixed")
    assert run(["generate", "--workdir", trained_run, "--prompt", "the digit 2 moves down",
                "--prompt", "the digit 6 moves left", "--shape", "5x32x48", "--shape", "1x32x32",
                "--steps", "1", "--out", out, "--no-progress"]) == 0
    info = json.load(open(os.path.join(out, "samples.json")))
    assert [s["shape"] for s in info["samples"]] == [[5, 32, 48], [1, 32, 32]]


@pytest.mark.slow  # 10 s; CI headroom (resume itself is tested in test_resilience.py)
def test_resume_is_a_no_op_when_training_is_done(trained_run, capsys):
    assert run(["train-dit", *TINY, "--workdir", trained_run]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resumed_from"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--frames", "4"], "impossible frame count 4"),
    (["--height", "30"], "impossible size 30x32"),
    (["--steps", "0"], "config key 'sample.steps': must be an integer >= 1"),
    (["--shape", "5x32"], "--shape must look like"),
    (["--shape", "5x30x32"], "impossible size 30x32"),
    (["--config.dit.nope=1"], "unknown config key 'dit.nope'"),
])
def test_generate_bad_input_gives_one_clear_error(trained_run, capsys, argv, message):
    code = run(["generate", "--workdir", trained_run, "--prompt", "x", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_generate_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = run(["generate", *TINY, "--workdir", str(tmp_path / "none"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "sora-jax generate: error:" in err and "train-vae" in err
    assert "Traceback" not in err
    assert not (tmp_path / "none" / "vae").exists()  # a typo in --workdir leaves nothing behind


@pytest.mark.parametrize("override, message", [
    ("--config.sample.frames=4", "config key 'sample': impossible frame count 4"),
    ("--config.dit_train.row_length=16", "config key 'dit_train.row_length'"),
])
def test_impossible_config_fails_before_any_work(tmp_path, capsys, override, message):
    code = run(["quickstart", *TINY, "--workdir", str(tmp_path / "q"), override])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quickstart_writes_every_metric(trained_run, tmp_path, capsys):
    import shutil

    wd = str(tmp_path / "qs")
    shutil.copytree(trained_run, wd)  # stages resume: data, VAE and DiT are already there
    assert run(["quickstart", "--workdir", wd, "--no-progress"]) == 0
    metrics = json.load(open(os.path.join(wd, "quickstart_metrics.json")))
    for key in ("vae_psnr_heldout_video", "vae_ssim_heldout_video", "vae_psnr_heldout_image",
                "vae_ssim_heldout_image", "vae_psnr_heldout_digits", "vae_eval_sets",
                "dit_heldout_loss", "dit_heldout_loss_raw", "digit_accuracy", "direction_accuracy",
                "joint_accuracy", "samples", "stage_seconds"):
        assert key in metrics, key
    for key in ("digit_accuracy", "direction_accuracy", "joint_accuracy"):  # EMA and raw, with SEs
        for name in (key, f"{key}_se", f"raw_{key}", f"raw_{key}_se"):
            assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["eval_weights"] == "ema"
    # prompts x seeds samples (tiny: 2 prompts x 2 seeds)
    assert metrics["num_eval_samples"] == 4
    # the run ends with its one-line summary
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("quickstart: digit ")
    assert metrics["vae_eval_sets"] == {"video": "carphone_pristine", "image": "coffee+flower",
                                        "digits": "moving_mnist_eval"}
    assert 0.0 <= metrics["digit_accuracy"] <= 1.0 and 0.0 <= metrics["direction_accuracy"] <= 1.0
    assert np.isfinite(metrics["vae_psnr_heldout_video"]) and np.isfinite(metrics["dit_heldout_loss"])
    assert all(os.path.isfile(s["path"]) for s in metrics["samples"])
    assert set(metrics["stage_seconds"]) == {"prepare_data", "train_vae", "train_dit", "evaluate", "modes"}
    assert metrics["config"] == "tiny"  # the run's own config.json was reused
    # one sample of every prompt mode on bundled real media, with its provenance sidecar
    from sora_jax.inference.modes import MODES

    assert set(metrics["modes"]) == set(MODES)
    for mode, m in metrics["modes"].items():
        assert os.path.isfile(m["path"]) and os.path.isfile(os.path.splitext(m["path"])[0] + ".json")
    assert metrics["modes"]["extend-forward"]["conditioned_frames_psnr"] >= 60.0
    assert np.isfinite(metrics["modes"]["loop"]["loop_seam_ratio"])
    # and the loop seam over evaluate.loop_samples loops (tiny: 2), mean +- SE in the summary
    loop = metrics["modes"]["loop"]
    assert loop["loop_seam_samples"] == 2 and np.isfinite(loop["loop_seam_ratio_mean"])
    assert loop["loop_seam_ratio_se"] >= 0.0
    assert summary.endswith(f"loop seam ratio {loop['loop_seam_ratio_mean']:.3f}+-"
                            f"{loop['loop_seam_ratio_se']:.3f} (2 loops) | {metrics['total_seconds']:.0f} s")
    assert os.path.isfile(os.path.join(wd, "modes", "contact_sheet.png"))


def test_train_dit_without_data_is_a_clear_error(tmp_path, capsys):
    code = run(["train-dit", *TINY, "--workdir", str(tmp_path / "none")])
    assert code == 2 and "prepare-data" in capsys.readouterr().err


def test_dit_batches_are_deterministic_and_pack_images_with_videos(trained_run):
    from sora_jax import config as config_lib
    from sora_jax.data.pipeline import packed_dataset
    from sora_jax.stages import dit_sources

    cfg = config_lib.from_json(open(os.path.join(trained_run, "config.json")).read())
    source, table = dit_sources(cfg, trained_run)

    def batches(seed, n=8):
        it = iter(packed_dataset(source, cfg.dit_train, tuple(cfg.dit.patch), seed, text_table=table))
        return [next(it) for _ in range(n)]

    a, b = batches(0), batches(0)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["tokens"], batches(1, 1)[0]["tokens"])
    # some row holds a 1-latent-frame example (an image) next to a video
    mixed = False
    for batch in a:
        for row_seg, row_pos in zip(batch["segment_ids"], batch["positions"]):
            frames = {int(s): int(row_pos[row_seg == s, 0].max()) + 1 for s in set(row_seg.tolist()) - {0}}
            mixed |= len(set(frames.values())) > 1
    assert mixed


@pytest.mark.slow  # 10 s; CI headroom
def test_a_moved_run_folder_still_works(trained_run, tmp_path, capsys):
    import shutil

    moved = str(tmp_path / "moved")
    shutil.copytree(trained_run, moved)
    assert run(["train-dit", *TINY, "--workdir", moved]) == 0  # finds its data and latents
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 3
    assert run(["generate", "--workdir", moved, "--prompt", "the digit 7 moves up", "--frames", "1",
                "--steps", "1", "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(moved, "samples", "sample_00.png"))


def test_train_vae_saves_statistics_in_its_checkpoint_and_evaluates(trained_run):
    """The final checkpoint carries the latent statistics of the training crops, and
    evaluate_vae.json scores held-out sets whose sources no training record comes from."""
    from sora_jax.data.records import read_dataset
    from sora_jax import config as config_lib
    from sora_jax.data.pipeline import vae_batch_fn
    from sora_jax.inference.latents import load_codec
    from sora_jax.train.run_folder import datasets as _datasets, paths

    cfg = config_lib.from_json(open(paths(trained_run)["config"]).read())
    codec = load_codec(cfg, trained_run)
    assert not np.allclose(codec.shift, 0) and not np.allclose(codec.scale, 1)
    ds = _datasets(trained_run)
    batch_fn = vae_batch_fn({"mnist": ds["moving_mnist_train"], "clips": ds["real_clips_train"]},
                            cfg.vae_train, cfg.vae_train.seed)
    z = np.concatenate([codec.encode(batch_fn(10_000_000 + i)["video"]).reshape(-1, codec.shift.size)
                        for i in range(16)])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)  # standardised on the training crops
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)
    assert not os.path.exists(os.path.join(paths(trained_run)["vae"], "latent_stats.json"))

    ev = json.load(open(paths(trained_run)["vae_eval"]))
    for key in ("video_psnr", "video_ssim", "image_psnr", "image_ssim", "digits_psnr"):
        assert np.isfinite(ev[key]), key
    assert ev["num_videos"] > 0 and ev["num_images"] > 0 and ev["num_digits"] > 0
    assert ev["checkpoint_step"] == cfg.vae_train.steps
    train_sources = {str(r["source"]) for r in read_dataset(ds["real_clips_train"])}
    assert train_sources and not train_sources & set(ev["video_sources"] + ev["image_sources"])
