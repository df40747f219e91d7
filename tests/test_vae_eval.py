"""``evaluate-vae``: named, deterministic held-out sets and every reported field."""

import json
import math
import os

import numpy as np
import pytest

from sora_jax.data import real_clips, sources
from sora_jax.models.vae_gan import VAETrainModel
from sora_jax.evaluation import vae_eval

FIELDS = ("video_psnr", "video_ssim", "image_psnr", "image_ssim", "video_set", "image_set",
          "num_videos", "num_images", "video_frames", "video_height", "video_width",
          "image_height", "image_width")


def test_sets_are_deterministic_tiles_of_held_out_sources():
    a = vae_eval.video_set("carphone_pristine", frames=9, size=(32, 32), max_clips=12)
    b = vae_eval.video_set("carphone_pristine", frames=9, size=(32, 32), max_clips=12)
    np.testing.assert_array_equal(a.clips, b.clips)
    assert a.origins == b.origins and a.name == "carphone_pristine" and a.kind == "video"
    assert a.clips.shape == (12, 9, 32, 32, 3) and a.clips.dtype == np.uint8
    # native pixels at fixed, non-overlapping places: windows start at multiples of 9, tiles
    # of one window do not overlap
    video = sources.load_video("carphone_pristine")
    for clip, (name, start, y, x) in zip(a.clips, a.origins):
        assert name == "carphone_pristine" and start % 9 == 0
        np.testing.assert_array_equal(clip, video[start : start + 9, y : y + 32, x : x + 32])
    for i, (_, s1, y1, x1) in enumerate(a.origins):
        for _, s2, y2, x2 in a.origins[i + 1 :]:
            assert s1 != s2 or abs(y1 - y2) >= 32 or abs(x1 - x2) >= 32
    assert len({o[1] for o in a.origins}) > 1  # spread over time, not one window

    im = vae_eval.image_set(("coffee", "flower"), size=(32, 32), scale=4.0, max_images=40)
    again = vae_eval.image_set(("coffee", "flower"), size=(32, 32), scale=4.0, max_images=40)
    np.testing.assert_array_equal(im.clips, again.clips)
    assert im.name == "coffee+flower" and im.clips.shape[1:] == (1, 32, 32, 3)
    assert {o[0] for o in im.origins} == {"coffee", "flower"}
    # 400x600 / 4 -> 100x150: 3x4 tiles; 427x640 / 4 -> 107x160: 3x5 tiles
    assert len(im.clips) == 12 + 15

    # disjoint from every training source
    train = set(real_clips.TRAIN_VIDEOS) | set(real_clips.TRAIN_PHOTOS)
    assert not (set(a.sources) | set(im.sources)) & train
    with pytest.raises(ValueError, match="used in training"):
        vae_eval.video_set("bikes")
    with pytest.raises(ValueError, match="used in training"):
        vae_eval.image_set(("astronaut",))
    with pytest.raises(ValueError, match="do not fit"):
        vae_eval.video_set("carphone_pristine", frames=121)
    with pytest.raises(ValueError, match="does not fit"):
        vae_eval.video_set("carphone_pristine", size=(160, 160))


def test_quickstart_sets_are_named_and_sized_by_the_config():
    from sora_jax import config as config_lib

    cfg = config_lib.load_config("configs/quickstart.py")
    videos, images = vae_eval.build_sets(cfg.vae_eval)
    assert videos.clips.shape == (32, 9, 32, 32, 3)
    assert images.clips.shape == (27, 1, 32, 32, 3)
    assert (videos.name, images.name) == ("carphone_pristine", "coffee+flower")


def _check_fields(ev, cfg):
    for key in FIELDS:
        assert key in ev, key
    for key in ("video_psnr", "video_ssim", "image_psnr", "image_ssim"):
        assert math.isfinite(ev[key]), key
    assert -1 <= ev["video_ssim"] <= 1 and -1 <= ev["image_ssim"] <= 1
    assert ev["num_videos"] == cfg.vae_eval.max_videos and ev["num_images"] == cfg.vae_eval.max_images
    assert (ev["video_set"], ev["image_set"]) == ("carphone_pristine", "coffee+flower")
    assert [ev["video_frames"], ev["video_height"], ev["video_width"]] == [
        cfg.vae_eval.video_frames, *cfg.vae_eval.video_size]
    assert "rfvd" not in ev


def test_evaluate_vae_on_a_tiny_model_reports_every_field(tmp_path, capsys):
    from sora_jax import config as config_lib
    from sora_jax.cli import run
    from sora_jax.inference.latents import VAECodec
    from sora_jax.models.factory import build_vae
    from sora_jax.stages import evaluate_vae
    from sora_jax.train.run_folder import paths, save_config
    from sora_jax.train.checkpoint import Checkpointer

    cfg = config_lib.load_config("configs/tiny.py")
    wd = str(tmp_path / "run")
    save_config(cfg, wd)
    vae = build_vae(cfg)  # untrained: the numbers are poor but must all be there
    ev = evaluate_vae(cfg, wd, VAECodec(vae))
    _check_fields(ev, cfg)
    assert ev["checkpoint_step"] is None and ev["vae_kind"] == "causal"
    assert "digits_psnr" not in ev  # no prepared data in this folder
    assert json.load(open(paths(wd)["vae_eval"])) == ev

    # the CLI subcommand on a run folder with a checkpoint, and --out
    ck = Checkpointer(os.path.join(paths(wd)["vae"], "checkpoints"), async_save=False)
    ck.save(5, VAETrainModel(vae), None, {})
    ck.close()
    out = str(tmp_path / "elsewhere" / "ev.json")
    assert run(["evaluate-vae", "--workdir", wd, "--out", out, "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.load(open(out))
    assert printed == saved and saved["checkpoint_step"] == 5
    _check_fields(saved, cfg)
    np.testing.assert_allclose(saved["video_psnr"], ev["video_psnr"], rtol=1e-5)


def test_evaluate_vae_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from sora_jax.cli import run

    code = run(["evaluate-vae", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "train-vae" in err and "Traceback" not in err
