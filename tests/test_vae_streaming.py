"""Tests for chunked (feature-cache) and tiled VAE encode / decode (CPU, small, deterministic).

Compiles dominate the run time, so each model is built once per module and one
``StreamingVAE`` per model serves every test through ``replace`` (shared jitted programs).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.models.vae import CausalConv3d, CausalVAE, FeatureCache
from sora_jax.models.vae_streaming import StreamingVAE, blend_weights, tile_starts

B = 1
# CausalVAE kwargs per name; a name ending in conv3d runs every conv with the native 3D conv.
CONFIGS = {
    "td4": dict(base_channels=8, channel_mults=(1, 2), spatial_downsample=4,
                temporal_downsample=4, latent_channels=4, mid_attention=True),
    "td8_patch2": dict(base_channels=8, channel_mults=(1, 1, 2), spatial_downsample=4,
                       temporal_downsample=8, patch_size=2, latent_channels=4, remat=True),
    "td2_conv3d": dict(base_channels=8, channel_mults=(1, 2), spatial_downsample=2,
                       temporal_downsample=2, latent_channels=4, num_res_blocks=2),
    "td4_shortcut": dict(base_channels=8, channel_mults=(1, 2), spatial_downsample=4,
                         temporal_downsample=4, latent_channels=4, patch_size=2,
                         patch_shortcut=True),
}


def _video(T, H=16, W=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (B, T, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    """(name, vae, StreamingVAE with chunk=2, video (1, 1 + 5 td, 16, 16, 3), whole-pass
    (mean, logvar, recon) of that video)."""
    vae = CausalVAE(**CONFIGS[request.param], rngs=nnx.Rngs(0))
    if request.param.endswith("conv3d"):
        # The native 3D conv is what GPUs and TPUs run; the cache must work for it too.
        for _, m in nnx.iter_graph(vae):
            if isinstance(m, CausalConv3d):
                m.impl = "conv3d"
    if vae.shortcut is not None:
        # the conv output layers start at zero next to the shortcut; give both paths weight
        for conv in (vae.encoder.conv_out, vae.decoder.conv_out):
            k = conv.kernel[...]
            conv.kernel[...] = 0.05 * jax.random.normal(jax.random.key(7), k.shape, k.dtype)
    x = _video(1 + 5 * vae.temporal_downsample)
    gd, st = nnx.split(vae)
    mean, logvar = jax.jit(lambda st, x: nnx.merge(gd, st).encode(x))(st, jnp.asarray(x))
    recon = jax.jit(lambda st, z: nnx.merge(gd, st).decode(z))(st, mean)
    whole = tuple(np.asarray(a) for a in (mean, logvar, recon))
    return request.param, vae, StreamingVAE(vae, chunk=2), x, whole


# ---------------------------------------------------------------- chunked == whole


def test_chunked_equals_whole_and_compiles_twice(setup):
    name, vae, sv, x, (mean_w, logvar_w, rec_w) = setup
    td = vae.temporal_downsample
    # The model is causal (tests/test_vae.py), so the whole pass over a prefix of the video is
    # the prefix of the whole pass: one whole-pass compile serves every length. Lengths: an
    # image (first chunk only), 3 latent frames (1 + one full chunk), 6 (the last chunk padded).
    for t in (1, 3, 6):
        T = 1 + td * (t - 1)
        mean_c, logvar_c = sv.encode(x[:, :T], return_logvar=True)
        rec_c = sv.decode(mean_w[:, :t])
        assert mean_c.shape == mean_w[:, :t].shape and rec_c.shape == x[:, :T].shape
        np.testing.assert_allclose(mean_c, mean_w[:, :t], atol=2e-5, rtol=1e-5,
                                   err_msg=f"{name} t={t}")
        np.testing.assert_allclose(logvar_c, logvar_w[:, :t], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(rec_c, rec_w[:, :T], atol=2e-5, rtol=1e-5,
                                   err_msg=f"{name} t={t}")
    # Streaming yields frame 0 alone, then td * chunk frames per chunk (fewer in the last).
    sizes = [y.shape[1] for y in sv.iter_decode(mean_w)]
    assert sizes == [1, 2 * td, 2 * td, td]
    # One program for first chunks and one for the rest, whatever the length.
    assert dict(sv.trace_counts) == {
        "encode_first": 1, "encode_rest": 1, "decode_first": 1, "decode_rest": 1,
    }


def test_cache_size_does_not_grow_with_length():
    # Traced abstractly (jax.eval_shape): shapes only, nothing compiled.
    vae = CausalVAE(**CONFIGS["td4"], rngs=nnx.Rngs(1))
    gd, st = nnx.split(vae)

    def run(st, z, n_chunks):
        model = nnx.merge(gd, st)
        cache = FeatureCache()
        model.decode(z[:, :1], cache)
        shapes = [[f.shape for f in cache.feats]]
        for j in range(1, n_chunks):
            cache = FeatureCache(cache.feats)
            model.decode(z[:, j:j + 1], cache)
            shapes.append([f.shape for f in cache.feats])
        return shapes

    shapes = []
    jax.eval_shape(lambda st, z: shapes.extend(run(st, z, 7)) or 0, st,
                   jax.ShapeDtypeStruct((B, 7, 4, 4, 4), jnp.float32))
    assert all(s == shapes[0] for s in shapes)
    # kt - 1 = 2 frames per 3x3x3 conv (1 after a stride-2 one), never more.
    assert max(s[1] for s in shapes[0]) <= 2


# ---------------------------------------------------------------- causality


def test_chunked_is_causal(setup):
    _, vae, sv, x, _ = setup
    td = vae.temporal_downsample
    mean = sv.encode(x)
    # Changing input frames from 1 + td*j on must not change latents 0 .. j.
    for j in (0, 2):
        x2 = x.copy()
        x2[:, 1 + td * j:] = _video(x.shape[1] - 1 - td * j, seed=9)[0]
        mean2 = sv.encode(x2)
        np.testing.assert_allclose(mean2[:, :j + 1], mean[:, :j + 1], atol=1e-6, rtol=0)
        assert np.abs(mean2[:, j + 1:] - mean[:, j + 1:]).max() > 1e-3
    # Changing latents from j on must not change frames 0 .. td*(j-1).
    rec = sv.decode(mean)
    for j in (1, 4):
        z2 = mean.copy()
        z2[:, j:] += 1.0
        rec2 = sv.decode(z2)
        f = td * (j - 1) + 1
        np.testing.assert_allclose(rec2[:, :f], rec[:, :f], atol=1e-6, rtol=0)
        assert np.abs(rec2[:, f:] - rec[:, f:]).max() > 1e-3


# ---------------------------------------------------------------- tiling


def test_tile_plan_and_blend_weights_partition_unity():
    assert tile_starts(10, 4, 1) == [0, 3, 6]
    assert tile_starts(12, 6, 2) == [0, 4, 6]
    assert tile_starts(5, 8, 2) == [0]
    for kind in ("linear", "cosine"):
        starts = tile_starts(12, 6, 2)
        ws = blend_weights(starts, 6, 4, kind)
        total = np.zeros(48)
        for s, w in zip(starts, ws):
            assert w.min() > 0 and w.max() <= 1
            total[s * 4:(s + 6) * 4] += w
        assert total.min() > 0  # covered everywhere; StreamingVAE divides by the total
    # Across a regular overlap the two linear ramps already sum to 1.
    w0, w1 = blend_weights([0, 4], 6, 1, "linear")
    np.testing.assert_allclose(w0[4:] + w1[:2], 1.0, atol=1e-6)


def test_tile_at_least_frame_is_whole_pass(setup):
    _, _, sv, x, (mean_w, _, rec_w) = setup
    tiled = sv.replace(tile=(16, 32), overlap=8)  # >= the 16 x 16 frame: one tile
    np.testing.assert_allclose(tiled.encode(x), mean_w, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(tiled.decode(mean_w), rec_w, atol=2e-5, rtol=1e-5)


def test_tiling_combines_with_chunking():
    # Per tile, time chunking is exact, so tiled+chunked == tiled+whole-time.
    vae = CausalVAE(base_channels=4, channel_mults=(1, 1), spatial_downsample=4,
                    temporal_downsample=2, latent_channels=4, num_res_blocks=0,
                    rngs=nnx.Rngs(2))
    x = _video(7, H=24, W=32, seed=4)
    whole_time = StreamingVAE(vae, chunk=None, tile=16, overlap=8)
    chunked = whole_time.replace(chunk=2)
    np.testing.assert_allclose(chunked.encode(x), whole_time.encode(x), atol=2e-5, rtol=1e-5)
    z = whole_time.encode(x)
    rec = whole_time.decode(z)
    out = np.zeros_like(rec)
    got = chunked.decode(z, out=out)
    assert got is out
    np.testing.assert_allclose(got, rec, atol=2e-5, rtol=1e-5)
    # 6 x 8 latents in 4 x 4 tiles overlapping by 2: 2 x 3 tiles, each with its own cache.
    assert len(chunked._tiles(6, 8)[0]) == 6


def _smooth_fields(rng, n, size):
    """Random smooth RGB images in (-1, 1): tanh of a sum of 4 plane waves per channel with
    periods of 16 to 100 pixels (stationary, so tile borders and interiors see the same
    statistics)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    shape = (n, 3, 4, 1, 1)
    f = rng.uniform(0.01, 0.06, shape)
    th = rng.uniform(0, 2 * np.pi, shape)
    ph = rng.uniform(0, 2 * np.pi, shape)
    acc = np.cos(2 * np.pi * f * (np.cos(th) * xs + np.sin(th) * ys) + ph).sum(2) / 2
    return np.tanh(acc).transpose(0, 2, 3, 1)[:, None].astype(np.float32)


@contextlib.contextmanager
def _optimized():
    """Compiles with XLA's optimisations inside (conftest turns most off for the suite): the
    seam test runs many steps of small programs, where fused code is ~3x faster."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def trained_vae():
    """A tiny image VAE (2x spatial, 8 latent channels) trained for 200 steps on 24x24 crops.

    The loss ignores a 2-pixel frame border, as if the training crops were much larger than
    the tiles (production VAEs train on 256-pixel crops, where borders are a negligible part of
    the loss): the model then reconstructs near a frame edge as poorly as real VAEs do, which
    is what makes naive tile seams visible. The train step compiles with XLA's optimisations
    (about 3x faster steps here than the suite's cheap-compile default).
    """
    vae = CausalVAE(in_channels=3, latent_channels=8, base_channels=8, channel_mults=(1,),
                    num_res_blocks=0, spatial_downsample=2, temporal_downsample=1,
                    rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(vae, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, x):
        def loss_fn(m):
            d = (m(x)[0] - x)[:, :, 2:-2, 2:-2]
            return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    rng = np.random.default_rng(0)
    data = _smooth_fields(rng, 512, 24)
    with _optimized():
        for _ in range(200):
            loss = step(vae, opt, jnp.asarray(data[rng.integers(0, len(data), 8)]))
    assert float(loss) < 0.2, float(loss)
    return vae


def _border_vs_interior(err, edges, size, band=2, margin=4):
    """Mean error within ``band`` pixels of any internal tile edge vs. farther than ``margin``
    from every tile edge; both exclude ``margin`` pixels at the frame border (bad for the whole
    pass too)."""
    centre = np.arange(size) + 0.5
    dist = np.full(size, np.inf)
    for e in edges:
        dist = np.minimum(dist, np.abs(centre - e))
    inside = np.minimum(centre, size - centre) > margin
    near = (dist < band)[:, None] | (dist < band)[None, :]
    far = (dist > margin)[:, None] & (dist > margin)[None, :]
    frame = inside[:, None] & inside[None, :]
    return err[near & frame].mean(), err[far & frame].mean()


def test_tiling_blends_without_seams(trained_vae):
    size, s = 64, 2
    x = _smooth_fields(np.random.default_rng(1), 32, size)
    sv = StreamingVAE(trained_vae, chunk=None)
    with _optimized():
        whole = np.abs(sv.decode(sv.encode(x)) - x).mean(axis=(0, 1, 4))
    ratios = {}
    for name, tile, overlap in (("naive", 32, 0), ("blended", 32, 16), ("cosine", 32, 16)):
        t = sv.replace(tile=tile, overlap=overlap, blend="cosine" if name == "cosine" else "linear")
        with _optimized():
            err = np.abs(t.decode(t.encode(x)) - x).mean(axis=(0, 1, 4))
        starts = tile_starts(size // s, tile // s, overlap // s)
        edges = {a * s for a in starts} | {(a + tile // s) * s for a in starts}
        edges = sorted(e for e in edges if 0 < e < size)
        border, interior = _border_vs_interior(err, edges, size)
        ratios[name] = border / interior
        # Tiling may cost a little everywhere (per-tile GroupNorm statistics), not much.
        assert interior < 1.5 * _border_vs_interior(whole, edges, size)[1]
    # Blended: error at tile borders no larger than inside (5% for sampling noise: the two
    # regions hold different pixels of random images). Naive: clearly larger, so the measure
    # would catch seams.
    assert ratios["blended"] <= 1.05, ratios
    assert ratios["cosine"] <= 1.05, ratios
    assert ratios["naive"] >= 1.3, ratios


# ---------------------------------------------------------------- errors


def test_errors():
    vae = CausalVAE(**CONFIGS["td4"], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="chunk"):
        StreamingVAE(vae, chunk=0)
    with pytest.raises(ValueError, match="multiples of spatial_downsample"):
        StreamingVAE(vae, tile=18)
    with pytest.raises(ValueError, match="smaller than tile"):
        StreamingVAE(vae, tile=16, overlap=16)
    with pytest.raises(ValueError, match="blend"):
        StreamingVAE(vae, blend="gauss")
    sv = StreamingVAE(vae)
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        sv.encode(_video(6, H=8, W=8))
    with pytest.raises(ValueError, match="latents of shape"):
        sv.decode(np.zeros((1, 2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        sv.decode(np.zeros((1, 2, 2, 2, 4), np.float32), out=np.zeros((1, 4, 8, 8, 3)))
    # Chunk-level errors are raised while tracing: check them abstractly (nothing compiled).
    gd, st = nnx.split(vae)

    def trace(fn, *shapes):
        jax.eval_shape(lambda st, *a: fn(nnx.merge(gd, st), *a), st,
                       *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))

    def later_encode(m, x0, x1):
        cache = FeatureCache()
        m.encode(x0, cache)
        return m.encode(x1, FeatureCache(cache.feats))

    with pytest.raises(ValueError, match="multiple of temporal_downsample"):
        trace(later_encode, (1, 1, 8, 8, 3), (1, 3, 8, 8, 3))

    def short_cache(m, z):
        # A cache with too few slots (from another model) is refused, not silently misused.
        cache = FeatureCache()
        m.decode(z, cache)
        return m.decode(z, FeatureCache(cache.feats[:1]))

    with pytest.raises(ValueError, match="different model"):
        trace(short_cache, (1, 1, 2, 2, 4))
