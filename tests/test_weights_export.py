"""Weight export (issue 18): our streaming safetensors writer, ``export_safetensors`` of a run's models
under our own names, and ``export_diffusers``, the inverse of ``import-weights``: the tiny Wan 2.1
pipeline of ``tests/fixtures/wan/tiny/`` imported and exported again is bitwise the fixture.

No torch here: the check that diffusers / transformers load the exported folder runs in a child
process, and only where the ``peer`` extra (torch, diffusers) is installed."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from sora_jax import config as config_lib
from sora_jax.errors import StageError
from sora_jax.interop import weights_export
from sora_jax.interop.diffusers_import import import_diffusers
from sora_jax.interop.run_weights import config_sha256, flat_arrays, load_run_models
from sora_jax.interop.weights_export import export_diffusers, export_safetensors
from sora_jax.models import weight_map as wm
from sora_jax.safetensors_files import SafetensorsReader, TensorSpec, write_safetensors, write_sharded
from sora_jax.train.run_folder import read_config, save_config

FIX = pathlib.Path(__file__).parent / "fixtures" / "wan"
TINY = FIX / "tiny"


def _host(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(x)) for k, x in flat_arrays(model)}


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------ safetensors writer


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        "i32": np.arange(-7, 5, dtype=np.int32).reshape(3, 4),
        "scalar": np.asarray(2.5, np.float32),
        "empty": np.zeros((0, 3), np.int8),
        "u8": np.arange(5, dtype=np.uint8),
    }


def test_writer_round_trip(tmp_path):
    t = _tensors()
    f = tmp_path / "x.safetensors"
    meta = {"format": "sora-jax", "step": "7"}
    size = write_safetensors(f, t.items(), meta)
    assert size == f.stat().st_size
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")  # padded with spaces, as the library pads
    assert json.loads(raw[8:8 + n])["__metadata__"] == meta
    # the library reads it (numpy has no bfloat16: safe_open per tensor for the rest)
    with safe_open(str(f), "np") as g:
        assert g.metadata() == meta and set(g.keys()) == set(t)
        for k in t:
            if k != "bf16":
                assert _bitwise_equal(g.get_tensor(k), t[k]), k
    # load_file reads whole files into numpy, which has no bfloat16: the rest through it
    plain = {k: v for k, v in t.items() if k != "bf16"}
    write_safetensors(tmp_path / "plain.safetensors", plain.items())
    lib = load_file(str(tmp_path / "plain.safetensors"))
    assert set(lib) == set(plain) and all(_bitwise_equal(lib[k], plain[k]) for k in plain)
    r = SafetensorsReader(f)
    assert set(r) == set(t)
    for k in t:
        assert _bitwise_equal(r[k], t[k]), k
    # every tensor starts aligned to its item size (largest items first)
    offsets = {k: info.offset for k, info in r.info.items()}
    assert all(offsets[k] % t[k].dtype.itemsize == 0 for k in t)


def test_writer_checks_what_it_fetches(tmp_path):
    ok = TensorSpec("a", (2,), np.dtype(np.float32), lambda: np.zeros(2, np.float32))
    bad = TensorSpec("b", (3,), np.dtype(np.float32), lambda: np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="tensor b: fetched"):
        write_safetensors(tmp_path / "a.safetensors", [ok, bad])
    with pytest.raises(ValueError, match="duplicated"):
        write_safetensors(tmp_path / "b.safetensors", [ok, ok])
    with pytest.raises(TypeError, match="str to str"):
        write_safetensors(tmp_path / "c.safetensors", [ok], {"step": 3})
    with pytest.raises(ValueError, match="no safetensors name"):
        write_safetensors(tmp_path / "d.safetensors", [("c", np.zeros(2, np.complex64))])


def test_writer_fetches_one_tensor_at_a_time(tmp_path):
    """The header is written from specs alone; each tensor is fetched when its turn comes."""
    log = []

    def spec(k):
        def fetch():
            log.append(k)
            return np.full((4,), len(log), np.float32)
        return TensorSpec(k, (4,), np.dtype(np.float32), fetch)

    write_safetensors(tmp_path / "x.safetensors", [spec("b"), spec("a"), spec("c")])
    assert log == ["b", "a", "c"]  # the order given (one item size)
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert [float(r[k][0]) for k in ("b", "a", "c")] == [1.0, 2.0, 3.0]


def test_sharding_and_index(tmp_path):
    t = {f"w{i}": np.full((10,), i, np.float32) for i in range(5)}  # 40 bytes each
    one = tmp_path / "one"
    one.mkdir()
    got = write_sharded(one, t.items(), max_shard_bytes=1000, metadata={"m": "1"})
    assert got["files"] == ["model.safetensors"] and got["index"] is None
    assert sorted(os.listdir(one)) == ["model.safetensors"]
    many = tmp_path / "many"
    many.mkdir()
    got = write_sharded(many, t.items(), prefix="diffusion_pytorch_model", max_shard_bytes=80, metadata={"m": "1"})
    names = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert got["files"] == names and got["bytes"] == 200 and got["tensors"] == 5
    index = json.loads((many / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 200}
    assert index["weight_map"] == {"w0": names[0], "w1": names[0], "w2": names[1], "w3": names[1], "w4": names[2]}
    for name in names:
        with safe_open(str(many / name), "np") as g:
            assert g.metadata() == {"m": "1"}
    r = SafetensorsReader(many)  # the folder reads back through its index
    assert {k: float(r[k][0]) for k in r} == {k: float(v[0]) for k, v in t.items()}
    # a tensor over the limit gets a shard of its own
    big = tmp_path / "big"
    big.mkdir()
    got = write_sharded(big, [("a", np.zeros(4, np.float32)), ("b", np.zeros(100, np.float32)),
                              ("c", np.zeros(4, np.float32))], max_shard_bytes=50)
    assert len(got["files"]) == 3


# ------------------------------------------------------------------------- export_safetensors


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A Wan run folder made cheaply: the tiny fixture pipeline imported (no training)."""
    run = str(tmp_path_factory.mktemp("export") / "run")
    import_diffusers(TINY, run)
    return run, read_config(run)


@pytest.fixture(scope="module")
def restored(imported):
    run, cfg = imported
    return {name: _host(rm.model) for name, rm in load_run_models(cfg, run).items()}


def test_export_safetensors_is_the_restored_models_bitwise(imported, restored, tmp_path):
    run, cfg = imported
    out = str(tmp_path / "st")
    report = export_safetensors(cfg, run, out)
    assert not os.path.exists(out + ".partial")
    assert set(report["models"]) == set(restored) == {"dit", "vae", "text_encoder"}
    for name, arrays in restored.items():
        folder = pathlib.Path(out) / name
        r = SafetensorsReader(folder)
        assert set(r) == set(arrays)  # every array, the VAE's latent statistics included
        assert "latent_shift" in r or name != "vae"
        for k, a in arrays.items():
            assert _bitwise_equal(r[k], a), (name, k)
        rep = report["models"][name]
        assert rep["tensors"] == len(arrays) and rep["bytes"] == r.nbytes
        assert [f["name"] for f in rep["files"]] == ["model.safetensors"]
        with safe_open(str(folder / "model.safetensors"), "np") as g:
            meta = g.metadata()
        assert meta == rep["provenance"]
        assert meta["format"] == "sora-jax" and meta["model"] == name and meta["step"] == "0"
        assert meta["config_sha256"] == config_sha256(cfg) and len(meta["checkpoint_sha256"]) == 64
        assert meta["weights"] == ("raw" if name == "dit" else "model") and meta["dtype"] == "float32"
    dit_cfg = json.loads((pathlib.Path(out) / "dit" / "config.json").read_text())
    assert dit_cfg["hidden_size"] == cfg.dit.hidden_size and dit_cfg["latent_channels"] == 4
    assert (dit_cfg["in_dim"], dit_cfg["out_dim"], dit_cfg["patch"]) == (16, 16, [1, 2, 2])
    assert json.loads((pathlib.Path(out) / "vae" / "config.json").read_text())["kind"] == "wan"
    assert json.loads((pathlib.Path(out) / "text_encoder" / "config.json").read_text())["encoder"] == "umt5"


def test_export_safetensors_bfloat16_casts_and_shards(imported, restored, tmp_path):
    run, cfg = imported
    out = str(tmp_path / "bf16")
    report = export_safetensors(cfg, run, out, dtype="bfloat16", max_shard_bytes=20_000)
    for name, arrays in restored.items():
        r = SafetensorsReader(pathlib.Path(out) / name)
        for k, a in arrays.items():
            assert _bitwise_equal(r[k], a.astype(ml_dtypes.bfloat16)), (name, k)
        assert report["models"][name]["provenance"]["dtype"] == "bfloat16"
    files = [f["name"] for f in report["models"]["vae"]["files"]]
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    # integer tensors are never cast
    assert weights_export._out_dtype(np.int32, np.dtype(ml_dtypes.bfloat16)) == np.int32
    with pytest.raises(StageError, match="dtype"):
        export_safetensors(cfg, run, str(tmp_path / "f16"), dtype="float16")
    assert not os.path.exists(tmp_path / "f16")


# --------------------------------------------------------------------------- export_diffusers


def _check_against_fixture(exported: pathlib.Path, source: pathlib.Path, components=("transformer", "vae",
                                                                                       "text_encoder")):
    for c in components:
        ref, got = SafetensorsReader(source / c), SafetensorsReader(exported / c)
        assert set(got) == set(ref), (c, set(got) ^ set(ref))
        for k in ref:
            assert _bitwise_equal(got[k], ref[k]), (c, k)


def test_export_diffusers_round_trip(imported, restored, tmp_path):
    """import -> export is the fixture bitwise (keys, shapes, values, configs), sharded or not, and
    importing the export gives the first import's parameters bitwise."""
    run, cfg = imported
    out = tmp_path / "wan"
    report = export_diffusers(cfg, run, str(out), max_shard_bytes=30_000)
    assert not os.path.exists(str(out) + ".partial")
    _check_against_fixture(out, TINY)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (out / "text_encoder" / "model.safetensors.index.json").is_file()
    assert report["pipeline"] == "WanPipeline" and not report["not_exported"]
    for name in ("transformer", "vae", "text_encoder"):
        meta = report["components"][name]["provenance"]
        assert meta["format"] == "pt" and meta["exporter"] == "sora-jax" and meta["config_sha256"] == config_sha256(cfg)
    # configs: what the fixture says, but for the two fields no run records
    for c in ("transformer", "vae"):
        ours = json.loads((out / c / "config.json").read_text())
        ref = json.loads((TINY / c / "config.json").read_text())
        diff = {k for k in set(ours) | set(ref) if ours.get(k) != ref.get(k)}
        assert diff <= {"rope_max_seq_len"}, (c, diff)
    te = json.loads((out / "text_encoder" / "config.json").read_text())
    ref = json.loads((TINY / "text_encoder" / "config.json").read_text())
    for k in ("d_ff", "d_kv", "d_model", "num_heads", "num_layers", "vocab_size", "feed_forward_proj",
              "relative_attention_num_buckets", "relative_attention_max_distance", "model_type", "architectures"):
        assert te[k] == ref[k], k
    assert json.loads((out / "model_index.json").read_text()) == dict(
        json.loads((TINY / "model_index.json").read_text()), _diffusers_version=weights_export.DIFFUSERS_VERSION)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["flow_shift"] == cfg.flow.max_shift
    assert sched["prediction_type"] == "flow_prediction" and sched["use_flow_sigmas"] is True
    assert sorted(os.listdir(out / "tokenizer")) == sorted(os.listdir(TINY / "tokenizer"))
    # and back: the export imports to the same parameters
    again = str(tmp_path / "again")
    import_diffusers(out, again)
    for name, rm in load_run_models(read_config(again), again).items():
        for k, a in _host(rm.model).items():
            assert _bitwise_equal(a, restored[name][k]), (name, k)


def test_export_diffusers_bfloat16(imported, tmp_path):
    """``dtype="bfloat16"``: every tensor is the fixture's rounded to bfloat16 (the cast commutes
    with the re-layouts), and the text encoder's config says so."""
    run, cfg = imported
    out = tmp_path / "wan"
    report = export_diffusers(cfg, run, str(out), dtype="bfloat16")
    for c in ("transformer", "vae", "text_encoder"):
        ref, got = SafetensorsReader(TINY / c), SafetensorsReader(out / c)
        assert set(got) == set(ref)
        for k in ref:
            assert _bitwise_equal(got[k], ref[k].astype(ml_dtypes.bfloat16)), (c, k)
        assert report["components"][c]["provenance"]["dtype"] == "bfloat16"
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", ["i2v", "flf2v"])
def test_export_diffusers_image_to_video(variant, tmp_path):
    """Wan 2.1 I2V / FLF2V transformers (more input channels than output, image embedder, added K/V,
    FLF2V's image positions) export to their fixture bitwise, without the CLIP encoder the run lacks."""
    from test_import_weights import make_i2v_folder

    src = make_i2v_folder(tmp_path / "src")
    if variant == "flf2v":
        shutil.rmtree(src / "transformer")
        shutil.copytree(FIX / "flf2v" / "transformer", src / "transformer")
    run = str(tmp_path / "run")
    import_diffusers(src, run)
    cfg = read_config(run)
    out = tmp_path / "wan"
    report = export_diffusers(cfg, run, str(out))
    _check_against_fixture(out, src, ("transformer",))
    ours = json.loads((out / "transformer" / "config.json").read_text())
    ref = json.loads((src / "transformer" / "config.json").read_text())
    assert {k for k in set(ours) | set(ref) if ours.get(k) != ref.get(k)} <= {"rope_max_seq_len"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"] == [None, None]
    assert set(report["not_exported"]) == {"image_encoder"}


def test_export_diffusers_unstacks_scanned_blocks(imported, tmp_path):
    """A Wan-shaped DiT trained with ``scan_layers`` (blocks stacked on a leading axis) exports
    block by block: importing the export gives each block's slice back bitwise."""
    from sora_jax.models.factory import build_dit
    from sora_jax.train.checkpoint import Checkpointer

    run, _ = imported
    scanned = str(tmp_path / "scanned")
    shutil.copytree(run, scanned)
    shutil.rmtree(os.path.join(scanned, "dit"))
    cfg = read_config(run)
    cfg.dit.scan_layers = True
    save_config(cfg, scanned)
    dit = build_dit(cfg)  # fresh random weights: not the fixture's
    ckpt = Checkpointer(os.path.join(scanned, "dit", "checkpoints"), max_to_keep=1, async_save=False)
    ckpt.save(0, dit, None, {})
    ckpt.close()
    stacked = _host(dit)
    out = tmp_path / "wan"
    export_diffusers(cfg, scanned, str(out))
    again = str(tmp_path / "again")
    import_diffusers(out, again)
    unrolled = _host(load_run_models(read_config(again), again, names=("dit",))["dit"].model)
    assert len(unrolled) == sum(cfg.dit.depth if k.startswith("blocks.") else 1 for k in stacked)
    for k, a in unrolled.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            assert _bitwise_equal(a, stacked[f"blocks.{rest}"][int(i)]), k
        else:
            assert _bitwise_equal(a, stacked[k]), k


def test_export_diffusers_refuses_a_run_that_is_not_wan(tmp_path):
    wd = tmp_path / "quick"
    wd.mkdir()
    save_config(config_lib.apply_overrides(config_lib.load_config("quickstart"),
                                           ["dit.parameterization='mup'", "dit.mup_base_width=64"]), str(wd))
    cfg = read_config(str(wd))
    out = tmp_path / "out"
    with pytest.raises(StageError) as e:
        export_diffusers(cfg, str(wd), str(out))
    msg = str(e.value)
    for needle in ("dit.adaln is 'per_block'", "dit.qk_norm", "dit.text_null_token", "dit.pooled_text",
                   "dit.final_modulation", "dit.context_flag", "dit.rope_axes_dims", "vae.kind is 'causal'",
                   "text.encoder is 'minilm'", "dit.parameterization is 'mup'", "nothing was written"):
        assert needle in msg, needle
    assert not out.exists() and not pathlib.Path(str(out) + ".partial").exists()


def test_a_failed_export_leaves_nothing(imported, tmp_path, monkeypatch):
    run, cfg = imported

    def boom(_):
        raise OSError("disk full")

    monkeypatch.setattr(weights_export, "_scheduler_config", boom)  # after every component is written
    out = tmp_path / "wan"
    with pytest.raises(OSError, match="disk full"):
        export_diffusers(cfg, run, str(out))
    assert not out.exists() and not pathlib.Path(str(out) + ".partial").exists()


def test_inverse_registry():
    """The registered inverses undo their conversions bitwise; layouts our shape does not determine
    need the reference shape."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4, 1, 2, 2)).astype(np.float32)  # Conv3d patch embedding (out, c, pt, ph, pw)
    t = wm.Target(("x",), ("w",), wm.patch_kernel)
    ours = wm.patch_kernel([w])
    with pytest.raises(ValueError, match="reference shape is needed"):
        wm.invert_target(t, ours)
    (back,) = wm.invert_target(t, ours, {"w": w.shape})
    assert _bitwise_equal(back, w)
    q, k, v = (rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 3, 3))
    t = wm.Target(("qkv",), ("q", "k", "v"), wm.fused_linear_kernel)
    assert all(_bitwise_equal(a, b) for a, b in
               zip(wm.invert_target(t, wm.fused_linear_kernel([q, k, v])), (q, k, v)))
    # unequal parts: from the known shapes
    kk = rng.standard_normal((2, 5)).astype(np.float32)
    got = wm.invert_target(t, wm.fused_linear_kernel([q, kk, v]), {"q": (3, 5), "k": (2, 5), "v": (3, 5)})
    assert [a.shape for a in got] == [(3, 5), (2, 5), (3, 5)] and _bitwise_equal(got[1], kk)
    c = rng.standard_normal((8, 4, 3, 3, 3)).astype(np.float32)
    (back,) = wm.invert_target(wm.Target(("c",), ("c",), wm.conv_kernel), wm.conv_kernel([c]))
    assert _bitwise_equal(back, c)
    # the whole-map form: one target at a time, (reference key, array) in source order
    got = list(wm.invert([wm.Target(("p",), ("w",), wm.patch_kernel), t],
                         {("p",): wm.patch_kernel([w]), ("qkv",): wm.fused_linear_kernel([q, k, v])}, {"w": w.shape}))
    assert [key for key, _ in got] == ["w", "q", "k", "v"]
    assert all(_bitwise_equal(a, b) for (_, a), b in zip(got, (w, q, k, v)))
    z = wm.Target(("z",), (), wm.zeros((3,)))
    assert wm.invert_target(z, np.zeros(3, np.float32)) == []
    with pytest.raises(ValueError, match="not zero"):
        wm.invert_target(z, np.ones(3, np.float32))


# --------------------------------------------------- the reference libraries load the export

_PEER = r"""
import json, sys
import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file
from transformers import UMT5EncoderModel

src, out, bf16 = sys.argv[1:4]
res = {}
torch.manual_seed(0)
x, t, text = torch.randn(1, 4, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 32)
video = torch.randn(1, 3, 5, 16, 16)
for cls, name, run in ((WanTransformer3DModel, "transformer", lambda m: m(x, t, text).sample),
                       (AutoencoderKLWan, "vae", lambda m: m(video).sample),
                       (UMT5EncoderModel, "text_encoder",
                        lambda m: m(input_ids=torch.tensor([[5, 9, 17, 1]])).last_hidden_state)):
    a = cls.from_pretrained(f"{src}/{name}").eval()
    b, info = cls.from_pretrained(f"{out}/{name}", output_loading_info=True)
    with torch.no_grad():
        diff = float((run(a) - run(b.eval())).abs().max())
    res[name] = dict(info={k: sorted(map(str, v)) for k, v in info.items()}, diff=diff)
res["bf16"] = {k: str(v.dtype) for k, v in load_file(bf16).items()}
print(json.dumps(res))
"""


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("torch") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="needs the peer extra (torch, diffusers, transformers)")
def test_reference_libraries_load_the_export(imported, tmp_path):
    """diffusers' WanTransformer3DModel / AutoencoderKLWan and transformers' UMT5EncoderModel load the
    exported folders with no missing, unexpected or mismatched key and compute what the fixture's
    folders compute; safetensors' torch reader reads our bfloat16 file. In a child process, so this
    process never imports torch."""
    run, cfg = imported
    out = tmp_path / "wan"
    export_diffusers(cfg, run, str(out))
    bf16 = tmp_path / "bf16.safetensors"
    write_safetensors(bf16, [("w", np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)),
                             ("i", np.arange(3, dtype=np.int32))])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _PEER, str(TINY), str(out), str(bf16)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("transformer", "vae", "text_encoder"):
        assert all(not v for v in res[name]["info"].values()), (name, res[name]["info"])
        assert res[name]["diff"] == 0.0, (name, res[name]["diff"])
    assert res["bf16"] == {"w": "torch.bfloat16", "i": "torch.int32"}
