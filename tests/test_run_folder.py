"""The run folder: latest step from Orbax's step listing, the checkpoint fingerprint, restore
errors, and the file hashes they are built on."""

import shutil

import numpy as np
import pytest
from flax import nnx

from sora_jax import io
from sora_jax.errors import StageError
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.run_folder import checkpoint_fingerprint, latest_step, restore


def _files(root, files):
    for rel, data in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


FILES = [("params.bin", bytes(range(256)) * 5000), ("sub/state", b"opt"), ("meta.json", b"{}")]


def test_file_sha256_known_value(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")  # FIPS 180-2 test vector
    assert io.file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_folder_sha256_depends_on_names_and_contents_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _files(a, FILES)
    _files(b, list(reversed(FILES)))  # same contents, other creation order
    digest = io.folder_sha256(a)
    assert len(digest) == 64 and digest == io.folder_sha256(b)
    data = bytearray(FILES[0][1])
    data[123_456] ^= 1
    (b / "params.bin").write_bytes(bytes(data))
    assert io.folder_sha256(b) != digest
    # moving bytes from one file to another changes it
    _files(b, [("params.bin", FILES[0][1][:-1]), ("sub/state", FILES[0][1][-1:] + b"opt")])
    assert io.folder_sha256(b) != digest
    with pytest.raises(FileNotFoundError):
        io.folder_sha256(tmp_path / "none")


class _Tiny(nnx.Module):
    def __init__(self, seed: int, width: int = 3):
        self.w = nnx.Param(np.random.default_rng(seed).normal(size=(width,)).astype(np.float32))


def _save(run_dir, step, model):
    ck = Checkpointer(str(run_dir / "checkpoints"), async_save=False, max_to_keep=10)
    ck.save(step, model, None, {})
    ck.close()


def test_latest_step_and_fingerprint_follow_orbax_steps(tmp_path):
    run = tmp_path / "dit"
    assert latest_step(str(run)) is None and checkpoint_fingerprint(str(run)) is None
    _save(run, 100, _Tiny(0))
    first = checkpoint_fingerprint(str(run))
    assert first["step"] == 100 and len(first["sha256"]) == 64
    # unfinished saves and quarantined checkpoints are not steps
    (run / "checkpoints" / "300.orbax-checkpoint-tmp-1").mkdir()
    (run / "checkpoints" / "200.corrupt").mkdir()
    assert latest_step(str(run)) == 100 and checkpoint_fingerprint(str(run)) == first
    # a copied run folder keeps it; a newer checkpoint is a new fingerprint
    shutil.copytree(run, tmp_path / "copy")
    assert checkpoint_fingerprint(str(tmp_path / "copy")) == first
    _save(run, 250, _Tiny(1))
    assert latest_step(str(run)) == 250
    assert checkpoint_fingerprint(str(run))["sha256"] != first["sha256"]
    assert checkpoint_fingerprint(str(run), step=100) == first
    with pytest.raises(FileNotFoundError, match="step 5"):
        checkpoint_fingerprint(str(run), step=5)


def test_restore_brings_back_the_weights_and_names_mismatches(tmp_path):
    run = tmp_path / "vae"
    with pytest.raises(StageError, match="no vae checkpoint.*train-vae"):
        restore(_Tiny(0), str(run), "vae")
    assert not run.exists()  # a typo in a path creates nothing
    saved = _Tiny(0)
    _save(run, 7, saved)
    target = _Tiny(5)
    assert restore(target, str(run), "vae") == 7
    np.testing.assert_array_equal(target.w[...], saved.w[...])
    with pytest.raises(StageError, match=r"does not match this config's model.*shape \(3,\).*\(4,\)"):
        restore(_Tiny(0, width=4), str(run), "vae")  # another size, the same parameter names
