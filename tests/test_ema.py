"""The parameters' EMA: decay profiles against their closed forms, the train step's update,
its checkpoint item and exact resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.ema import EMA, ema_decay, sigma_rel_to_gamma
from sora_jax.train.trainer import TrainTask, train
from tests.test_train import Regressor, batch_fn, cfg, loss_fn, params


def _ema_cfg(profile="power", decay=0.99, sigma_rel=0.05):
    return ml_collections.ConfigDict(dict(profile=profile, decay=decay, sigma_rel=sigma_rel))


def test_sigma_rel_to_gamma_matches_edm2():
    # EDM2 (Karras et al. 2024), section 3.1: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    g = sigma_rel_to_gamma(0.2)  # and it solves eq. 3
    assert np.sqrt(g + 1) / (g + 2) / np.sqrt(g + 3) == pytest.approx(0.2, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def test_decay_profiles():
    assert float(ema_decay(1, "power", sigma_rel=0.1)) == 0.0  # the first update copies
    g = sigma_rel_to_gamma(0.1)
    assert float(ema_decay(50, "power", sigma_rel=0.1)) == pytest.approx((1 - 1 / 50) ** (g + 1), rel=1e-6)
    assert float(ema_decay(1, "warmup", decay=0.999)) == pytest.approx(2 / 11)
    assert float(ema_decay(10**6, "warmup", decay=0.999)) == pytest.approx(0.999)
    with pytest.raises(ValueError, match="profile"):
        ema_decay(1, "none")


class _Scalar(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,), jnp.float32))


def test_power_ema_is_the_closed_form_weighted_average():
    # With beta_t = (1 - 1/t)^(g+1) the average after n updates weighs parameter i by
    # (i^(g+1) - (i-1)^(g+1)) / n^(g+1) (the product of the later betas telescopes).
    model, n, sigma = _Scalar(), 40, 0.1
    ema = EMA(model, _ema_cfg("power", sigma_rel=sigma))
    history = np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32)
    for p in history:
        model.w[...] = jnp.asarray(p)
        ema.update(model)
    g = sigma_rel_to_gamma(sigma)
    i = np.arange(1, n + 1, dtype=np.float64)
    weights = (i ** (g + 1) - (i - 1) ** (g + 1)) / n ** (g + 1)
    np.testing.assert_allclose(np.asarray(ema.weights.w[...]), weights @ history, rtol=1e-5, atol=1e-6)
    assert int(ema.count[...]) == n


def test_skipped_update_changes_nothing():
    model = _Scalar()
    ema = EMA(model, _ema_cfg("warmup"))
    model.w[...] = jnp.ones(3)
    ema.update(model)
    before = np.asarray(ema.weights.w[...])
    model.w[...] = jnp.full(3, 5.0)
    ema.update(model, apply=jnp.asarray(False))
    np.testing.assert_array_equal(np.asarray(ema.weights.w[...]), before)
    assert int(ema.count[...]) == 1


def _ema_params(ema):
    return params(ema.weights)


def test_train_keeps_the_ema_and_resumes_it_exactly(tmp_path):
    run = lambda **kw: cfg(8, ema=dict(profile="power", decay=0.9999, sigma_rel=0.1), **kw)  # noqa: E731
    straight = TrainTask("reg", Regressor(), loss_fn, batch_fn)
    train(straight, run(), str(tmp_path / "a"), progress=False)
    assert straight.ema is not None and int(straight.ema.count[...]) == 8
    # the average lags the last iterate
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), _ema_params(straight.ema), params(straight.model))
    assert max(jax.tree.leaves(diff)) > 1e-4

    def crashing(step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return batch_fn(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainTask("reg", Regressor(), loss_fn, crashing), run(), str(tmp_path / "b"), progress=False)
    resumed = TrainTask("reg", Regressor(), loss_fn, batch_fn)
    summary = train(resumed, run(), str(tmp_path / "b"), progress=False)
    assert summary["resumed_from"] == 6
    jax.tree.map(np.testing.assert_array_equal, _ema_params(resumed.ema), _ema_params(straight.ema))
    jax.tree.map(np.testing.assert_array_equal, params(resumed.model), params(straight.model))

    # inference reads the averaged weights alone, into a plain model
    ck = Checkpointer(str(tmp_path / "a" / "checkpoints"), this_process_only=True)
    fresh = Regressor(seed=3)
    meta = ck.restore(fresh, item="ema", subtree="weights")
    assert meta["step"] == 8
    jax.tree.map(np.testing.assert_array_equal, params(fresh), _ema_params(straight.ema))
    ck.close()


def test_resume_from_a_checkpoint_without_ema_starts_the_average_there(tmp_path):
    first = TrainTask("reg", Regressor(), loss_fn, batch_fn)
    train(first, cfg(6), str(tmp_path), progress=False)  # no EMA: profile "none"
    assert first.ema is None
    ck = Checkpointer(str(tmp_path / "checkpoints"), this_process_only=True)
    assert not ck.has_item(6, "ema")
    model = Regressor(seed=5)
    ema = EMA(model, _ema_cfg())
    meta = ck.restore(model, step=6, ema=ema)
    assert meta["ema_restored"] is False and int(ema.count[...]) == 0
    jax.tree.map(np.testing.assert_array_equal, _ema_params(ema), params(first.model))
    with pytest.raises(FileNotFoundError, match="'ema'"):
        ck.restore(Regressor(), item="ema", subtree="weights")
    ck.close()


def test_train_resuming_a_run_without_ema_warns_and_averages_from_there(tmp_path, caplog):
    train(TrainTask("reg", Regressor(), loss_fn, batch_fn), cfg(6), str(tmp_path), progress=False)
    task = TrainTask("reg", Regressor(), loss_fn, batch_fn)
    with caplog.at_level("WARNING", logger="sora_jax.train"):
        summary = train(task, cfg(8, ema=dict(profile="power", decay=0.9999, sigma_rel=0.1)),
                        str(tmp_path), progress=False)
    assert summary["resumed_from"] == 6 and "holds no EMA" in caplog.text
    assert int(task.ema.count[...]) == 2  # steps 7 and 8 only
