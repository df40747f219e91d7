"""Context-frame conditioning: training patterns, the loss never sees context, inference masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion.conditioning import (
    CONDITION_PATTERNS, conditioning_settings, context_latent_frames, draw_condition_mask,
    latent_frame_spans, token_condition_mask,
)
from sora_jax.diffusion.flow import rectified_flow_loss


def _packed_row():
    """One row: segment 1 = 3 frames x 4 tokens, 2 = an image (4 tokens), 3 = 5 frames x 2
    tokens, then 4 padding tokens. Returns (segment_ids, frame_index), (1, 30) each."""
    seg = [1] * 12 + [2] * 4 + [3] * 10 + [0] * 4
    frame = [f for f in range(3) for _ in range(4)] + [0] * 4 + [f for f in range(5) for _ in range(2)] + [0] * 4
    return np.array([seg], np.int32), np.array([frame], np.int32)


# every key of the section must be given (the configs hold the values; no defaults in code)
OTHER_KEYS = dict(max_k=2, keyframe_prob=0.3, visual_dropout=0.0)


def _section(**kw):
    section = {p: 0.0 for p in CONDITION_PATTERNS}
    section.update(OTHER_KEYS)
    section.update(kw)
    return section


def _only(pattern, **kw):
    return conditioning_settings(_section(**{pattern: 1.0}, **kw))


def _frames(cond, seg, frame, s):
    return sorted(set(frame[0][(seg[0] == s) & cond[0]].tolist()))


@pytest.mark.parametrize("pattern,expect1,expect3", [
    ("none", [], []),
    ("first_frame", [0], [0]),
    ("first_k", [0, 1], [0, 1]),
    ("last_k", [1, 2], [3, 4]),
    ("first_last", [0, 2], [0, 4]),
])
def test_patterns_select_the_documented_frames(pattern, expect1, expect3):
    seg, frame = _packed_row()
    cond, removed = draw_condition_mask(jax.random.key(0), jnp.asarray(seg), jnp.asarray(frame),
                                        _only(pattern, max_k=2, visual_dropout=0.0))
    cond = np.asarray(cond)
    if pattern in ("first_k", "last_k"):  # k is drawn from 1..2: either is allowed, whole frames
        for s, n, want in ((1, 3, expect1), (3, 5, expect3)):
            got = _frames(cond, seg, frame, s)
            assert got in (want[:1] if pattern == "first_k" else want[-1:], want), (s, got)
    else:
        assert _frames(cond, seg, frame, 1) == expect1
        assert _frames(cond, seg, frame, 3) == expect3
    assert not cond[0, 12:16].any()  # an image never has context
    assert not cond[0, 26:].any()  # nor padding
    assert not np.asarray(removed).any()
    # every token of a frame agrees
    for s in (1, 3):
        for f in range(5):
            sel = (seg[0] == s) & (frame[0] == f)
            if sel.any():
                assert len(set(cond[0][sel].tolist())) == 1


def test_keyframes_never_cover_a_whole_example_and_vary_with_the_key():
    seg, frame = _packed_row()
    st = _only("keyframes", keyframe_prob=0.9)
    draws = []
    for i in range(40):
        cond, _ = draw_condition_mask(jax.random.key(i), jnp.asarray(seg), jnp.asarray(frame), st)
        cond = np.asarray(cond)
        for s, n in ((1, 3), (3, 5)):
            assert len(_frames(cond, seg, frame, s)) < n
        draws.append(tuple(_frames(cond, seg, frame, 3)))
    assert len(set(draws)) > 3


def test_visual_dropout_removes_instead_of_giving():
    seg, frame = _packed_row()
    st = _only("first_frame", visual_dropout=0.5)
    n_removed = 0
    for i in range(60):
        cond, removed = draw_condition_mask(jax.random.key(i), jnp.asarray(seg), jnp.asarray(frame), st)
        cond, removed = np.asarray(cond), np.asarray(removed)
        assert not (cond & removed).any()
        given = cond | removed
        assert _frames(given, seg, frame, 1) == [0]
        n_removed += removed[0, 0]
    assert 15 < n_removed < 45


def test_settings_name_bad_values():
    with pytest.raises(ValueError, match=r"unknown \['first_frme'\], missing \['first_frame'\]"):
        section = _section(none=1.0)
        section["first_frme"] = section.pop("first_frame")
        conditioning_settings(section)
    with pytest.raises(ValueError, match=r"missing \['max_k'\]"):
        conditioning_settings({k: v for k, v in _section(none=1.0).items() if k != "max_k"})
    with pytest.raises(ValueError, match="all 0"):
        conditioning_settings(_section())
    with pytest.raises(ValueError, match="keyframe_prob"):
        conditioning_settings(_section(none=1.0, keyframe_prob=1.0))


def _batch(seed=0):
    seg, frame = _packed_row()
    rng = np.random.default_rng(seed)
    pos = np.stack([frame, np.zeros_like(frame), np.zeros_like(frame)], -1)
    return {"tokens": jnp.asarray(rng.normal(size=(1, 30, 3)), jnp.float32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos),
            "timesteps": jnp.zeros((1, 30)), "loss_mask": jnp.ones((1, 30)),
            "text": jnp.zeros((1, 2, 4)), "text_segment_ids": jnp.asarray([[1, 3]], jnp.int32)}


def test_context_never_leaks_into_the_loss():
    batch = _batch()
    st = _only("first_frame")
    seen = {}

    def model(x, seg, pos, t, text, tseg, cond_mask=None, bump=0.0):
        seen.update(x=x, t=t, cond=cond_mask)
        return 0.5 * x + bump * cond_mask[..., None]

    key = jax.random.key(3)
    base, aux = rectified_flow_loss(model, batch, key, caption_dropout=0.0, conditioning=st)
    cond = np.asarray(seen["cond"])
    assert cond.sum() == 4 + 2  # frame 0 of segments 1 and 3
    # context tokens enter clean, at t = 0
    np.testing.assert_array_equal(np.asarray(seen["x"])[cond], np.asarray(batch["tokens"])[cond])
    assert np.all(np.asarray(seen["t"])[cond] == 0) and np.all(np.asarray(seen["t"])[~cond & (np.asarray(batch["segment_ids"]) != 0)] > 0)
    # any prediction on context tokens leaves the loss unchanged, and gets no gradient
    bumped, _ = rectified_flow_loss(lambda *a, **k: model(*a, **k, bump=1e3), batch, key,
                                    caption_dropout=0.0, conditioning=st)
    assert float(bumped) == float(base)

    def loss_of_output(out):
        return rectified_flow_loss(lambda *a, **k: out, batch, key, caption_dropout=0.0,
                                   conditioning=st)[0]

    g = np.asarray(jax.grad(loss_of_output)(jnp.ones((1, 30, 3))))
    assert np.all(g[cond] == 0) and np.all(g[~cond & (np.asarray(batch["segment_ids"]) != 0)] != 0)
    assert abs(float(aux["cond_fraction"]) - 6 / 26) < 1e-6


def test_removed_context_is_padding_for_the_model():
    batch = _batch()
    st = _only("first_frame", visual_dropout=0.999)
    seen = {}

    def model(x, seg, pos, t, text, tseg, cond_mask=None):
        seen.update(seg=seg, cond=cond_mask)
        return x

    rectified_flow_loss(model, batch, jax.random.key(0), caption_dropout=0.0, conditioning=st)
    seg = np.asarray(seen["seg"])
    assert not np.asarray(seen["cond"]).any()
    assert (seg[0, :4] == 0).all() and (seg[0, 4:12] == 1).all() and (seg[0, 16:18] == 0).all()


def test_inference_masks_follow_the_causal_latent_layout():
    assert latent_frame_spans(3, 4) == [(0, 1), (1, 5), (5, 9)]
    known = np.zeros(9, bool)
    known[:5] = True  # frames 0..4: latents 0 and 1
    np.testing.assert_array_equal(context_latent_frames(known, 4), [True, True, False])
    known = np.zeros(9, bool)
    known[4:] = True  # frames 4..8: frame 4 shares latent 1 with generated frames 1..3
    np.testing.assert_array_equal(context_latent_frames(known, 4), [False, False, True])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        context_latent_frames(np.ones(8, bool), 4)
    positions = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(token_condition_mask([True, True, False], positions, 1),
                                  [True, True, True, False])
    # time patch 2 over 4 latent frames: a token is context only if both of its frames are
    np.testing.assert_array_equal(
        token_condition_mask([True, False, True, True], np.array([[0, 0, 0], [1, 0, 0]]), 2),
        [False, True])
