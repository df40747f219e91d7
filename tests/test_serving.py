"""``sora-jax export --format stablehlo`` and the serving runtime (:mod:`sora_jax.serving`): a fresh
process that imports no model code turns the export into the same videos ``generate`` makes from
the run itself, for requests of several shapes served by one artifact."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.cli import run as cli_run
from sora_jax.inference.generate import Generator, Request
from sora_jax.interop.stablehlo_export import stable_custom_calls
from sora_jax.train.run_folder import read_config

SHAPES = [(9, 32, 32), (1, 32, 48), (5, 16, 32)]  # (frames, height, width): video, image, other size
PROMPTS = ["a digit 7 moves left", "the digit 3", "two digits bounce"]

SERVE = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from sora_jax.serving import ServingModel
from sora_jax.serving.runtime import Request
m = ServingModel(sys.argv[1])
spec = json.loads(sys.argv[2])
videos = m.generate([Request(p, *s) for p, s in zip(spec["prompts"], spec["shapes"])], seed=spec["seed"],
                    steps=spec["steps"], guidance=spec["guidance"], solver=spec["solver"])
np.savez(sys.argv[3], *videos)
model_code = [k for k in sys.modules if k.startswith("sora_jax.") and not k.startswith("sora_jax.serving")]
print(json.dumps({"model_code": model_code, "flax": "flax" in sys.modules, "seconds": time.perf_counter() - t0}))
"""


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "shlo")
    code = cli_run(["export", "--workdir", trained_run, "--format", "stablehlo", "--out", out,
                    "--platforms", "cpu,cuda,tpu", "--solvers", "euler,unipc"])
    assert code == 0
    return trained_run, out


def test_export_folder(exported):
    _, out = exported
    m = json.loads(pathlib.Path(out, "manifest.json").read_text())
    assert set(m["programs"]) == {"denoiser", "sampler_euler", "sampler_unipc", "text_encoder", "decoder"}
    assert m["platforms"] == ["cpu", "cuda", "tpu"]
    used = {c for p in m["programs"].values() for c in p["custom_calls"]}
    assert used <= stable_custom_calls(), used - stable_custom_calls()
    for name, w in m["weights"].items():
        assert os.path.isfile(os.path.join(out, w["file"])), name
    assert m["provenance"]["dit_checkpoint_sha256"] and m["provenance"]["config_sha256"]
    assert os.path.isfile(os.path.join(out, "README.md")) and os.path.isfile(os.path.join(out, "export.json"))


@pytest.mark.parametrize("solver", [pytest.param("euler", marks=pytest.mark.slow), "unipc"])
def test_serving_in_a_fresh_process_equals_generate(exported, tmp_path, solver):
    run, out = exported
    cfg = read_config(run)
    gen = Generator(cfg, run)
    kw = dict(seed=11, steps=3, guidance=4.0, solver=solver)
    latents = gen.sample_latents([Request(p, *s) for p, s in zip(PROMPTS, SHAPES)], **kw)
    want = [gen.codec.decode(z[None])[0] for z in latents]
    spec = dict(prompts=PROMPTS, shapes=SHAPES, **kw)
    res = subprocess.run([sys.executable, "-c", SERVE, out, json.dumps(spec), str(tmp_path / "v.npz")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["model_code"] == [] and not info["flax"]  # jax, numpy, safetensors, tokenizers only
    got = np.load(tmp_path / "v.npz")
    for i, (w, s) in enumerate(zip(want, SHAPES)):
        assert got[f"arr_{i}"].shape == (*s, 3)
        assert np.abs(got[f"arr_{i}"] - w).max() < 1e-5


def test_bad_input_is_one_message_and_no_folder(trained_run, tmp_path, capsys):
    out = tmp_path / "x"
    base = ["export", "--workdir", trained_run, "--out", str(out)]
    assert cli_run(base + ["--format", "stablehlo", "--step", "12345"]) == 2
    assert "step 12345" in capsys.readouterr().err and not out.exists()
    assert cli_run(base + ["--format", "diffusers"]) == 2  # a MiniLM / per-block-adaLN run is not Wan's
    assert "Wan" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):  # argparse: one line naming the choices
        cli_run(base + ["--format", "onnx"])
    out.mkdir()
    assert cli_run(base + ["--format", "safetensors"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_run(base + ["--format", "safetensors", "--overwrite"]) == 0
    assert (out / "dit").is_dir()
    # a corrupt checkpoint: every array file of the DiT's saved weights truncated
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    for root, _, files in os.walk(broken / "dit" / "checkpoints"):
        for f in files:
            if "ocdbt" in root or f.startswith("d") or f.endswith(".data"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    out2 = tmp_path / "y"
    assert cli_run(["export", "--workdir", str(broken), "--out", str(out2), "--format", "stablehlo"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read (corrupt" in err.splitlines()[0] and not out2.exists()
    assert not (tmp_path / "y.partial").exists()
