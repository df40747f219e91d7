"""Config files and command-line overrides."""

import pytest

from sora_jax.config import ConfigError, apply_overrides, from_json, load_config, to_json


def test_quickstart_config_loads_and_overrides_apply():
    cfg = load_config("configs/quickstart.py")
    apply_overrides(cfg, ["dit_train.steps=7", "dit.patch=(1, 1, 1)", "flow.logit_std=2",
                          "dit.attention_backend=cudnn"])
    assert cfg.dit_train.steps == 7
    assert cfg.dit.patch == (1, 1, 1)
    assert cfg.flow.logit_std == 2.0 and isinstance(cfg.flow.logit_std, float)
    assert cfg.dit.attention_backend == "cudnn"


@pytest.mark.parametrize("override, message", [
    ("dit.nope=1", "unknown config key 'dit.nope'"),
    ("nothere.steps=1", "unknown config key 'nothere'"),
    ("dit_train.steps=many", "bad value for config key 'dit_train.steps'"),
    ("dit_train.steps", "key=value"),
])
def test_bad_overrides_are_named(override, message):
    cfg = load_config("configs/tiny.py")
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/does_not_exist.py")


def test_json_round_trip_keeps_tuples():
    cfg = load_config("configs/tiny.py")
    back = from_json(to_json(cfg))
    assert back.dit.patch == cfg.dit.patch
    assert back.vae.channel_mults == cfg.vae.channel_mults
    assert back.dit_train.steps == cfg.dit_train.steps
