"""Meshes, logical-axis sharding and context parallelism.

The multi-device checks run in one child process with 8 simulated CPU devices
(``tests/multidevice_checks.py``): XLA's device count is fixed when JAX starts, and the rest
of the suite runs on one device.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sora_jax.parallel.axes import DEFAULT_RULES, logical_to_spec, normalize_rules
from sora_jax.parallel.mesh import MeshError, create_mesh, fill_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def multidevice():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_checks.py")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_sharded_train_steps_equal_the_single_device_steps(multidevice):
    assert multidevice["devices"] == 8
    ref = multidevice["reference_losses"]
    assert len(multidevice["meshes"]) == 3
    for name, got in multidevice["meshes"].items():
        np.testing.assert_allclose(got["losses"], ref, rtol=1e-5, err_msg=name)
        assert got["max_param_diff"] < 1e-5, name


def test_scanned_layers_shard_and_match_one_device(multidevice):
    got = multidevice["scan_fsdp4_tensor2"]
    np.testing.assert_allclose(got["losses"], got["reference_losses"], rtol=1e-5)
    assert got["max_param_diff"] < 1e-5
    assert got["fc1_spec"] == "P(None, 'fsdp', 'tensor')"  # the layers axis stays whole


def test_parameters_are_sharded_by_their_logical_names(multidevice):
    m = multidevice["meshes"]
    assert m["data2_context4"]["fc1_spec"] == "P(None, None)"  # data and context replicate weights
    assert m["data2_context4"]["param_fraction"] == 1.0
    assert m["fsdp8"]["fc1_spec"] == "P('fsdp', None)"
    assert m["data2_fsdp2_tensor2"]["fc1_spec"] == "P('fsdp', 'tensor')"
    # every matrix is split 8 ways; only norm scales and small vectors stay whole
    assert m["fsdp8"]["param_fraction"] < 1 / 8 + 0.05


def test_create_sharded_makes_the_eager_values_on_their_shards(multidevice):
    got = multidevice["create_sharded"]
    assert got["max_diff"] < 1e-6  # the jitted initialisers round like the eager ones, nearly
    assert got["fc1_spec"] == "P(None, 'fsdp', 'tensor')"
    assert got["fc1_shard_shape"] == [2, 16, 128]  # (layers, 64 / fsdp 4, 256 / tensor 2)


def test_context_parallel_attention_equals_one_device(multidevice):
    cp = multidevice["context_attention"]
    for name, got in cp.items():
        assert got["value_diff"] < 1e-5 and got["grad_diff"] < 1e-5, name
        assert got["out_spec"] == "P(None, 'context')", name
        # self-attention gathers K/V over the context axis; cross-attention's text is whole
        assert got["all_gather"] == name.startswith("self"), name


def test_logical_to_spec_rules():
    rules = normalize_rules(DEFAULT_RULES)
    sizes = {"data": 2, "fsdp": 4, "context": 1, "tensor": 2}
    assert logical_to_spec(("batch", "length", None), rules) == P(("data", "fsdp"), "context", None)
    # size-1 mesh axes are dropped; a mesh axis shards one dimension only
    assert logical_to_spec(("batch", "length", None), rules, (8, 16, 4), sizes) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "embed"), rules, (8, 8), sizes) == P("fsdp", None)
    # axes that do not divide the dimension are dropped from the end
    assert logical_to_spec(("batch",), rules, (2,), sizes) == P("data")
    assert logical_to_spec(("embed", "mlp"), rules, (6, 6), sizes) == P(None, "tensor")


def test_rules_and_mesh_errors_name_the_entry():
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        normalize_rules([("embd", "fsdp")])
    with pytest.raises(ValueError, match="unknown mesh axes"):
        normalize_rules({"embed": "model"})
    assert fill_sizes({"data": -1, "tensor": 2}, 8, "ici") == (4, 1, 1, 2)
    with pytest.raises(MeshError, match="mesh.ici"):
        fill_sizes({"data": -1, "fsdp": -1}, 8, "ici")
    with pytest.raises(MeshError, match="has 6 devices, but there are 8"):
        fill_sizes({"data": 3, "fsdp": 2}, 8, "ici")
    with pytest.raises(MeshError, match="not divisible"):
        fill_sizes({"data": -1, "fsdp": 3}, 8, "ici")


def test_one_device_mesh():
    mesh = create_mesh({"ici": {"data": -1}}, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}


def test_topology_names():
    from sora_jax.parallel.topologies import parse

    assert parse("v5p-64").num_devices == 32  # v5p slices count TensorCores, 2 per chip
    assert parse("v5e-256").num_devices == 256
    assert parse("h100x8x16").num_devices == 128
    assert parse("h200-8").chip.hbm_bytes == 141 * 1000 ** 3
    with pytest.raises(ValueError, match="unknown topology"):
        parse("b200x8")


@pytest.mark.slow  # about 40 s: two compiles on 4 simulated devices
def test_aot_compile_reports_memory_and_fails_early_when_too_big(tmp_path):
    """The CLI re-runs itself with 4 simulated devices and compiles the quickstart DiT's step."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    base = [sys.executable, "-m", "sora_jax.cli", "aot-compile", "--config", "configs/quickstart.py",
            "--topology", "v5e-4", "--config.mesh.ici.fsdp=2", "--rows", "4", "--workdir", str(tmp_path)]
    ok = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert out["devices"] == 4 and out["mesh"].startswith("data=2 fsdp=2")
    assert out["fits"] and 0 < out["bytes_per_device"] < out["hbm_bytes"]
    assert out["model_flops_per_step"] > 0
    tight = subprocess.run(base + ["--hbm-gib", "0.001"], env=env, capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert tight.returncode == 4 and "does not fit" in tight.stderr


def test_import_weights_places_parameters_on_their_shards(multidevice):
    got = multidevice["wan_import"]
    assert got["max_diff"] == 0.0  # the same checkpoint as a one-device import
    assert got["sharded_params"]["transformer"] > 0 and got["plain_sharded_params"]["transformer"] == 0


def test_export_restores_onto_shards_and_writes_the_same_files(multidevice):
    got = multidevice["wan_export"]
    assert got["same_tensors"] and got["files"] >= 3  # dit, vae, text_encoder
    assert got["sharded_dit_arrays"] > 0  # the restored DiT was split over the 8 devices
