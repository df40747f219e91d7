"""The released Wan 2.1 T2V (and I2V-14B transformer) checkpoints' keys and shapes (manifests built
on PyTorch's meta device by ``tests/fixtures/wan/ref_manifests.py``) against our models built from
the same configs, with no weights: every key maps to a parameter of the right shape, and the
parameter counts agree."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import weight_map as wm
from sora_jax.models.dit import DiT
from sora_jax.models.wan_dit import dit_fields, wan_transformer_key_map

MANIFESTS = pathlib.Path(__file__).parent / "fixtures" / "wan" / "manifests"


def _manifest(name):
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def abstract_wan_dit(config):
    fields = dit_fields(config)
    d = dict(fields["dit"])
    patch = d.pop("patch")
    in_channels = d.pop("in_channels") or fields["latent_channels"]
    model = nnx.eval_shape(lambda: DiT(in_dim=in_channels * int(np.prod(patch)),
                                       out_dim=fields["latent_channels"] * int(np.prod(patch)),
                                       rngs=nnx.Rngs(0), dtype=jnp.float32, **d))
    return model, fields


# the 14B manifests take 11-14 s each on 2 cores and run the same code as 1.3B: with the slow tests
@pytest.mark.parametrize("name,params", [("transformer_1_3b", 1_418_996_800),
                                         pytest.param("transformer_14b", 14_288_491_584, marks=pytest.mark.slow),
                                         pytest.param("transformer_i2v_14b", 16_394_878_784, marks=pytest.mark.slow)])
def test_transformer_manifest(name, params):
    m = _manifest(name)
    # the manifest itself: about 1.419B, 14.29B and (I2V, with the image branch) 16.39B
    assert m["params"] == params
    model, fields = abstract_wan_dit(m["config"])
    shapes = wm.param_shapes(model)
    targets = wan_transformer_key_map(fields["dit"])
    assert wm.check_complete(targets, shapes, m["shapes"]) == []
    assert sum(int(np.prod(s)) for s in shapes.values()) == m["params"]


def test_umt5_xxl_manifest():
    from sora_jax.models.umt5 import UMT5_IGNORED_KEYS, UMT5Config, UMT5Encoder, umt5_key_map

    m = _manifest("umt5_xxl")
    cfg = UMT5Config()  # our defaults are umT5-XXL's
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.vocab_size) == (
        m["config"]["d_model"], m["config"]["num_layers"], m["config"]["num_heads"], m["config"]["d_ff"],
        m["config"]["vocab_size"])
    model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    shapes = wm.param_shapes(model)
    assert wm.check_complete(umt5_key_map(cfg), shapes, m["shapes"], ignored=UMT5_IGNORED_KEYS) == []
    assert sum(int(np.prod(s)) for s in shapes.values()) == m["params"]  # 5.68B, the tied table once
