"""umT5 text encoder of Wan 2.1 (sora_jax.models.umt5) against transformers / diffusers references.

The fixtures under tests/fixtures/wan/ were written by tests/fixtures/wan/ref_umt5.py with
torch 2.13 CPU, transformers 5.25 (UMT5EncoderModel, a tiny random-weight config) and diffusers 0.42
(WanPipeline._get_t5_prompt_embeds); no torch is imported here.
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sora_jax.models import umt5

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "wan"
ATOL = 1e-5


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "umt5_io.npz"))


@pytest.fixture(scope="module")
def prompts_ref():
    return dict(np.load(FIXTURES / "umt5_prompts.npz"))


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(FIXTURES / "tiny" / "text_encoder" / "model.safetensors"))


@pytest.fixture(scope="module")
def cfg():
    return umt5.UMT5Config.from_json(FIXTURES / "tiny" / "text_encoder" / "config.json")


def _abstract(cfg):
    return nnx.eval_shape(lambda: umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model(cfg, tensors):
    return umt5.load_umt5_state(_abstract(cfg), tensors)


def _run(model, io):
    return np.asarray(model(jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])))


# ----------------------------------------------------------------------------- config


def test_from_json_reads_fixture_config(cfg):
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (128, 32, 8, 48, 2, 4)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.layer_norm_epsilon == 1e-6 and cfg.feed_forward_proj == "gated-gelu" and cfg.pad_token_id == 0


def test_defaults_are_umt5_xxl():
    c = umt5.UMT5Config()
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads) == (256384, 4096, 64, 10240, 24, 64)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.layer_norm_epsilon == 1e-6 and c.feed_forward_proj == "gated-gelu"


def test_from_json_refuses_other_variants(tmp_path):
    raw = json.loads((FIXTURES / "tiny" / "text_encoder" / "config.json").read_text())
    for change, word in (({"model_type": "t5"}, "t5"), ({"feed_forward_proj": "relu"}, "relu")):
        p = tmp_path / "config.json"
        p.write_text(json.dumps({**raw, **change}))
        with pytest.raises(ValueError, match=word):
            umt5.UMT5Config.from_json(p)


# ----------------------------------------------------------------------------- buckets


def test_relative_position_bucket_hand_computed():
    # Bidirectional, 32 buckets, max distance 128: 16 per direction, exact below 8, then
    # 8 + trunc(log(n / 8) / log(128 / 8) * 8), capped at 15; keys after the query add 16.
    rel = np.array([0, -1, 1, -7, 7, -8, 8, -15, -16, 16, -31, -32, -64, -127, -128, 128, -1000, 1000])
    want = np.array([0, 1, 17, 7, 23, 8, 24, 9, 10, 26, 11, 12, 14, 15, 15, 31, 15, 31])
    np.testing.assert_array_equal(umt5.relative_position_bucket(rel), want)
    np.testing.assert_array_equal(np.asarray(umt5.relative_position_bucket(jnp.asarray(rel))), want)
    # Unidirectional: 32 buckets for the past (r <= 0), exact below 16, then
    # 16 + trunc(log(n / 16) / log(8) * 16), capped at 31; the future is bucket 0.
    rel = np.array([5, 0, -5, -16, -32, -128, -5000])
    want = np.array([0, 0, 5, 16, 21, 31, 31])
    np.testing.assert_array_equal(umt5.relative_position_bucket(rel, bidirectional=False), want)


def test_relative_position_bucket_matches_transformers(io):
    pos, ref = io["bucket_positions"], io["bucket_values"]
    np.testing.assert_array_equal(umt5.relative_position_bucket(pos), ref)
    np.testing.assert_array_equal(np.asarray(umt5.relative_position_bucket(jnp.asarray(pos))), ref)


# ----------------------------------------------------------------------------- parity


def test_last_hidden_state_matches_transformers(model, io):
    out = _run(model, io)
    assert out.shape == (2, 24, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, io["last_hidden_state"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out, io["last_hidden_state_eager"], atol=ATOL, rtol=0)


def test_every_layer_has_its_own_position_bias(cfg, tensors, io):
    # umT5, unlike T5, has a bias per layer: giving layer 1 layer 0's must break parity.
    key = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    assert not np.allclose(tensors[key.format(0)], tensors[key.format(1)])
    swapped = {**tensors, key.format(1): tensors[key.format(0)]}
    out = _run(umt5.load_umt5_state(_abstract(cfg), swapped), io)
    assert np.abs(out - io["last_hidden_state"]).max() > 100 * ATOL


def test_load_umt5_from_folder(io, tensors):
    read = umt5.read_safetensors(FIXTURES / "tiny" / "text_encoder")
    assert set(read) == set(tensors)
    for k, v in tensors.items():
        assert read[k].dtype == v.dtype and read[k].shape == v.shape
        np.testing.assert_array_equal(read[k], v)
    out = _run(umt5.load_umt5(FIXTURES / "tiny" / "text_encoder"), io)
    np.testing.assert_allclose(out, io["last_hidden_state"], atol=ATOL, rtol=0)


def test_read_safetensors_bfloat16_written_by_torch():
    probe = umt5.read_safetensors(FIXTURES / "umt5_bf16_probe.safetensors")["probe"]
    assert probe.dtype == jnp.bfloat16 and probe.shape == (4, 3)
    np.testing.assert_array_equal(probe.astype(np.float32), np.load(FIXTURES / "umt5_bf16_probe.npz")["probe"])


def test_bfloat16_compute_is_close(cfg, tensors, io):
    abstract = nnx.eval_shape(lambda: umt5.UMT5Encoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    out = _run(umt5.load_umt5_state(abstract, tensors), io)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, io["last_hidden_state"], atol=0.1, rtol=0)


# ----------------------------------------------------------------------------- key map


def test_key_map_covers_model_and_checkpoint(cfg, tensors):
    targets = umt5.umt5_key_map(cfg)
    assert len(targets) == 2 + 10 * cfg.num_layers
    ours = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(_abstract(cfg)))}
    ref = {k: v.shape for k, v in tensors.items()}
    assert umt5.weight_map.check_complete(targets, ours, ref, ignored=umt5.UMT5_IGNORED_KEYS) == []


def test_key_map_split_inverts_convert(cfg, tensors):
    for t in umt5.umt5_key_map(cfg):
        back = t.split(t.convert([tensors[s] for s in t.sources]))
        for s, b in zip(t.sources, back):
            np.testing.assert_array_equal(b, tensors[s])


def test_problems_are_all_reported(cfg, tensors):
    q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"
    bias1 = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    extra = "encoder.block.2.layer.0.SelfAttention.q.weight"
    bad = {k: v for k, v in tensors.items() if k != bias1}
    bad[extra] = tensors[q0]
    bad[q0] = tensors[q0][:, :24]
    with pytest.raises(ValueError) as err:
        umt5.load_umt5_state(_abstract(cfg), bad)
    msg = str(err.value)
    assert f"missing reference key {bias1}" in msg
    assert f"unexpected reference key {extra}" in msg
    assert "shape mismatch for layers.0.attn.q.kernel" in msg


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_each_problem_alone(cfg, tensors, case):
    bad = dict(tensors)
    if case == "missing":
        del bad["encoder.final_layer_norm.weight"]
        want = "missing reference key encoder.final_layer_norm.weight"
    elif case == "unexpected":
        bad["decoder.final_layer_norm.weight"] = tensors["encoder.final_layer_norm.weight"]
        want = "unexpected reference key decoder.final_layer_norm.weight"
    else:
        bad["shared.weight"] = np.zeros((127, 32), np.float32)
        want = "shape mismatch for shared.embedding"
    with pytest.raises(ValueError, match=want):
        umt5.load_umt5_state(_abstract(cfg), bad)


def test_tied_embedding_copy(cfg, tensors, io):
    shared = tensors["shared.weight"]
    # Both keys, equal: accepted (the copy is ignored).
    both = {**tensors, "encoder.embed_tokens.weight": shared.copy()}
    np.testing.assert_allclose(_run(umt5.load_umt5_state(_abstract(cfg), both), io), io["last_hidden_state"],
                               atol=ATOL, rtol=0)
    # Only the encoder's copy: it stands in for shared.weight, as transformers ties to either.
    only = {k: v for k, v in both.items() if k != "shared.weight"}
    np.testing.assert_allclose(_run(umt5.load_umt5_state(_abstract(cfg), only), io), io["last_hidden_state"],
                               atol=ATOL, rtol=0)
    # Both, different: transformers would not tie them; refuse.
    diff = {**tensors, "encoder.embed_tokens.weight": shared + 1.0}
    with pytest.raises(ValueError, match="differs from shared.weight"):
        umt5.load_umt5_state(_abstract(cfg), diff)


# ----------------------------------------------------------------------------- prompts


def test_clean_prompt_matches_diffusers(prompts_ref):
    assert [umt5.clean_prompt(str(p)) for p in prompts_ref["prompts"]] == [str(c) for c in prompts_ref["cleaned"]]


def test_prompt_encoding_matches_diffusers(model, prompts_ref):
    enc = umt5.WanPromptEncoder(model, FIXTURES / "tiny" / "tokenizer", max_length=16)
    prompts = [str(p) for p in prompts_ref["prompts"]]
    ids, mask = enc.tokenize(prompts)
    np.testing.assert_array_equal(ids, prompts_ref["input_ids"])
    np.testing.assert_array_equal(mask, prompts_ref["attention_mask"])
    states, lengths = enc.encode(prompts)
    np.testing.assert_array_equal(lengths, prompts_ref["seq_lens"])
    assert states.shape == (2, 16, 32) and states.dtype == np.float32
    np.testing.assert_allclose(states, prompts_ref["prompt_embeds"], atol=ATOL, rtol=0)
    # Beyond each prompt's length: exactly zero (the first prompt is padded, the second truncated).
    assert lengths.tolist() == [13, 16]
    assert not states[0, 13:].any() and np.abs(states[0, :13]).min(axis=-1).all()


def test_prompt_encoding_default_length_512(model, prompts_ref):
    enc = umt5.WanPromptEncoder(model, FIXTURES / "tiny" / "tokenizer" / "tokenizer.json")
    states, lengths = enc(str(prompts_ref["prompts"][0]))
    assert states.shape == (1, 512, 32) and lengths.tolist() == [13]
    assert not states[0, 13:].any()
    # Padding keys are masked and relative positions among real tokens do not change, so the
    # real tokens' states equal the reference's computed with 16-token padding.
    np.testing.assert_allclose(states[0, :13], prompts_ref["prompt_embeds"][0, :13], atol=ATOL, rtol=0)


def test_prompt_encoder_errors(model, cfg):
    with pytest.raises(ValueError, match="max_length"):
        umt5.WanPromptEncoder(model, FIXTURES / "tiny" / "tokenizer", max_length=0)
    with pytest.raises(ValueError, match="pad token"):
        umt5.WanPromptEncoder(model, FIXTURES / "tiny" / "tokenizer", pad_token="<nope>")
    with pytest.raises(FileNotFoundError):
        umt5.WanPromptEncoder(model, FIXTURES / "missing")
    enc = umt5.WanPromptEncoder(model, FIXTURES / "tiny" / "tokenizer", max_length=8)
    with pytest.raises(TypeError):
        enc.tokenize(["a cat", 3])
    states, lengths = enc.encode([])
    assert states.shape == (0, 8, 32) and lengths.shape == (0,)
    small = nnx.eval_shape(lambda: umt5.UMT5Encoder(umt5.UMT5Config(
        vocab_size=10, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="vocabulary"):
        umt5.WanPromptEncoder(small, FIXTURES / "tiny" / "tokenizer").tokenize(["the grass"])
