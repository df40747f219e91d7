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


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    """A tiny run folder: config.json and an untrained VAE checkpoint holding latent statistics.

    Encoding does not care whether the weights were trained; non-trivial statistics make the
    normalisation visible. Returns (workdir, config).
    """
    import numpy as np

    from sora_jax import config as config_lib
    from sora_jax.models.factory import build_vae
    from sora_jax.models.vae_gan import VAETrainModel
    from sora_jax.train.checkpoint import Checkpointer
    from sora_jax.train.run_folder import paths, save_config

    wd = str(tmp_path_factory.mktemp("vae_run"))
    cfg = config_lib.load_config("tiny")
    save_config(cfg, wd)
    vae = build_vae(cfg)
    c = cfg.vae.latent_channels
    vae.latent_shift[...] = np.linspace(-0.2, 0.2, c).astype(np.float32)
    vae.latent_scale[...] = np.full((c,), 1.5, np.float32)
    ck = Checkpointer(os.path.join(paths(wd)["vae"], "checkpoints"), async_save=False)
    ck.save(2, VAETrainModel(vae), None, {"note": "untrained"})
    ck.close()
    return wd, cfg
