"""Test set-up: CPU only, deterministic, quiet."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The team's shared folder (fixtures, design), beside the checkout."""
    env = os.environ.get("SORA_JAX_SHARED")
    return pathlib.Path(env) if env else SHARED
