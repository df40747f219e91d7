"""The training loop and its checkpoints: save/restore round trip and exact resume."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.configs.common import train_section
from sora_jax.train.checkpoint import CheckpointNotFoundError, Checkpointer
from sora_jax.train.trainer import TrainTask, train


class Regressor(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


W_TRUE = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


def batch_fn(step):
    x = np.random.default_rng([7, step]).standard_normal((32, 4)).astype(np.float32)
    return {"x": x, "y": x @ W_TRUE}


def loss_fn(model, batch, key, step):
    noise = 0.01 * jax.random.normal(key, batch["y"].shape)  # uses the per-step key
    loss = jnp.mean((model(batch["x"]) - batch["y"] - noise) ** 2)
    return loss, {"mse": loss}


def cfg(steps, **kw):
    return train_section(steps=steps, learning_rate=1e-2, warmup_steps=2, log_every=1,
                         checkpoint_every=kw.pop("checkpoint_every", 3), **kw)


def params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_checkpoint_round_trip_includes_optimizer_state(tmp_path):
    model = Regressor(0)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    opt.update(model, grads)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(2, model, opt, {"note": "x"})
    ck.wait()

    fresh = Regressor(1)
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    assert not np.allclose(params(fresh)["l1"]["kernel"], params(model)["l1"]["kernel"])
    meta = ck.restore(fresh, fresh_opt)
    assert meta["step"] == 2 and meta["note"] == "x"
    jax.tree.map(np.testing.assert_array_equal, params(fresh), params(model))
    saved = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt)))
    restored = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fresh_opt)))
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    assert int(fresh_opt.step[...]) == 2
    ck.close()


def test_restore_without_checkpoint_raises(tmp_path):
    ck = Checkpointer(str(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        ck.restore(Regressor())
    ck.close()


def test_loss_falls_and_metrics_are_written(tmp_path):
    model = Regressor()
    summary = train(TrainTask("reg", model, loss_fn, batch_fn), cfg(150), str(tmp_path), progress=False)
    lines = [json.loads(l) for l in open(tmp_path / "logs" / "metrics.jsonl")]
    assert lines[0]["step"] == 1 and lines[-1]["step"] == 150
    assert summary["final_loss"] < 0.2 * lines[0]["reg/loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "logs"))


def test_resumed_run_matches_uninterrupted_run_exactly(tmp_path):
    straight = Regressor()
    train(TrainTask("reg", straight, loss_fn, batch_fn), cfg(8), str(tmp_path / "a"), progress=False)

    def crashing_batch_fn(step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return batch_fn(step)

    interrupted = Regressor()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainTask("reg", interrupted, loss_fn, crashing_batch_fn), cfg(8), str(tmp_path / "b"),
              progress=False)
    # a new process rebuilds the model from scratch, then resumes from the step-6 checkpoint
    resumed = Regressor()
    summary = train(TrainTask("reg", resumed, loss_fn, batch_fn), cfg(8), str(tmp_path / "b"), progress=False)
    assert summary["resumed_from"] == 6
    jax.tree.map(np.testing.assert_array_equal, params(resumed), params(straight))


_CRASH_AT = [None]


def _example(x, rng):
    if _CRASH_AT[0] is not None and int(x) == _CRASH_AT[0]:
        raise RuntimeError("simulated crash")
    v = rng.standard_normal(4).astype(np.float32)
    return {"x": v, "y": v @ W_TRUE}


def _dataset():
    """A Grain iterator pipeline whose batches depend on its position (random map by index)."""
    return grain.MapDataset.range(10**6).random_map(_example, seed=3).to_iter_dataset().batch(32)


def test_dataset_task_resumes_the_iterator_exactly(tmp_path):
    straight = Regressor()
    train(TrainTask("reg", straight, loss_fn, None, dataset=_dataset()), cfg(8), str(tmp_path / "a"),
          progress=False)
    _CRASH_AT[0] = 7 * 32  # the first element of the 8th batch
    try:
        interrupted = Regressor()
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(TrainTask("reg", interrupted, loss_fn, None, dataset=_dataset()), cfg(8),
                  str(tmp_path / "b"), progress=False)
    finally:
        _CRASH_AT[0] = None
    resumed = Regressor()
    summary = train(TrainTask("reg", resumed, loss_fn, None, dataset=_dataset()), cfg(8),
                    str(tmp_path / "b"), progress=False)
    assert summary["resumed_from"] == 6
    jax.tree.map(np.testing.assert_array_equal, params(resumed), params(straight))
    ckpt = Checkpointer(str(tmp_path / "b" / "checkpoints"))
    assert ckpt.restore_data_state(6) == {"next_index": 6 * 32}  # 6 batches of 32 consumed
    # one file per process (Grain's Orbax handler), so every host resumes its own shard
    assert (tmp_path / "b" / "checkpoints" / "6" / "data" / "process_0-of-1.json").is_file()
    ckpt.close()


def test_train_step_compiles_are_counted(tmp_path):
    def two_shapes(step):
        b = batch_fn(step)
        return b if step % 2 else {k: v[:16] for k, v in b.items()}

    s = train(TrainTask("reg", Regressor(), loss_fn, two_shapes), cfg(4), str(tmp_path / "a"), progress=False)
    assert s["train_step_compiles"] == 2
    s = train(TrainTask("reg", Regressor(), loss_fn, batch_fn), cfg(4), str(tmp_path / "b"), progress=False)
    assert s["train_step_compiles"] == 1
    with pytest.raises(ValueError, match="exactly one"):
        train(TrainTask("reg", Regressor(), loss_fn, batch_fn, dataset=_dataset()), cfg(2),
              str(tmp_path / "c"), progress=False)
