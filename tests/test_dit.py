"""DiT, attention and RoPE: packing equivalence, zero init, masks, relative positions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sora_jax.data.packing import pack, patchify
from sora_jax.models.attention import dot_product_attention
from sora_jax.models.dit import DiT, dit_flops_per_token, dit_param_count
from sora_jax.models.layers import apply_rope, default_rope_axes_dims, rope_cos_sin

TEXT_DIM = 16
CALL_KEYS = ("tokens", "segment_ids", "positions", "timesteps", "text", "text_segment_ids")


@pytest.fixture(scope="module")
def tiny_dit():
    return DiT(in_dim=8, hidden_size=32, depth=2, num_heads=2, text_dim=TEXT_DIM,
               rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_dit_randomized(tiny_dit):
    return _randomized(tiny_dit)


@nnx.jit
def _forward(model, batch):
    return model(*(batch[k] for k in CALL_KEYS))


def _randomized(model, seed=1, std=0.3):
    """A copy with every parameter redrawn non-zero (adaLN-Zero and output layers included)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    new = jax.tree.map(lambda x: jnp.asarray(std * rng.normal(size=x.shape), x.dtype), state)
    return nnx.merge(graphdef, new)


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for shape, m in (((1, 4, 4, 2), 3), ((3, 4, 6, 2), 5)):  # image (4 tokens), video (18)
        tokens, positions = patchify(rng.normal(size=shape).astype(np.float32), (1, 2, 2))
        n = tokens.shape[0]
        out.append({"tokens": tokens, "positions": positions,
                    "text": rng.normal(size=(m, TEXT_DIM)).astype(np.float32),
                    "text_mask": np.ones(m, bool),
                    "timesteps": rng.uniform(size=n).astype(np.float32)})
    return out


def _rows_packed_and_alone():
    """Row 0: image + video packed; row 1: image alone; row 2: video alone (one compile)."""
    img, vid = _examples()
    kw = dict(batch_size=1, length=24, text_length=8)
    parts = [pack([img, vid], **kw), pack([img], **kw), pack([vid], **kw)]
    batch = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    return batch, [p[1] for p in parts]


def test_fresh_dit_outputs_exactly_zero(tiny_dit):
    batch, _ = _rows_packed_and_alone()
    out = _forward(tiny_dit, batch)
    assert out.shape == (3, 24, 8) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)


def test_packed_row_equals_examples_alone(tiny_dit):
    model = _randomized(tiny_dit)
    batch, placements = _rows_packed_and_alone()
    out = np.asarray(_forward(model, batch))
    assert np.isfinite(out).all()
    (p_img, p_vid), (a_img,), (a_vid,) = placements
    alone_img = out[1, a_img.start:a_img.start + a_img.n]
    alone_vid = out[2, a_vid.start:a_vid.start + a_vid.n]
    assert np.abs(alone_img).max() > 0.1  # not trivially zero
    np.testing.assert_allclose(out[0, p_img.start:p_img.start + p_img.n], alone_img,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, p_vid.start:p_vid.start + p_vid.n], alone_vid,
                               rtol=1e-5, atol=1e-5)
    # Text is really used: another caption for the video changes its output.
    batch2 = dict(batch, text=batch["text"].copy())
    batch2["text"][2] += 1.0
    out2 = np.asarray(_forward(model, batch2))
    assert np.abs(out2[2, :18] - alone_vid).max() > 1e-3
    # No text at all (CFG unconditional branch) still gives finite output.
    out3 = np.asarray(_forward(model, dict(batch, text_segment_ids=0 * batch["text_segment_ids"])))
    assert np.isfinite(out3).all() and np.abs(out3[2, :18] - alone_vid).max() > 1e-3


def test_remat_gives_same_gradients(tiny_dit):
    batch, _ = _rows_packed_and_alone()
    model = _randomized(tiny_dit, seed=2)
    remat_model = nnx.clone(model)
    remat_model.remat = True

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(jnp.square(_forward(m, batch))))(m)

    g0 = jax.tree.leaves(grads(model))
    g1 = jax.tree.leaves(grads(remat_model))
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()) + 1e-6)


def test_param_count_and_flops(tiny_dit):
    n = dit_param_count(tiny_dit)
    assert n == sum(x.size for x in jax.tree.leaves(nnx.state(tiny_dit, nnx.Param)))
    assert 50_000 < n < 80_000
    assert dit_flops_per_token(in_dim=8, hidden_size=32, depth=2, text_dim=TEXT_DIM,
                               seq_len=24, text_len=8) > 2 * n / 4


def test_from_config():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(dict(
        hidden_size=24, depth=1, num_heads=2, mlp_ratio=2.0, qk_norm=False, text_dim=8,
        attention_backend="xla", rope_axes_dims=None, rope_theta=10000.0, remat=False,
        remat_policy="nothing_saveable", scan_layers=False, num_classes=0, pos_embed="rope",
        adaln="per_block", dtype="float32"))
    model = nnx.eval_shape(lambda: DiT.from_config(cfg, in_dim=4, rngs=nnx.Rngs(0)))
    assert model.rope_axes_dims == (4, 4, 4) and model.blocks[0].attn.q_norm is None
    del cfg["remat"]
    with pytest.raises(KeyError, match="remat"):  # every field comes from the config
        DiT.from_config(cfg, in_dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        DiT(in_dim=4, hidden_size=30, depth=1, num_heads=4, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------- attention


def _qkv(seed, b, lq, lk, h=2, d=4):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=s).astype(np.float32)
                 for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


@jax.jit
def _attend(q, k, v, qs, ks, always=None):
    return dot_product_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                 kv_always_visible=always)


def test_attention_matches_brute_force_and_padding_is_zero():
    q, k, v = _qkv(0, 2, 6, 5)
    qs = np.array([[1, 1, 2, 2, 0, 0], [3, 3, 3, 0, 1, 0]], np.int32)
    ks = np.array([[2, 1, 1, 0, 2], [3, 0, 1, 3, 1]], np.int32)
    out = np.asarray(_attend(q, k, v, qs, ks))
    for b, i, h in itertools.product(range(2), range(6), range(2)):
        allowed = [j for j in range(5) if qs[b, i] != 0 and ks[b, j] == qs[b, i]]
        if not allowed:
            ref = np.zeros(4)
        else:
            logits = np.array([q[b, i, h] @ k[b, j, h] / 2.0 for j in allowed])
            p = np.exp(logits - logits.max())
            ref = (p / p.sum()) @ v[b, allowed, h]
        np.testing.assert_allclose(out[b, i, h], ref, rtol=1e-5, atol=1e-6)
    # Padding rows are exactly zero, and gradients stay finite.
    assert np.all(out[0, 4:] == 0)
    g = jax.jit(jax.grad(lambda q, k, v: _attend(q, k, v, qs, ks).sum(), argnums=(0, 1, 2)))(
        q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_attention_packed_equals_alone():
    q, k, v = _qkv(1, 1, 7, 7)
    seg = np.array([[1, 1, 1, 2, 2, 2, 0]], np.int32)
    packed = np.asarray(_attend(q, k, v, seg, seg))
    ones = np.ones((1, 3), np.int32)
    for sl in (slice(0, 3), slice(3, 6)):
        alone = _attend(q[:, sl], k[:, sl], v[:, sl], ones, ones)
        np.testing.assert_allclose(packed[:, sl], alone, rtol=1e-5, atol=1e-6)


def test_attention_always_visible_key():
    q, k, v = _qkv(2, 1, 3, 2)
    qs = np.array([[1, 2, 0]], np.int32)
    ks = np.array([[0, 1]], np.int32)
    out = np.asarray(_attend(q, k, v, qs, ks, np.array([[True, False]])))
    np.testing.assert_allclose(out[0, 1], v[0, 0], rtol=1e-6)  # only the null key
    assert np.all(out[0, 2] == 0)  # padding still sees nothing
    with pytest.raises(ValueError):
        dot_product_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, backend="flash")


# ------------------------------------------------------------------------------ RoPE


def test_rope_default_split():
    assert default_rope_axes_dims(32) == (8, 12, 12)
    assert default_rope_axes_dims(64) == (16, 24, 24)
    assert default_rope_axes_dims(16) == (4, 6, 6)
    with pytest.raises(ValueError):
        default_rope_axes_dims(15)


def test_rope_relative_position_property():
    axes, d = (4, 6, 6), 16
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 1, d)).astype(np.float32)

    @jax.jit
    def scores(pq, pk):  # (N, 3) query and key positions -> (N,) rotated dot products
        cq, sq = rope_cos_sin(pq[None], axes)
        ck, sk = rope_cos_sin(pk[None], axes)
        n = pq.shape[0]
        rq = apply_rope(jnp.broadcast_to(q, (1, n, 1, d)), cq, sq)
        rk = apply_rope(jnp.broadcast_to(k, (1, n, 1, d)), ck, sk)
        return jnp.sum(rq * rk, axis=(0, 2, 3)), jnp.linalg.norm(rq[0, :, 0], axis=-1)

    p0, k0 = np.array([3, 1, 4]), np.array([1, 5, 9])
    shifts = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 7, -3], [-3, -1, -4]])
    # Rows 5..7 move only the query, along one axis each: the score must change.
    pq = np.concatenate([p0 + shifts, p0 + np.eye(3, dtype=int), np.zeros((1, 3), int)])
    pk = np.concatenate([k0 + shifts, np.tile(k0, (3, 1)), np.zeros((1, 3), int)])
    s, norms = map(np.asarray, scores(pq.astype(np.int32), pk.astype(np.int32)))
    np.testing.assert_allclose(s[1:5], s[0], atol=1e-4)
    assert np.all(np.abs(s[5:8] - s[0]) > 1e-3)
    np.testing.assert_allclose(s[8], np.sum(q * k), rtol=1e-5)  # position 0 = identity
    np.testing.assert_allclose(norms, np.linalg.norm(q), rtol=1e-5)  # rotations keep norms


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4, 6])),
                       min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_packed_equals_unpacked_for_random_shapes(tiny_dit_randomized, shapes, seed):
    """Property: for any mix of example shapes, each example's DiT output in a packed row
    equals its output alone in a row (all rows share one shape: one compiled function)."""
    rng = np.random.default_rng(seed)
    examples = []
    for t, h, w in shapes:
        tokens, positions = patchify(rng.normal(size=(t, h, w, 2)).astype(np.float32), (1, 2, 2))
        m = int(rng.integers(1, 5))
        examples.append({"tokens": tokens, "positions": positions,
                         "text": rng.normal(size=(m, TEXT_DIM)).astype(np.float32),
                         "text_mask": np.ones(m, bool),
                         "timesteps": rng.uniform(size=len(tokens)).astype(np.float32)})
    kw = dict(batch_size=1, length=112, text_length=16)  # room for 4 of the largest (27 tokens)
    packed, placements, dropped = pack(examples, **kw)
    assert dropped == 0
    out = np.asarray(_forward(tiny_dit_randomized, packed))[0]
    for ex, p in zip(examples, placements):
        alone, (pa,), _ = pack([ex], **kw)
        ref = np.asarray(_forward(tiny_dit_randomized, alone))[0, :pa.n]
        assert np.abs(ref).max() > 1e-3  # not trivially zero
        # per-token timesteps: the packed row has more distinct (segment, t) than the model's
        # condition_groups and takes the per-token path, a row alone may not: float32 rounding
        np.testing.assert_allclose(out[p.start:p.start + p.n], ref, rtol=1e-4, atol=5e-5)


# per_block (13 s) runs with the slow tests; single keeps the scan path in the default run
@pytest.mark.parametrize("adaln", [pytest.param("per_block", marks=pytest.mark.slow), "single"])
def test_scanned_layers_equal_the_unrolled_loop(adaln):
    """scan_layers stacks the blocks on a leading axis; with the same weights the scanned
    (and rematerialised) model computes what the plain loop computes, gradients included."""
    import jax

    kw = dict(in_dim=8, hidden_size=32, depth=3, num_heads=4, text_dim=16, adaln=adaln)
    scanned = DiT(scan_layers=True, remat=True, rngs=nnx.Rngs(0), **kw)
    plain = DiT(scan_layers=False, rngs=nnx.Rngs(0), **kw)
    s_state = nnx.state(scanned, nnx.Param)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(s_state))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # random weights everywhere (zero-initialised gates and output would hide the blocks)
    weights = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    nnx.replace_by_pure_dict(s_state, weights)
    nnx.update(scanned, s_state)
    assert scanned.blocks.mlp.fc1.kernel.get_value().shape == (3, 32, 128)
    assert scanned.blocks.mlp.fc1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    p_state = nnx.state(plain, nnx.Param)
    unstacked = {k: v for k, v in weights.items() if k != "blocks"}
    unstacked["blocks"] = {i: jax.tree.map(lambda a: a[i], weights["blocks"]) for i in range(3)}
    nnx.replace_by_pure_dict(p_state, unstacked)
    nnx.update(plain, p_state)
    rng = np.random.default_rng(0)
    n = 12
    args = (jnp.asarray(rng.standard_normal((1, n, 8)), jnp.float32), jnp.ones((1, n), jnp.int32),
            jnp.zeros((1, n, 3), jnp.int32).at[0, :, 2].set(jnp.arange(n)), jnp.full((1, n), 0.3),
            jnp.asarray(rng.standard_normal((1, 4, 16)), jnp.float32), jnp.ones((1, 4), jnp.int32))
    a, b = nnx.jit(lambda m: m(*args))(scanned), nnx.jit(lambda m: m(*args))(plain)
    assert float(jnp.mean(jnp.abs(a))) > 0.05
    np.testing.assert_allclose(a, b, atol=1e-5)
    grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(*args) ** 2)))
    gs = nnx.to_pure_dict(nnx.state(grad(scanned)))
    gp = nnx.to_pure_dict(nnx.state(grad(plain)))
    for i in range(3):
        np.testing.assert_allclose(gs["blocks"]["mlp"]["fc1"]["kernel"][i],
                                   gp["blocks"][i]["mlp"]["fc1"]["kernel"], atol=1e-5)
    if adaln == "single":  # every block's table and the shared Linear get gradients
        assert np.all(np.abs(np.asarray(gs["blocks"]["modulation"])).sum(axis=(1, 2)) > 0)
        assert float(np.abs(np.asarray(gs["t_modulation"]["kernel"])).sum()) > 0
    with pytest.raises(ValueError, match="remat_policy"):
        DiT(remat_policy="sometimes", rngs=nnx.Rngs(0), **kw)
