"""The image-context projection of Wan 2.1's image-to-video DiT (diffusers ``WanImageEmbedding``).

Wan 2.1 I2V (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models", §4.2)
conditions its DiT on the first frame twice: the frame's VAE latents enter as extra input
channels, and the penultimate hidden states of a CLIP ViT-H/14 image encoder (257 tokens of
1280) are projected to model width by this module and attended by a second key/value set in
every cross-attention (:class:`~sora_jax.models.dit.CrossAttention` with ``image_context``).
The first-last-frame model (FLF2V) adds a learned position table over the two frames' tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.layers import dense
from sora_jax.parallel.axes import EMBED, IN_FEATURES, MLP as MLP_AXIS, NORM
from sora_jax.parallel.sharding import partitioned

__all__ = ["CLIP_IMAGE_TOKENS", "ImageEmbedder"]

# image tokens per image of Wan's CLIP ViT-H/14 at 224 px: 16 x 16 patches and the class token
CLIP_IMAGE_TOKENS = 257

# torch.nn.LayerNorm's default, which diffusers' FP32LayerNorm keeps (our own norms use 1e-6)
_EPS = 1e-5


def _affine_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # computed in float32 whatever the model's compute dtype, as diffusers' FP32LayerNorm
    return nnx.LayerNorm(dim, epsilon=_EPS, dtype=jnp.float32,
                         scale_init=partitioned(nnx.initializers.ones_init(), (NORM,)),
                         bias_init=partitioned(nnx.initializers.zeros_init(), (NORM,)), rngs=rngs)


class ImageEmbedder(nnx.Module):
    """LayerNorm -> Linear -> GELU (exact erf form) -> Linear -> LayerNorm, from image-encoder
    width to model width; both norms affine with eps 1e-5.

    Args:
      image_dim: width of the image-encoder states (CLIP ViT-H/14: 1280).
      hidden_size: model width.
      pos_len: None, or the number of image tokens per example; then a learned (pos_len,
        image_dim) table (zero-initialised) is added first (FLF2V: 2 x 257).
      rngs, dtype: NNX random streams; compute dtype of the Linears.

    Call: image (B, Li, image_dim) float -> (B, Li, hidden_size) float32.

    Raises:
      ValueError: at call, ``pos_len`` is set and Li differs from it.
    """

    def __init__(self, image_dim: int, hidden_size: int, *, pos_len: int | None = None, rngs: nnx.Rngs,
                 dtype=None):
        self.norm1 = _affine_norm(image_dim, rngs)
        self.fc1 = dense(image_dim, image_dim, dtype=dtype, rngs=rngs, axes=(IN_FEATURES, MLP_AXIS))
        self.fc2 = dense(image_dim, hidden_size, dtype=dtype, rngs=rngs, axes=(MLP_AXIS, EMBED))
        self.norm2 = _affine_norm(hidden_size, rngs)
        self.pos_len = pos_len
        self.pos = nnx.Param(partitioned(nnx.initializers.zeros, (None, NORM))(
            rngs.params(), (pos_len, image_dim), jnp.float32)) if pos_len else None

    def __call__(self, image: jax.Array) -> jax.Array:
        if self.pos is not None:
            if image.shape[1] != self.pos_len:
                raise ValueError(f"this image embedder has positions for {self.pos_len} image tokens per example, "
                                 f"got {image.shape[1]}")
            image = image + self.pos[...].astype(image.dtype)
        h = self.fc1(self.norm1(image))
        return self.norm2(self.fc2(jax.nn.gelu(h, approximate=False))).astype(jnp.float32)
