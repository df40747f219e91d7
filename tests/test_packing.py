"""Patchify / pack round trips and packed-batch layout (NumPy only, fast)."""

import numpy as np
import pytest

from sora_jax.data.packing import Placement, pack, patchify, unpack, unpatchify


def _example(rng, shape, patch=(1, 2, 2), m=3, keep=None, text_dim=5):
    latent = rng.normal(size=shape).astype(np.float32)
    tokens, positions = patchify(latent, patch)
    text = rng.normal(size=(m, text_dim)).astype(np.float32)
    mask = np.ones(m, bool) if keep is None else np.asarray(keep)
    return {"tokens": tokens, "positions": positions, "text": text, "text_mask": mask,
            "latent": latent}


def test_patchify_round_trip_and_layout():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(4, 6, 8, 3)).astype(np.float32)
    tokens, pos = patchify(latent, (2, 3, 2))
    assert tokens.shape == (2 * 2 * 4, 2 * 3 * 2 * 3)
    assert pos.dtype == np.int32 and pos.shape == (16, 3)
    np.testing.assert_array_equal(unpatchify(tokens, (2, 2, 4), (2, 3, 2), 3), latent)
    # Token k holds exactly the latent block at its grid position, in (pt, ph, pw, c) order.
    for k in (0, 5, 15):
        gt, gh, gw = pos[k]
        block = latent[2 * gt:2 * gt + 2, 3 * gh:3 * gh + 3, 2 * gw:2 * gw + 2]
        np.testing.assert_array_equal(tokens[k], block.reshape(-1))
    np.testing.assert_array_equal(pos[:5], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3],
                                            [0, 1, 0]])


def test_patchify_errors():
    with pytest.raises(ValueError, match=r"\(1, 5, 4\)"):
        patchify(np.zeros((1, 5, 4, 2)), (1, 2, 2))
    with pytest.raises(ValueError):
        patchify(np.zeros((5, 4, 2)), (1, 2, 2))
    with pytest.raises(ValueError):
        unpatchify(np.zeros((4, 8)), (1, 2, 3), (1, 2, 2), 2)


def test_pack_layout_and_unpack_round_trip():
    rng = np.random.default_rng(1)
    exs = [_example(rng, (1, 4, 4, 2), m=3, keep=[True, False, True]),  # 4 tokens, 2 text
           _example(rng, (3, 4, 6, 2), m=4),  # 18 tokens
           _example(rng, (1, 2, 2, 2), m=1)]  # 1 token
    exs[2]["loss_mask"] = np.zeros(1)
    exs[2]["timesteps"] = np.full(1, 0.25)
    batch, placements, dropped = pack(exs, batch_size=2, length=24, text_length=8)
    assert dropped == 0
    assert placements == [Placement(0, 0, 4, 1), Placement(0, 4, 18, 2), Placement(0, 22, 1, 3)]
    seg = batch["segment_ids"]
    np.testing.assert_array_equal(seg[0], [1] * 4 + [2] * 18 + [3] + [0])
    assert not seg[1].any() and not batch["tokens"][1].any()
    assert batch["tokens"].dtype == np.float32 and seg.dtype == np.int32
    assert batch["positions"].dtype == np.int32
    np.testing.assert_array_equal(batch["positions"][0, 4:22], exs[1]["positions"])
    np.testing.assert_array_equal(batch["positions"][0, 23], 0)
    np.testing.assert_array_equal(batch["loss_mask"][0], [1] * 22 + [0, 0])
    np.testing.assert_array_equal(batch["timesteps"][0], [0] * 22 + [0.25, 0])
    # Text: masked-out token skipped, each example's text tagged with its segment.
    np.testing.assert_array_equal(batch["text_segment_ids"][0], [1, 1, 2, 2, 2, 2, 3, 0])
    np.testing.assert_array_equal(batch["text"][0, :2], exs[0]["text"][[0, 2]])
    np.testing.assert_array_equal(batch["text"][0, 7], 0)
    # Exact round trip back to the latents.
    back = unpack(batch["tokens"], placements)
    grids = [(1, 2, 2), (3, 2, 3), (1, 1, 1)]
    for ex, toks, g in zip(exs, back, grids):
        np.testing.assert_array_equal(unpatchify(toks, g, (1, 2, 2), 2), ex["latent"])


def test_pack_first_fit_needs_text_room_and_counts_drops():
    rng = np.random.default_rng(2)
    exs = [_example(rng, (1, 4, 4, 2), m=3),  # row 0: 4 tokens, 3 text
           _example(rng, (1, 2, 4, 2), m=3),  # 2 tokens fit row 0 but text (3+3 > 4) doesn't
           _example(rng, (1, 4, 4, 2), m=1),  # row 0: 4+4 tokens, 3+1 text: fits
           _example(rng, (1, 4, 4, 2), m=1),  # row 0 full -> row 1
           _example(rng, (1, 4, 4, 2), m=1)]  # 2+4+4 > 8 in row 1: dropped
    batch, placements, dropped = pack(exs, batch_size=2, length=8, text_length=4)
    assert placements == [Placement(0, 0, 4, 1), Placement(1, 0, 2, 1), Placement(0, 4, 4, 2),
                          Placement(1, 2, 4, 2)]
    assert dropped == 1
    np.testing.assert_array_equal(batch["segment_ids"], [[1] * 4 + [2] * 4,
                                                         [1] * 2 + [2] * 4 + [0] * 2])


def test_pack_oversize_raises():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="longer than the row length"):
        pack([_example(rng, (3, 4, 6, 2))], batch_size=4, length=16, text_length=8)
    with pytest.raises(ValueError, match="text tokens"):
        pack([_example(rng, (1, 2, 2, 2), m=9)], batch_size=4, length=16, text_length=8)


def test_space_to_depth_orders_features_pt_ph_pw_c_and_inverts_on_numpy_and_jax():
    import jax.numpy as jnp

    from sora_jax.data.patches import depth_to_space, space_to_depth

    # every value names its own (b, t, y, x, c): the feature order can be read off the output
    b, t, h, w, c = 2, 4, 6, 4, 3
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in (b, t, h, w, c)), indexing="ij"), -1)
    x = (idx * np.array([10000, 1000, 100, 10, 1])).sum(-1).astype(np.float32)
    out = space_to_depth(x, (2, 3, 2))
    assert out.shape == (b, t // 2, h // 3, w // 2, 2 * 3 * 2 * c)
    feature = 0
    for dt in range(2):
        for dy in range(3):
            for dx in range(2):
                for ch in range(c):
                    np.testing.assert_array_equal(out[1, 1, 1, 0, feature], x[1, 2 + dt, 3 + dy, dx, ch])
                    feature += 1
    np.testing.assert_array_equal(depth_to_space(out, (2, 3, 2)), x)
    np.testing.assert_array_equal(np.asarray(space_to_depth(jnp.asarray(x), (2, 3, 2))), out)
