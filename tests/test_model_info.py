"""The DiT ladder's sizes: the DiT paper's parameter table, closed forms, XLA's FLOP count."""

import jax
import numpy as np
import pytest
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.models.info import model_info
from sora_jax.models.dit import DiT, dit_param_count_analytic

# Peebles & Xie 2023, Table 1 (class-conditional, patch 2 on 32x32x4 latents), in millions
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("size", sorted(PAPER_PARAMS_M))
def test_class_conditional_ladder_matches_the_dit_paper(size):
    info = model_info(config_lib.load_config(f"configs/dit_ladder.py:{size}-class"))
    assert info["params"] == info["params_analytic"]
    assert info["params"] / 1e6 == pytest.approx(PAPER_PARAMS_M[size], rel=0.01)
    assert info["seq_len"] == 256  # 32x32 latents, patch 2


@pytest.mark.parametrize("kw", [
    dict(hidden_size=64, depth=2, num_heads=4),
    dict(hidden_size=48, depth=3, num_heads=3, qk_norm=False, mlp_ratio=2.5),
    dict(hidden_size=64, depth=2, num_heads=4, num_classes=10, pos_embed="sincos", qk_norm=False),
    dict(hidden_size=96, depth=1, num_heads=2, mlp_ratio=8960 / 1536),
    dict(hidden_size=64, depth=3, num_heads=4, adaln="single"),
    dict(hidden_size=64, depth=2, num_heads=4, num_classes=10, adaln="single"),
    # Wan 2.1's options (sora_jax.models.wan_dit), each alone and all together
    dict(hidden_size=48, depth=2, num_heads=4, qk_norm="across_heads"),
    dict(hidden_size=48, depth=2, num_heads=4, text_null_token=False, pooled_text=False),
    dict(hidden_size=48, depth=2, num_heads=4, final_modulation="table", context_flag=False),
    dict(hidden_size=48, depth=2, num_heads=2, adaln="single", qk_norm="across_heads", text_null_token=False,
         pooled_text=False, final_modulation="table", context_flag=False, rope_axes_dims=(8, 8, 8)),
])
def test_closed_form_parameter_count_is_exact(kw):
    model = nnx.eval_shape(lambda: DiT(in_dim=12, rngs=nnx.Rngs(0), **kw))
    counted = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    assert counted == dit_param_count_analytic(in_dim=12, **kw)


@pytest.mark.parametrize("variant, adaln", [("", "per_block"), ("-class", "per_block"), ("", "single")])
def test_analytic_flops_agree_with_xla_cost_analysis(variant, adaln):
    cfg = config_lib.load_config(f"configs/dit_ladder.py:S{variant}")
    cfg.dit.update(hidden_size=128, depth=2, num_heads=4, adaln=adaln)
    info = model_info(cfg, xla=True)
    # matmuls are nearly all of it; XLA adds the elementwise work (norms, softmax, GELU)
    assert 1.0 <= info["xla_over_analytic"] < 1.06


def test_wan_shaped_configs():
    info = model_info(config_lib.load_config("configs/dit_ladder.py:wan-1.3b"))
    assert (info["hidden_size"], info["depth"], info["num_heads"]) == (1536, 30, 12)
    # shared timestep modulation (adaLN-single), as Wan: per-block adaLN would add 6 h^2 x 30
    assert info["adaln"] == "single" and 1.3e9 <= info["params"] < 1.5e9
    big = model_info(config_lib.load_config("configs/dit_ladder.py:wan-14b"))
    assert (big["hidden_size"], big["depth"], big["num_heads"]) == (5120, 40, 40)
    assert 14e9 <= big["params"] < 14.5e9
    model_cfg = config_lib.load_config("configs/dit_ladder.py:wan-14b")
    assert round(model_cfg.dit.hidden_size * model_cfg.dit.mlp_ratio) == 13824
    with pytest.raises(ValueError, match="unknown DiT size"):
        config_lib.load_config("configs/dit_ladder.py:XXL")


def test_cli_model_info_prints_params_and_flops(capsys):
    import json

    from sora_jax.cli import run

    assert run(["model-info", "--config", "configs/dit_ladder.py:B-class", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == out["params_analytic"]
    assert out["params"] / 1e6 == pytest.approx(130, rel=0.01)
    # DiT paper (Peebles & Xie 2023, Table 4): DiT-B/2 costs 23.01 G multiply-adds per 256-token
    # image, with the timestep conditioning run once per image, as condition_groups does
    assert out["flops_per_token"] * 256 / 2 == pytest.approx(23.01e9, rel=0.03)
