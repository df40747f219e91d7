"""μP for the DiT (sora_jax.models.mup): SP bitwise unchanged, μP at its base width equals SP,
the documented per-role rules, the forward multipliers, config validation, and the coordinate
check (Yang et al. 2022, "Tensor Programs V", Fig. 5: activation scale after a few Adam steps
does not depend on the width under μP and grows with it under SP)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.config_validation import validate_config
from sora_jax.errors import ConfigError
from sora_jax.models import mup
from sora_jax.models.dit import DiT, DiTBlock
from sora_jax.train.trainer import clipped_adamw, make_optimizer, make_schedule

IN_DIM, TEXT_DIM, B, L, LT = 8, 16, 2, 16, 4
CALL = ("tokens", "segment_ids", "positions", "timesteps", "text", "text_segment_ids")

# The config fields of a small DiT as configs saved before μP have them (no parameterization keys)
OLD_FIELDS = dict(hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0, qk_norm=True, text_dim=TEXT_DIM,
                  attention_backend="xla", rope_axes_dims=None, rope_theta=10000.0, remat=False,
                  remat_policy="nothing_saveable", scan_layers=False, num_classes=0, pos_embed="rope",
                  adaln="per_block", dtype="float32")

# Computed with the code before μP (git 4e25a5e: its dit.py, and make_optimizer's body
# clipped_adamw(cfg, make_schedule(cfg))) by _fingerprint on this file's model, batch and
# optimizer: at init, then after _STEPS steps (with the loss of the last step).
GOLDEN_INIT = (25026.069779834663, 5384.4622166508925)
GOLDEN_TRAINED = (24993.99463307273, 5470.5188221216085, 0.88774573802948)


def _batch(text_dim=TEXT_DIM, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(1), np.arange(4), np.arange(4), indexing="ij"), -1).reshape(1, L, 3)
    return dict(tokens=rng.normal(size=(B, L, IN_DIM)).astype(np.float32),
                segment_ids=np.repeat(np.array([[1] * 10 + [2] * 6]), B, 0).astype(np.int32),
                positions=np.repeat(grid, B, 0).astype(np.int32),
                timesteps=rng.uniform(size=(B, L)).astype(np.float32),
                text=rng.normal(size=(B, LT, text_dim)).astype(np.float32),
                text_segment_ids=np.repeat(np.array([[1, 1, 2, 0]]), B, 0).astype(np.int32),
                target=rng.normal(size=(B, L, IN_DIM)).astype(np.float32))


def _train_cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(learning_rate=1e-2, warmup_steps=1, steps=10, min_lr_ratio=0.1,
                                               weight_decay=0.05, grad_clip=1.0, b1=0.9, b2=0.99), **kw))


def _loss(model, batch):
    return jnp.mean((model(*(batch[k] for k in CALL)) - batch["target"]) ** 2)


_STEPS = 3


def _train(model, tx, batch, steps=_STEPS):
    """``steps`` optimizer steps in place; returns (outputs before each step, last loss)."""
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        out = model(*(batch[k] for k in CALL))
        loss, grads = nnx.value_and_grad(_loss)(model, batch)
        opt.update(model, grads)
        return out, loss

    outs = [step(model, opt) for _ in range(steps)]
    return [np.asarray(o) for o, _ in outs], float(outs[-1][1])


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]


def _named(tree):
    """{"a/b/0/c": leaf} of a tree of the model's parameter paths."""
    return {"/".join(str(getattr(k, "key", k)) for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _paths(model):
    return {k: np.asarray(x) for k, x in _named(nnx.as_pure(nnx.state(model, nnx.Param))).items()}


def _fingerprint(model):
    leaves = [x.astype(np.float64) for x in _leaves(model)]
    return (sum((i + 1) * float(np.sum(x * x)) for i, x in enumerate(leaves)),
            sum((i + 1) * float(np.sum(x)) for i, x in enumerate(leaves)))


def _bitwise(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def sp_reference():
    """The old way: a config without the μP keys, the optimizer as make_optimizer built it before
    (clipped AdamW at the schedule). Returns (init leaves, forward outputs, trained leaves, loss)."""
    model = DiT.from_config(ml_collections.ConfigDict(OLD_FIELDS), IN_DIM, rngs=nnx.Rngs(0))
    init = _leaves(model)
    assert _fingerprint(model) == pytest.approx(GOLDEN_INIT, rel=1e-6)
    cfg = _train_cfg()
    outs, loss = _train(model, clipped_adamw(cfg, make_schedule(cfg)), _batch())
    assert (*_fingerprint(model), loss) == pytest.approx(GOLDEN_TRAINED, rel=1e-4)
    return init, outs, _leaves(model), loss


def test_sp_is_bitwise_the_model_and_optimizer_of_before(sp_reference):
    init, outs, trained, loss = sp_reference
    explicit = ml_collections.ConfigDict(dict(OLD_FIELDS, parameterization="sp", mup_base_width=None))
    model = DiT.from_config(explicit, IN_DIM, rngs=nnx.Rngs(0))
    assert model.parameterization == "sp" and model.final.output_multiplier is None
    assert model.blocks[0].attn.query_scale is None and model.blocks[0].cross_attn.query_scale is None
    assert _bitwise(_leaves(model), init)
    # a base width under "sp" is ignored; the constructor's defaults are SP
    ignored = DiT.from_config(ml_collections.ConfigDict(dict(explicit, mup_base_width=8)), IN_DIM, rngs=nnx.Rngs(0))
    assert _bitwise(_leaves(ignored), init)
    assert _bitwise(_leaves(DiT(in_dim=IN_DIM, rngs=nnx.Rngs(0), **{
        k: v for k, v in OLD_FIELDS.items() if k not in ("dtype", "remat_policy")})), init)
    new_outs, new_loss = _train(model, make_optimizer(_train_cfg())[0], _batch())
    assert _bitwise(new_outs, outs) and new_loss == loss
    assert _bitwise(_leaves(model), trained)


def test_mup_at_its_base_width_equals_sp(sp_reference):
    """m = 1: every init factor, LR multiplier and forward multiplier is exactly 1, so μP (with its
    multiplies and its extra optimizer transformation in place) reproduces SP bit for bit."""
    init, outs, trained, loss = sp_reference
    cfg = ml_collections.ConfigDict(dict(OLD_FIELDS, parameterization="mup", mup_base_width=32))
    model = DiT.from_config(cfg, IN_DIM, rngs=nnx.Rngs(0))
    assert model.mup_width_mult == 1.0 and model.final.output_multiplier == 1.0
    assert model.blocks[1].attn.query_scale == 1.0
    assert _bitwise(_leaves(model), init)
    multipliers = mup.lr_multipliers(model, model.mup_width_mult)
    assert set(jax.tree.leaves(multipliers)) == {1.0}
    mup_outs, mup_loss = _train(model, make_optimizer(_train_cfg(), lr_multipliers=multipliers)[0], _batch())
    assert _bitwise(mup_outs, outs) and mup_loss == loss
    assert _bitwise(_leaves(model), trained)


# μP role of every parameter of the default text DiT (paths without block indices)
ROLES = {
    "x_embed/kernel": "input", "text_embed/fc1/kernel": "input", "pooled_text_embed/kernel": "input",
    "t_embed/fc1/kernel": "input",
    "t_embed/fc2/kernel": "hidden", "text_embed/fc2/kernel": "hidden",
    "attn/qkv/kernel": "hidden", "attn/proj/kernel": "hidden", "cross_attn/q/kernel": "hidden",
    "cross_attn/kv/kernel": "hidden", "cross_attn/proj/kernel": "hidden", "mlp/fc1/kernel": "hidden",
    "mlp/fc2/kernel": "hidden", "adaln/linear/kernel": "hidden", "final/adaln/linear/kernel": "hidden",
    "final/linear/kernel": "output",
    "cond_embed": "vector", "cross_attn/null_token": "vector", "final/linear/bias": "vector",
}


def _short(path):
    return "/".join(p for p in path.split("/") if not p.isdigit() and p != "blocks")


def test_roles_and_the_multiplier_tree():
    model = nnx.eval_shape(lambda: DiT(in_dim=IN_DIM, hidden_size=64, depth=2, num_heads=2, text_dim=TEXT_DIM,
                                       parameterization="mup", mup_base_width=16, rngs=nnx.Rngs(0)))
    m = model.mup_width_mult
    assert m == 4.0
    multipliers = mup.lr_multipliers(model, m)
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(multipliers) == jax.tree.structure(pure)  # what nnx.Optimizer hands tx
    seen = {}
    for path, value in jax.tree_util.tree_leaves_with_path(multipliers):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        role = mup.param_role(path)
        seen[_short(name)] = role
        assert value == {"hidden": 0.25, "input": 1.0, "output": 1.0, "vector": 1.0}[role], name
        if name.endswith(("bias", "scale")):
            assert role == "vector", name
    assert {k: seen[k] for k in ROLES} == ROLES
    assert mup.lr_multiplier("hidden", 8.0) == 0.125 and mup.lr_multiplier("output", 8.0) == 1.0
    # every parameter of every variant has a role (a scanned stack, adaLN-single, Wan's options,
    # image context, the class-conditional DiT)
    variants = [dict(scan_layers=True, adaln="single", final_modulation="table", qk_norm="across_heads",
                     image_dim=12, image_pos_len=3, text_null_token=False, pooled_text=False, context_flag=False),
                dict(num_classes=5, pos_embed="sincos")]
    for kw in variants:
        v = nnx.eval_shape(lambda: DiT(in_dim=IN_DIM, hidden_size=32, depth=2, num_heads=2, text_dim=TEXT_DIM,
                                       rngs=nnx.Rngs(0), **kw))
        named = {_short(k): x for k, x in _named(mup.lr_multipliers(v, 2.0)).items()}
        if kw.get("image_dim"):
            assert named["t_modulation/kernel"] == named["cross_attn/image_kv/kernel"] == 0.5
            assert named["image_embed/fc1/kernel"] == named["image_embed/fc2/kernel"] == 1.0
            assert named["modulation"] == named["final/table"] == named["image_embed/pos"] == 1.0
        else:
            assert named["label_embed/embedding"] == 1.0 and named["attn/qkv/kernel"] == 0.5
    with pytest.raises(ValueError, match="no μP role"):
        mup.param_role(("some_new_layer", "kernel"))


def test_mup_init_is_sp_init_times_the_documented_factors():
    width, base = 128, 32
    sp = _paths(DiT(in_dim=IN_DIM, hidden_size=width, depth=1, num_heads=2, text_dim=TEXT_DIM, rngs=nnx.Rngs(3)))
    mp = _paths(DiT(in_dim=IN_DIM, hidden_size=width, depth=1, num_heads=2, text_dim=TEXT_DIM,
                    parameterization="mup", mup_base_width=base, rngs=nnx.Rngs(3)))
    m = width / base

    def xavier_base(fan_in):  # std held at its base-width value: x sqrt((fi + fo) / (fi + fo / m))
        return math.sqrt((fan_in + width) / (fan_in + base))

    factors = {"x_embed/kernel": xavier_base(IN_DIM), "text_embed/fc1/kernel": xavier_base(TEXT_DIM),
               "pooled_text_embed/kernel": xavier_base(TEXT_DIM), "t_embed/fc2/kernel": 1 / math.sqrt(m)}
    assert sp.keys() == mp.keys()
    for name, x in sp.items():
        if name in factors:
            np.testing.assert_allclose(mp[name], x * factors[name], rtol=1e-6, err_msg=name)
            assert not np.array_equal(mp[name], x)
        else:  # hidden xavier kernels (already var ~ 1/fan_in), zero inits, vectors: as drawn
            assert np.array_equal(mp[name], x), name
    # the input embedding keeps its base-width scale; hidden weights scale as 1/sqrt(width)
    base_model = _paths(DiT(in_dim=IN_DIM, hidden_size=base, depth=1, num_heads=2, text_dim=TEXT_DIM,
                            rngs=nnx.Rngs(3)))
    bound = lambda x: float(np.max(np.abs(x)))  # noqa: E731 - xavier-uniform's bound, sampled
    assert bound(mp["x_embed/kernel"]) == pytest.approx(bound(base_model["x_embed/kernel"]), rel=0.05)
    assert bound(mp["blocks/0/mlp/fc1/kernel"]) == pytest.approx(
        bound(base_model["blocks/0/mlp/fc1/kernel"]) / math.sqrt(m), rel=0.05)


def test_mup_forward_is_sp_with_the_multipliers_folded_into_weights():
    """The attention multiplier 1/sqrt(m) on the queries equals a QK-norm scale of 1/sqrt(m), and
    the output multiplier 1/m on the output layer's input equals its kernel times 1/m (bias not)."""
    width, base = 64, 16
    kw = dict(in_dim=IN_DIM, hidden_size=width, depth=2, num_heads=2, text_dim=TEXT_DIM, rngs=nnx.Rngs(0))
    mp = DiT(parameterization="mup", mup_base_width=base, **kw)
    sp = DiT(**kw)
    m = width / base
    rng = np.random.default_rng(1)  # every parameter non-zero (adaLN-Zero and output layers too)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype),
                         nnx.as_pure(nnx.state(mp, nnx.Param)))
    nnx.update(mp, state)

    def fold(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith(("q_norm/scale", "k_norm/scale")) and "q_norm" in name:
            return x / math.sqrt(m)
        if name == "final/linear/kernel":
            return x / m
        return x

    nnx.update(sp, jax.tree_util.tree_map_with_path(fold, state))
    batch = _batch()
    run = nnx.jit(lambda model: model(*(batch[k] for k in CALL)))
    out_mup, out_sp = np.asarray(run(mp)), np.asarray(run(sp))
    assert np.abs(out_mup).mean() > 0.1
    np.testing.assert_allclose(out_mup, out_sp, rtol=2e-4, atol=2e-5)


def test_lr_multipliers_scale_the_whole_adamw_step_weight_decay_included():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5, 3.0]])}
    grads = {"a": jnp.array([0.1, 0.3]), "b": jnp.array([[-0.2, 0.05]])}
    cfg = _train_cfg(grad_clip=1e9, warmup_steps=0, weight_decay=0.5)
    plain, _ = make_optimizer(cfg)
    scaled, _ = make_optimizer(cfg, lr_multipliers={"a": 1.0, "b": 0.25})
    for _ in range(2):  # step 0 is at learning rate 0 (warm-up), step 1 is not
        u_plain, _ = plain.update(grads, plain.init(params), params)
        u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    assert np.array_equal(u_scaled["a"], u_plain["a"])
    np.testing.assert_allclose(u_scaled["b"], 0.25 * u_plain["b"], rtol=1e-7)
    # ... which is AdamW at learning rate lr / 4 for "b", its decoupled decay included
    lr = make_schedule(cfg)(0)
    ref = optax.adamw(lr * 0.25, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u_scaled["b"], u_ref["b"], rtol=1e-6)


def test_config_keys_are_validated_and_old_configs_build():
    cfg = config_lib.load_config("quickstart")
    assert cfg.dit.parameterization == "sp" and cfg.dit.mup_base_width is None
    validate_config(cfg)
    good = config_lib.apply_overrides(config_lib.load_config("tiny"),
                                      ["dit.parameterization='mup'", "dit.mup_base_width=16"])
    validate_config(good)
    for overrides, key in ((["dit.parameterization='mup'"], "dit.mup_base_width"),
                           (["dit.parameterization='mu_p'"], "dit.parameterization"),
                           (["dit.parameterization='mup'", "dit.mup_base_width=0"], "dit.mup_base_width"),
                           (["dit.mup_base_width=-3"], "dit.mup_base_width")):
        bad = config_lib.apply_overrides(config_lib.load_config("tiny"), overrides)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(bad)
    for bad_value in ("64", 32.0, True):
        bad = config_lib.load_config("tiny")
        bad.dit.parameterization, bad.dit.mup_base_width = "mup", None
        bad.dit.mup_base_width = bad_value
        with pytest.raises(ConfigError, match=r"dit\.mup_base_width"):
            validate_config(bad)
    old = config_lib.load_config("tiny")  # a run folder's config.json from before μP
    del old.dit["parameterization"], old.dit["mup_base_width"]
    validate_config(old)
    assert nnx.eval_shape(lambda: DiT.from_config(old.dit, IN_DIM, rngs=nnx.Rngs(0))).parameterization == "sp"
    with pytest.raises(ValueError, match="mup_base_width"):
        DiT(in_dim=IN_DIM, hidden_size=32, depth=1, num_heads=2, parameterization="mup", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parameterization"):
        DiT(in_dim=IN_DIM, hidden_size=32, depth=1, num_heads=2, parameterization="ntk", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------- coordinate check

COORD_WIDTHS = (32, 64, 128, 256)  # base 32; 2 heads of 16 .. 128 dims
COORD_LAYERS = ("patch embedding", "block 0", "block 1", "output")


def _coordinates(width, parameterization, steps, monkeypatch):
    """RMS of the activations (the blocks' input, each block's output, the model's output) after
    ``steps`` Adam steps on a fixed batch, and RMS of their change from init. One compile."""
    batch = _batch(text_dim=32)
    cfg = _train_cfg(learning_rate=3e-2, warmup_steps=1, steps=100, min_lr_ratio=1.0, weight_decay=0.0,
                     grad_clip=1e9)
    model = nnx.jit(lambda: DiT(in_dim=IN_DIM, hidden_size=width, depth=2, num_heads=2, text_dim=32,
                                condition_groups=0, parameterization=parameterization, mup_base_width=32,
                                rngs=nnx.Rngs(0)))()
    multipliers = mup.lr_multipliers(model, model.mup_width_mult) if parameterization == "mup" else None
    opt = nnx.Optimizer(model, make_optimizer(cfg, lr_multipliers=multipliers)[0], wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    block_call = DiTBlock.__call__

    def activations(model):
        seen = []

        def recorded(block, x, *args):
            if not seen:  # the first block's input: the patch embedding
                seen.append(x)
            seen.append(block_call(block, x, *args))
            return seen[-1]

        monkeypatch.setattr(DiTBlock, "__call__", recorded)
        out = model(*(batch[k] for k in CALL))
        monkeypatch.setattr(DiTBlock, "__call__", block_call)
        return seen + [out]

    def step(_, state):
        model, opt = nnx.merge(graphdef, state)
        opt.update(model, nnx.grad(_loss)(model, batch))
        return nnx.state((model, opt))

    @jax.jit
    def run(state, n):
        state = jax.lax.fori_loop(0, n, step, state)
        return activations(nnx.merge(graphdef, state)[0])

    compiled = run.lower(state, 0).compile()
    before, after = compiled(state, 0), compiled(state, steps)
    rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))  # noqa: E731
    return [rms(a) for a in after], [rms(a - b) for a, b in zip(after, before)]


def _slopes(widths, values):
    """Least-squares slope of log(value) against log(width), per layer (columns of values)."""
    v = np.log2(np.asarray(values))
    return np.polyfit(np.log2(widths), v, 1)[0]


@pytest.mark.slow  # about 40 s on 2 cores (5 compiles); `make test-all` runs it, the CI default run stays < 15 min
def test_coordinate_check(monkeypatch):
    """4 Adam steps (the first at warm-up's learning rate 0) at learning rate 3e-2 on a fixed batch,
    widths 32-256. μP: every layer's activation RMS and its change from init stay within a factor
    1.5 over the 8x widths (log-slopes |s| < 0.2). SP: the change grows ~width (slope > 0.6 in some
    layer). SP at width 32 is μP at its base width (bitwise, test above), so it is not rerun.
    About 40 s of CPU: one compile per (width, parameterization)."""
    steps = 4
    mup_rms, mup_delta = zip(*(_coordinates(w, "mup", steps, monkeypatch) for w in COORD_WIDTHS))
    sp_widths = (32, 256)  # two points suffice for SP's growth, and each width costs a compile
    sp = [(mup_rms[0], mup_delta[0])] + [_coordinates(w, "sp", steps, monkeypatch) for w in sp_widths[1:]]
    sp_rms, sp_delta = zip(*sp)
    mup_slopes, mup_dslopes = _slopes(COORD_WIDTHS, mup_rms), _slopes(COORD_WIDTHS, mup_delta)
    sp_dslopes = _slopes(sp_widths, sp_delta)
    report = "\n".join(f"{n:16s} μP rms {np.round(np.asarray(mup_rms)[:, i], 3)} slope {mup_slopes[i]:+.2f}, "
                       f"change slope {mup_dslopes[i]:+.2f} | SP change {np.round(np.asarray(sp_delta)[:, i], 3)} "
                       f"slope {sp_dslopes[i]:+.2f}" for i, n in enumerate(COORD_LAYERS))
    print(report)
    assert np.all(np.abs(mup_slopes) < 0.2) and np.all(np.abs(mup_dslopes) < 0.2), report
    for values in (mup_rms, mup_delta):
        v = np.asarray(values)
        assert np.all(v.max(0) / v.min(0) < 1.5), report
    assert np.all(np.asarray(mup_delta) > 0.01), report  # every layer did learn
    assert sp_dslopes.max() > 0.6, report
    assert np.asarray(sp_delta)[-1].max() > 4 * np.asarray(mup_delta)[-1].max(), report


def test_query_scale_with_a_fixed_head_dimension():
    """A family that widens by adding heads of fixed width keeps 1/sqrt(d_head): no μP factor;
    the default (same heads as the base) is 1/sqrt(m)."""
    from sora_jax.models.mup import attention_query_scale

    assert attention_query_scale(4.0) == 0.5
    assert attention_query_scale(4.0, 16, 16) == 1.0
    assert attention_query_scale(4.0, 64, 16) == 0.5
    with pytest.raises(ValueError, match="base_head_dim"):
        attention_query_scale(4.0, None, 16)
    hidden, heads = OLD_FIELDS["hidden_size"], OLD_FIELDS["num_heads"]
    cfg = ml_collections.ConfigDict(dict(OLD_FIELDS, parameterization="mup", mup_base_width=hidden // 4,
                                         mup_base_head_dim=hidden // heads))
    model = DiT.from_config(cfg, IN_DIM, rngs=nnx.Rngs(0))
    assert model.mup_width_mult == 4.0 and model.blocks[0].attn.query_scale == 1.0
