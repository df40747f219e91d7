"""Conditioning per distinct (segment, timestep): grouping, and the same model either way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models.condition_groups import condition_groups
from sora_jax.models.dit import DiT


def _reference_groups(seg, t, lab=None):
    """Per row: distinct key tuples in sorted (label, segment, timestep) order, by numpy."""
    out = []
    for b in range(seg.shape[0]):
        keys = [((lab[b, i] if lab is not None else 0), seg[b, i], t[b, i]) for i in range(seg.shape[1])]
        uniq = sorted(set(keys))
        out.append(([uniq.index(k) for k in keys], uniq))
    return out


@pytest.mark.parametrize("with_labels", [False, True])
def test_groups_match_numpy(with_labels):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (3, 40)).astype(np.int32)
    t = rng.choice(np.array([0.0, 0.25, 0.9], np.float32), (3, 40))
    lab = rng.integers(0, 2, (3, 40)).astype(np.int32) if with_labels else None
    index, first, count = condition_groups(jnp.asarray(seg), jnp.asarray(t),
                                           None if lab is None else jnp.asarray(lab), max_groups=24)
    for b, (ref_index, uniq) in enumerate(_reference_groups(seg, t, lab)):
        assert int(count[b]) == len(uniq)
        np.testing.assert_array_equal(np.asarray(index[b]), ref_index)
        for g, key in enumerate(uniq):  # the representative token carries the group's values
            i = int(first[b, g])
            assert (seg[b, i], t[b, i]) == key[1:] and (lab is None or lab[b, i] == key[0])


def test_groups_reject_a_zero_cap():
    with pytest.raises(ValueError, match="max_groups"):
        condition_groups(jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4)), max_groups=0)


def _batch(num_classes=0):
    rng = np.random.default_rng(1)
    seg = np.array([[1] * 20 + [2] * 14 + [0] * 6, [3] * 40], np.int32)
    t = np.where(seg == 1, 0.3, np.where(seg == 2, 0.8, 0.55)).astype(np.float32)
    t[:, :4] = 0.0  # clean context frames of the first segment: a second group in it
    pos = np.zeros((2, 40, 3), np.int32)
    pos[..., 2] = np.arange(40)
    batch = dict(tokens=rng.standard_normal((2, 40, 8)).astype(np.float32), segment_ids=seg,
                 positions=pos, timesteps=t)
    if num_classes:
        batch["labels"] = np.where(seg == 2, 1, 0).astype(np.int32)
    else:
        batch["text"] = rng.standard_normal((2, 6, 16)).astype(np.float32)
        batch["text_segment_ids"] = np.array([[1, 1, 2, 2, 0, 0], [3, 3, 3, 0, 0, 0]], np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _model(groups, adaln, num_classes):
    model = DiT(in_dim=8, hidden_size=32, depth=2, num_heads=2, text_dim=16, adaln=adaln,
                num_classes=num_classes, condition_groups=groups, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    # zero-initialised adaLN / output layers redrawn, so the modulations matter
    leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
              else x for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


# (per_block, 0) (12 s) with the slow tests: per_block stays covered by (per_block, 10)
@pytest.mark.parametrize("adaln,num_classes", [pytest.param("per_block", 0, marks=pytest.mark.slow), ("single", 0),
                                               ("per_block", 10)])
def test_grouped_equals_per_token(adaln, num_classes):
    """Per group (cap 8: 4 groups fit), and a cap too small for row 0 (the per-token
    fallback), give the per-token model's output and gradients."""
    batch = _batch(num_classes)

    def loss(model):
        out = model(**batch)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    results = {}
    for groups in (0, 8, 2):
        (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(_model(groups, adaln, num_classes))
        results[groups] = out, jax.tree.leaves(nnx.state(grads))
    ref_out, ref_grads = results[0]
    for groups in (8, 2):
        out, grads = results[groups]
        # float32 rounding only: the group matmuls have other shapes than the per-token ones
        np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref_out))))
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(r))))
    assert float(jnp.max(jnp.abs(ref_out))) > 0.1  # the comparison is not between zeros
