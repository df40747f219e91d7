"""The linear patch shortcut: block layout, causality, and PCA initialisation."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.patch_shortcut import LinearPatchShortcut
from sora_jax.models.vae import CausalVAE


def _video(n, T, H, W, seed=0):
    # smooth random video: a low-rank signal the PCA code can capture, plus a little noise
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, T)[:, None, None, None]
    y = np.linspace(0, 1, H)[None, :, None, None]
    x = np.linspace(0, 1, W)[None, None, :, None]
    out = []
    for _ in range(n):
        a, b, c, ph = rng.uniform(1, 4, 4)
        v = np.sin(a * y * 3 + b * x * 2 + c * t + ph) * rng.uniform(0.3, 0.9, (1, 1, 1, 3))
        out.append(v + 0.05 * rng.standard_normal((T, H, W, 3)))
    return np.clip(np.stack(out), -1, 1).astype(np.float32)


def test_blocks_round_trip_and_first_frame_alone():
    sc = LinearPatchShortcut(3, 4, spatial=2, temporal=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(_video(2, 9, 8, 6))
    blocks = sc.blocks(x)
    assert blocks.shape == (2, 3, 4, 3, 4 * 2 * 2 * 3)
    np.testing.assert_array_equal(np.asarray(sc.unblocks(blocks)), np.asarray(x))
    # latent 0's block is frame 0 repeated: it depends on frame 0 only
    y = x.at[:, 1:].set(0.0)
    np.testing.assert_array_equal(np.asarray(sc.blocks(y)[:, 0]), np.asarray(blocks[:, 0]))
    # a later time chunk (no frame 0) gives the blocks of the same frames of the whole video
    np.testing.assert_array_equal(np.asarray(sc.blocks(x[:, 5:], first=False)),
                                  np.asarray(blocks[:, 2:]))


def test_pca_init_makes_the_vae_the_pca_code():
    """With the conv paths at their zero start, a PCA-initialised VAE reconstructs exactly as a
    rank-c PCA of the (4, 4, 4, 3) blocks computed here with numpy."""
    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 2), spatial_downsample=4,
                    temporal_downsample=4, patch_shortcut=True, rngs=nnx.Rngs(0))
    train = _video(16, 9, 16, 16, seed=1)
    kept = vae.shortcut.init_from_data(train)
    assert 0.5 < kept <= 1.0

    # numpy reference: frame 0 repeated 4x, then 4-frame groups, 4x4 pixels
    def blocks(v):
        v = np.concatenate([np.repeat(v[:, :1], 3, 1), v], 1)
        n, T, H, W, C = v.shape
        return v.reshape(n, T // 4, 4, H // 4, 4, W // 4, 4, C).transpose(
            0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, 4 * 16 * C)

    b = blocks(train).astype(np.float64)
    mu = b.mean(0)
    _, _, vt = np.linalg.svd(b - mu, full_matrices=False)
    p = vt[:4]
    test = _video(3, 9, 16, 16, seed=2)
    ref = (blocks(test) - mu) @ p.T @ p + mu
    mean, _ = vae.encode(jnp.asarray(test))
    recon = np.asarray(vae.decode(mean))
    # back to blocks, dropping the 3 padding frames the reference's frame-0 block repeats
    got = blocks(recon).reshape(3, 3, 4, 4, -1)
    ref = ref.reshape(3, 3, 4, 4, 4, 16 * 3)[:, :, :, :, 3:]
    got = got.reshape(3, 3, 4, 4, 4, 16 * 3)[:, :, :, :, 3:]
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=2e-4)
    # frame 0 is the last of latent 0's repeated block
    np.testing.assert_allclose(got[:, 0, ..., -1, :], ref[:, 0, ..., -1, :], atol=2e-4)
    # and the PCA code beats the mean predictor by far on held-out video
    err = np.mean((recon - test) ** 2)
    assert err < 0.2 * np.mean((test - test.mean()) ** 2)


def test_shortcut_keeps_the_vae_causal():
    vae = CausalVAE(latent_channels=4, base_channels=8, channel_mults=(1, 2), spatial_downsample=4,
                    temporal_downsample=4, patch_shortcut=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(_video(1, 9, 8, 8))
    y = x.at[:, 5:].set(-x[:, 5:])  # change frames after latent 1's block
    (ma, _), (mb, _) = vae.encode(x), vae.encode(y)
    np.testing.assert_array_equal(np.asarray(ma[:, :2]), np.asarray(mb[:, :2]))
    assert not np.allclose(np.asarray(ma[:, 2]), np.asarray(mb[:, 2]))
    za = ma.at[:, 2].set(0.0)
    ra, rb = vae.decode(ma), vae.decode(za)
    np.testing.assert_array_equal(np.asarray(ra[:, :5]), np.asarray(rb[:, :5]))
