"""Config validation: every bad value is a one-line error naming its key, raised before any
file is written, and checking has no side effects."""

import os

import pytest

from sora_jax import config as config_lib
from sora_jax.cli import run
from sora_jax.config_validation import SECTIONS, validate_config
from sora_jax.errors import ConfigError


def _cfg(*overrides):
    return config_lib.apply_overrides(config_lib.load_config("tiny"), list(overrides))


@pytest.mark.parametrize("name", ["quickstart", "tiny", "default", "pixel", "pixel:tiny",
                                  "dit_ladder:S", "dit_ladder:XL-class", "dit_ladder:wan-14b",
                                  "vae_4x8x8_c16", "vae_4x8x8_c16:gpu", "vae_8x8x8", "vae_4x16x16"])
def test_every_packaged_config_is_valid(name):
    cfg = config_lib.load_config(name)
    validate_config(cfg)  # raises ConfigError on any bad value
    assert config_lib.to_json(cfg) == config_lib.to_json(config_lib.load_config(name))  # untouched
    broken = config_lib.apply_overrides(config_lib.load_config(name), ["dit_train.steps=0"])
    with pytest.raises(ConfigError, match="dit_train.steps"):  # the same config, one value off
        validate_config(broken)


# (override, text the error must contain): one or more per section
BAD = [
    ("dit_train.steps=-5", "dit_train.steps"),
    ("dit_train.steps=0", "dit_train.steps"),
    ("vae_train.steps=-1", "vae_train.steps"),
    ("dit_train.batch_size=0", "dit_train.batch_size"),
    ("dit_train.learning_rate=nan", "dit_train.learning_rate"),
    ("vae_train.b2=1.0", "vae_train.b2"),
    ("vae_train.checkpoint_every=0", "vae_train.checkpoint_every"),
    ("vae_train.image_prob=1.5", "vae_train.image_prob"),
    ("vae_train.crop=(8, 16, 16)", "vae_train.crop"),
    ("data.mnist_train=-1", "data.mnist_train"),
    ("data.two_digit_prob=2.0", "data.two_digit_prob"),
    ("data.num_shards=0", "data.num_shards"),
    ("data.speed_range=(3, 1)", "data.speed_range"),
    ("data.sizes=((30, 32),)", "data.durations/data.sizes"),
    ("vae.kind='pixels'", "vae.kind"),
    ("vae.latent_channels=0", "vae.latent_channels"),
    ("vae_loss.kl_weight=-1.0", "vae_loss"),
    ("vae_inference.chunk=-1", "vae_inference.chunk"),
    ("vae_eval.video_source='bikes'", "vae_eval.video_source"),
    ("vae_eval.batch=0", "vae_eval.batch"),
    ("text.max_length=1", "text.max_length"),
    ("dit.num_heads=3", "dit.num_heads"),
    ("dit.attention_backend='flash'", "dit.attention_backend"),
    ("dit.remat_policy='some'", "dit.remat_policy"),
    ("dit.dtype='float33'", "dit.dtype"),
    ("flow.logit_std=0.0", "flow.logit_std"),
    ("flow.loss_weighting='mean'", "flow.loss_weighting"),
    ("conditioning.max_k=0", "conditioning"),
    ("mesh.ici.data=0", "mesh.ici"),
    ("dit_train.row_length=8", "dit_train.row_length"),
    ("dit_train.resolution='random'", "dit_train.resolution"),
    ("dit_train.data='a:0'", "dit_train.data"),
    ("sample.steps=0", "sample.steps"),
    ("sample.guidance=nan", "sample.guidance"),
    ("sample.visual_guidance=-inf", "sample.visual_guidance"),
    ("sample.strength=1.5", "sample.strength"),
    ("sample.solver='rk4'", "sample.solver"),
    ("sample.frames=8", "sample"),
    ("prompt.extender='shout'", "prompt.extender"),
    ("prompt.filter.blocked_patterns=('(',)", "prompt.filter"),
    ("evaluate.num_samples=0", "evaluate.num_samples"),
    ("model_info.latent=(0, 4, 4)", "model_info.latent"),
    ("seed=-1", "seed"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_names_its_key(override, key):
    cfg = _cfg(override)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_every_section_has_a_case():
    covered = {o.split("=")[0].split(".")[0] for o, _ in BAD}
    assert set(SECTIONS) - {"name"} <= covered | {"seed"}


def test_validation_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg()
    before = config_lib.to_json(cfg)
    validate_config(cfg)
    assert config_lib.to_json(cfg) == before and os.listdir(tmp_path) == []


def test_a_missing_section_is_named():
    cfg = _cfg()
    del cfg["evaluate"]
    with pytest.raises(ConfigError, match="evaluate"):
        validate_config(cfg)


def test_a_key_an_older_run_folder_lacks_is_named_with_the_way_out():
    cfg = _cfg()
    del cfg.dit_train["ema"]  # what a config.json written before issue 16 holds
    with pytest.raises(ConfigError, match=r"'ema'.*--config quickstart"):
        validate_config(cfg)


@pytest.mark.parametrize("command,override", [
    ("train-dit", "--config.dit_train.steps=-3"),
    ("train-vae", "--config.vae_train.steps=-3"),
    ("train-dit", "--config.dit_train.batch_size=0"),
])
def test_cli_refuses_before_writing_anything(command, override, tmp_path, capsys):
    """A fresh run folder stays empty, and an existing run's config.json is not overwritten
    (the next plain command on it still works)."""
    fresh = tmp_path / "fresh"
    assert run([command, "--config", "tiny", "--workdir", str(fresh), override, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and override.split("=")[0][len("--config."):] in err
    assert not fresh.exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    saved = config_lib.to_json(config_lib.load_config("tiny"))
    (existing / "config.json").write_text(saved)
    assert run([command, "--workdir", str(existing), override, "--no-progress"]) == 2
    assert (existing / "config.json").read_text() == saved and os.listdir(existing) == ["config.json"]


@pytest.mark.parametrize("flags,text", [
    (["--guidance", "nan"], "sample.guidance"),
    (["--visual-guidance", "inf"], "sample.visual_guidance"),
    (["--steps", "0"], "sample.steps"),
    (["--strength", "2"], "sample.strength"),
    (["--prompt", ""], "empty"),
    (["--prompt", "   "], "empty"),
    (["--shape", "9x32"], "--shape"),
])
def test_generate_refuses_bad_requests_before_loading(flags, text, tmp_path, capsys):
    """No run folder exists here: each refusal comes before any model or checkpoint is read."""
    argv = ["generate", "--config", "tiny", "--workdir", str(tmp_path / "run"), "--no-progress"]
    if "--prompt" not in flags:
        argv += ["--prompt", "the digit 3"]
    assert run(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_image_to_video_fields_are_checked():
    """Wan 2.1 I2V's DiT fields, which only imported runs carry (None: off)."""
    cfg = _cfg()
    cfg.dit.in_channels, cfg.dit.image_dim, cfg.dit.image_pos_len = None, None, None
    validate_config(cfg)
    cfg.dit.image_pos_len = 6
    with pytest.raises(ConfigError, match="dit.image_pos_len.*image_dim is not"):
        validate_config(cfg)
    cfg.dit.image_pos_len, cfg.dit.in_channels = None, 0
    with pytest.raises(ConfigError, match="dit.in_channels"):
        validate_config(cfg)
