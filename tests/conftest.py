"""Test set-up: CPU only, deterministic, quiet."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import jax
import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The team's shared folder (fixtures, design), beside the checkout."""
    env = os.environ.get("SORA_JAX_SHARED")
    return pathlib.Path(env) if env else SHARED


@pytest.fixture(autouse=True, scope="session")
def _cheap_compiles():
    """Tests check semantics, not speed: skip XLA's expensive CPU optimisation passes.

    Compiling dominates this suite's time on a small CPU, and these passes make it about 3x
    slower; numerics stay within float tolerance of the optimised build.
    """
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """A run folder of configs/tiny.py trained end to end through the CLI (seconds of training),
    shared by the tests that need real checkpoints (test_cli, test_modes)."""
    from sora_jax.cli import run

    wd = str(tmp_path_factory.mktemp("tiny_run"))
    for cmd in ("prepare-data", "train-vae", "train-dit"):
        assert run([cmd, "--config", "configs/tiny.py", "--no-progress", "--workdir", wd]) == 0, cmd
    return wd
