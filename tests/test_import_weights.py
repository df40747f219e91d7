"""``import-weights``: the tiny Wan 2.1 pipeline folder of ``tests/fixtures/wan/tiny/`` (random
weights in diffusers layout, written by ``tests/fixtures/wan/make_reference.py``) becomes a run
folder whose checkpoints, restored the way ``generate`` restores them, compute what diffusers and
transformers computed on the same weights (``*_io.npz``)."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.cli import run as cli_run  # prepare-data / train-dit, which leave malloc alone
from sora_jax.config_validation import validate_config
from sora_jax.errors import StageError
from sora_jax.inference.latents import load_codec
from sora_jax.interop.diffusers_import import import_diffusers, text_encoder_dir
from sora_jax.models.factory import build_dit, build_umt5
from sora_jax.train.run_folder import read_config, restore

FIX = pathlib.Path(__file__).parent / "fixtures" / "wan"
TINY = FIX / "tiny"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("wan") / "run")
    report = import_diffusers(TINY, run)
    return run, report


def test_run_folder_and_report(imported):
    run, report = imported
    cfg = read_config(run)
    validate_config(cfg)  # the saved config is a valid run config
    assert cfg.vae.kind == "wan" and cfg.text.encoder == "umt5" and cfg.dit.qk_norm == "across_heads"
    assert set(report["components"]) == {"transformer", "vae", "text_encoder"}
    saved = json.loads((pathlib.Path(run) / "import.json").read_text())
    assert saved["params"] == report["params"] == sum(c["params"] for c in report["components"].values())
    # every tensor of the source was read once: bytes agree with the files' headers
    for name, c in saved["components"].items():
        assert c["bytes"] <= sum(f["bytes"] for f in c["files"])
    assert (pathlib.Path(text_encoder_dir(run)) / "tokenizer" / "tokenizer.json").is_file()
    assert not os.path.exists(run + ".partial")


def test_imported_transformer_matches_diffusers(imported):
    from test_wan_dit import _run

    run, _ = imported
    cfg = read_config(run)
    dit = build_dit(cfg)
    restore(dit, os.path.join(run, "dit"), "dit")
    ref = dict(np.load(FIX / "transformer_io.npz"))
    for case in ("1", "2"):
        out = _run(dit, tuple(cfg.dit.patch), ref["x" + case], ref["t" + case], ref["text" + case])
        assert np.abs(out - ref["out" + case]).max() < 2e-5


def test_imported_vae_decodes_and_encodes_as_diffusers(imported):
    run, _ = imported
    cfg = read_config(run)
    codec = load_codec(cfg, run)
    io = dict(np.load(FIX / "vae_io.npz"))
    mean, _ = codec.vae.encode(jnp.asarray(io["video"]))
    assert np.abs(np.asarray(mean) - io["enc_mean"]).max() < 1e-4
    dec = np.asarray(codec.vae.decode(jnp.asarray(io["z"])))
    assert np.abs(dec - io["dec_raw"]).max() < 1e-4
    # latent statistics come from the checkpoint's config (Wan's latents_mean / latents_std)
    np.testing.assert_allclose(codec.shift, cfg.vae.wan.latents_mean, rtol=1e-6)
    np.testing.assert_allclose(codec.scale, cfg.vae.wan.latents_std, rtol=1e-6)


def test_imported_text_encoder_matches_transformers(imported):
    run, _ = imported
    cfg = read_config(run)
    enc = build_umt5(cfg)
    restore(enc, text_encoder_dir(run), "text_encoder")
    io = dict(np.load(FIX / "umt5_io.npz"))
    out = np.asarray(enc(jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])))
    assert np.abs(out - io["last_hidden_state"]).max() < 1e-5


def test_bfloat16_import(tmp_path):
    run = str(tmp_path / "bf16")
    import_diffusers(TINY, run, dtype="bfloat16")
    cfg = read_config(run)
    dit = build_dit(cfg)
    restore(dit, os.path.join(run, "dit"), "dit")
    ref = dict(np.load(FIX / "transformer_io.npz"))
    from test_wan_dit import _run

    err = np.abs(_run(dit, tuple(cfg.dit.patch), ref["x1"], ref["t1"], ref["text1"]) - ref["out1"]).max()
    assert 1e-5 < err < 0.1  # rounded to bfloat16 weights: close, not equal


def test_a_broken_checkpoint_is_one_error_and_nothing_is_written(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    del t["blocks.1.ffn.net.2.bias"]
    t["blocks.0.attn1.to_q.weight"] = t["blocks.0.attn1.to_q.weight"][:, :5]
    t["blocks.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, str(f))
    v = src / "vae" / "diffusion_pytorch_model.safetensors"
    tv = load_file(str(v))
    del tv["decoder.conv_out.bias"]
    save_file(tv, str(v))
    run = tmp_path / "run"
    with pytest.raises(StageError) as e:
        import_diffusers(src, str(run))
    msg = str(e.value)
    for needle in ("transformer: missing reference key blocks.1.ffn.net.2.bias",
                   "transformer: unexpected reference key blocks.9.extra.weight",
                   "transformer: shape mismatch for blocks.0.attn.qkv.kernel",
                   "vae: missing reference key decoder.conv_out.bias", "nothing was written"):
        assert needle in msg
    assert not run.exists() and not pathlib.Path(str(run) + ".partial").exists()


def test_refusals(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(StageError, match="not empty"):
        import_diffusers(TINY, str(tmp_path / "busy"))
    with pytest.raises(StageError, match="dtype"):
        import_diffusers(TINY, str(tmp_path / "a"), dtype="float8")
    src = tmp_path / "i2v"
    shutil.copytree(TINY, src)
    c = json.loads((src / "transformer" / "config.json").read_text())
    (src / "transformer" / "config.json").write_text(json.dumps(dict(c, image_dim=1280)))
    with pytest.raises(StageError, match="image_dim"):
        import_diffusers(src, str(tmp_path / "b"))
    with pytest.raises(StageError, match="model_index.json"):
        import_diffusers(tmp_path / "nowhere", str(tmp_path / "c"))


def test_cli(tmp_path):
    """The subcommand, in a process of its own as users run it (it tunes that process's malloc:
    sora_jax.train.host_memory.map_large_allocations)."""
    import subprocess
    import sys

    run = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "sora_jax.cli", "import-weights", "--from", "diffusers", str(TINY), "--workdir", run]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    out = json.loads(first.stdout)
    assert out["params"] > 0 and out["workdir"] == run and os.path.isfile(os.path.join(run, "config.json"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = subprocess.run(cmd[:5] + ["onnx", str(TINY), "--workdir", str(tmp_path / "x")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "the formats read are: diffusers" in bad.stderr


def test_generate_from_the_imported_run(imported):
    """An imported Wan run samples through the Generator: umT5 prompts padded to 512 tokens as Wan
    pads them, CFG against the negative prompt (the DiT has no null text), the config's UniPC, the
    Wan VAE's decode."""
    from sora_jax.config import set_value
    from sora_jax.inference.generate import Generator

    run, _ = imported
    cfg = read_config(run)
    gen = Generator(cfg, run)
    kw = dict(frames=5, height=16, width=16, seed=3, guidance=5.0, steps=3, solver=cfg.sample.solver)
    assert kw["solver"] == "unipc"
    a = gen(["a red car"], **kw)[0]
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, gen(["a red car"], **kw)[0])  # deterministic
    set_value(cfg, "sample.negative_prompt", "blurry")
    b = Generator(cfg, run)(["a red car"], **kw)[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # the negative prompt is used


def test_sharded_checkpoint_with_index(tmp_path):
    """A transformer saved as shards plus ``diffusion_pytorch_model.safetensors.index.json`` (how
    the released 14B ships) imports to the same parameters as the single file."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    folder = src / "transformer"
    t = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(t)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: t[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    run = str(tmp_path / "run")
    report = import_diffusers(src, run)
    assert len(report["components"]["transformer"]["files"]) == 2
    cfg = read_config(run)
    dit = build_dit(cfg)
    restore(dit, os.path.join(run, "dit"), "dit")
    from test_wan_dit import _run

    ref = dict(np.load(FIX / "transformer_io.npz"))
    assert np.abs(_run(dit, tuple(cfg.dit.patch), ref["x1"], ref["t1"], ref["text1"]) - ref["out1"]).max() < 2e-5


def test_sampling_matches_diffusers_wan_pipeline(imported):
    """Text-to-video from the imported run equals diffusers' ``WanPipeline`` on the same weights,
    starting noise and time grid (Euler, shift 3.0, CFG 5.0 against the empty negative prompt;
    ``tests/fixtures/wan/ref_pipeline.py``): the prompt encoding, the guidance, the steps and the
    VAE decode all agree."""
    from sora_jax.inference.generate import Generator, Request

    run, _ = imported
    ref = dict(np.load(FIX / "pipeline_io.npz"))
    gen = Generator(read_config(run), run)
    (z,) = gen.sample_latents([Request("a red car on a road", 9, 32, 32, noise=ref["noise"])], seed=0,
                              guidance=5.0, steps=4, solver="euler")
    assert np.abs(z - ref["latents"]).max() < 1e-4
    video = gen.codec.decode(z[None])[0]
    assert np.abs(video - ref["video"]).max() < 1e-4


@pytest.mark.slow  # about 35 s; the restore it relies on is test_restore_without_optimizer_state's
def test_fine_tune_the_imported_run(tmp_path):
    """train-dit continues from imported weights as they are: a fresh optimizer (the import has
    no optimizer state), latents and umT5 text states encoded with the run's own models, and a
    checkpoint that then holds the optimizer too."""
    from sora_jax.train.checkpoint import Checkpointer

    run = str(tmp_path / "ft")
    import_diffusers(TINY, run)
    small = ["--config.dit_train.row_length=256", "--config.dit_train.max_tokens=256",
             "--config.dit_train.steps=2", "--config.dit_train.checkpoint_every=2", "--config.dit_train.warmup_steps=1",
             "--config.data.mnist_train=8", "--config.data.clips_train=2", "--config.data.mnist_eval=4",
             "--config.data.heldout_prompts=2", "--config.data.clips_eval=2"]
    assert cli_run(["prepare-data", "--workdir", run, "--no-progress", *small]) == 0
    before = build_dit(read_config(run))
    restore(before, os.path.join(run, "dit"), "dit")
    assert cli_run(["train-dit", "--workdir", run, "--no-progress", *small]) == 0
    ckpt = Checkpointer(os.path.join(run, "dit", "checkpoints"), async_save=False)
    assert ckpt.latest_step() == 2 and ckpt.has_item(2, "optimizer")
    after = build_dit(read_config(run))
    restore(after, os.path.join(run, "dit"), "dit")
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(nnx.state(before, nnx.Param)), jax.tree.leaves(nnx.state(after, nnx.Param)))]
    assert max(moved) > 0 and all(np.isfinite(moved))


def test_restore_without_optimizer_state(imported):
    """An imported checkpoint has weights only: restoring it with an optimizer keeps the fresh
    optimizer and says so (``optimizer_restored`` False), so train-dit can start from it."""
    import optax

    from sora_jax.train.checkpoint import Checkpointer

    run, _ = imported
    dit = build_dit(read_config(run))
    opt = nnx.Optimizer(dit, optax.adam(1e-3), wrt=nnx.Param)
    fresh = jax.tree.map(np.asarray, nnx.state(opt))
    meta = Checkpointer(os.path.join(run, "dit", "checkpoints"), async_save=False).restore(dit, opt)
    assert meta["optimizer_restored"] is False and meta["step"] == 0
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(nnx.state(opt))):
        np.testing.assert_array_equal(a, np.asarray(b))
    ref = dict(np.load(FIX / "transformer_io.npz"))
    from test_wan_dit import _run

    assert np.abs(_run(dit, tuple(read_config(run).dit.patch), ref["x1"], ref["t1"], ref["text1"])
                  - ref["out1"]).max() < 2e-5


def make_i2v_folder(dst: pathlib.Path) -> pathlib.Path:
    """A Wan 2.1 image-to-video pipeline folder at tiny size: ``tiny/`` with the I2V transformer of
    ``tests/fixtures/wan/i2v/`` and the pipeline's CLIP entries in ``model_index.json`` (their
    weights are not imported, so none are written)."""
    shutil.copytree(TINY, dst)
    shutil.rmtree(dst / "transformer")
    shutil.copytree(FIX / "i2v" / "transformer", dst / "transformer")
    index = json.loads((dst / "model_index.json").read_text())
    index.update(_class_name="WanImageToVideoPipeline", image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                 image_processor=["transformers", "CLIPImageProcessor"])
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def test_image_to_video_folder_imports_and_is_refused_where_it_cannot_run(tmp_path):
    from safetensors.numpy import load_file, save_file
    from test_wan_dit import run_i2v

    from sora_jax.inference.generate import Generator
    from sora_jax.models.info import model_info
    from sora_jax.stages import train_dit

    src = make_i2v_folder(tmp_path / "src")
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    t["blocks.0.attn2.norm_added_q.weight"] = np.ones(24, np.float32)  # some I2V checkpoints carry it
    save_file(t, str(f))
    run = str(tmp_path / "run")
    report = import_diffusers(src, run)
    assert set(report["not_imported"]) == {"image_encoder"}
    cfg = read_config(run)
    validate_config(cfg)
    assert (cfg.dit.in_channels, cfg.dit.image_dim, cfg.vae.latent_channels) == (8, 8, 4)
    dit = build_dit(cfg)
    restore(dit, os.path.join(run, "dit"), "dit")
    ref = dict(np.load(FIX / "transformer_i2v_io.npz"))
    assert np.abs(run_i2v(dit, tuple(cfg.dit.patch), ref, "i2v") - ref["i2v_out"]).max() < 2e-5
    info = model_info(cfg)
    assert info["params"] == info["params_analytic"] == report["components"]["transformer"]["params"]
    for call in (lambda: Generator(cfg, run), lambda: train_dit(cfg, run, progress=False)):
        with pytest.raises(StageError, match="image-to-video DiT.*no CLIP image encoder"):
            call()
