"""Chunked (in time) and tiled (in space) encode / decode of a ``CausalVAE``, numpy in and out.

**Time chunks with a feature cache.** The VAE is causal in time, so a video can be pushed
through it a few frames at a time if every temporal convolution remembers the last frames of
its input from the previous chunk: the feature cache of the Wan 2.1 VAE (Wan Team 2025, "Wan:
Open and Advanced Large-Scale Video Generative Models", ``feat_cache``), here
``sora_jax.models.vae.FeatureCache``, exact for the strided causal convs of MAGVIT-v2 (Yu et al.
2024). As in Wan, the encoder sees frame 0 alone, then chunks of ``temporal_downsample * chunk``
frames; the decoder sees latent frame 0 alone, then ``chunk`` latent frames at a time. The
output equals the whole-video pass up to float rounding, and the device memory of a pass is
that of one chunk plus the cache (about two frames per conv), whatever the video's length.
Under ``jax.jit`` each direction compiles twice: once for the first chunk (no cache in) and
once for all later chunks (cache pytree in and out, fixed shapes: the last chunk is padded at
its end by repeating its last frame, which causality makes harmless, and the padding's outputs
are dropped). Each chunk's output is moved to host memory as soon as it is computed.
With JAX's default asynchronous dispatch on CPU, XLA marks a chunk's outputs ready before its
worker thread frees the chunk's temporaries, so on a busy machine the next chunk can start
while they are still held: the peak may then briefly be about two chunks' working memory
(not growing with the length). ``jax.config.update("jax_cpu_enable_async_dispatch",
False)`` before JAX's first computation makes each chunk free them before the next starts.

**Spatial tiles with overlap blending.** For frames too large for one pass, the latent grid is
cut into overlapping tiles (all of one size, so one compile serves them; the last tile of a row
or column is moved back to end at the border); each tile is coded on its own and the tiles are
blended with weights that ramp linearly (or along a half cosine) from ~0 at a tile's edge to 1
across each overlap, normalised to sum to 1 at every pixel, as in the tiled VAEs of
diffusers / CogVideoX / HunyuanVideo. Per-frame GroupNorm statistics and zero 'SAME' padding
differ between a tile and the whole frame, so tiled output never equals the whole pass; the
ramps hide that difference where two tiles meet (no visible seams). Tiling combines with time
chunking: each tile keeps its own feature cache.

Shapes are channels-last: video (B, T, H, W, C) float in [-1, 1]; latents (B, t, h, w, c).
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.vae import CausalVAE, FeatureCache

__all__ = ["FeatureCache", "StreamingVAE", "blend_weights", "tile_starts"]


def _pair(x: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return (int(x), int(x))
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {x}")
    return x  # type: ignore[return-value]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``, overlapping by >= overlap.

    Tiles step by ``tile - overlap``; the last one is moved back to end exactly at ``size`` (so
    its overlap with the one before may be larger), keeping every tile the same length. A size
    no larger than ``tile`` gives one tile at 0 (the caller then uses ``tile = size``).

    Args:
      size, tile, overlap: ints in any one unit (here latent pixels), 0 <= overlap < tile.

    Returns:
      Increasing list of int starts; the first is 0, the last is max(size - tile, 0).

    Raises:
      ValueError: if tile < 1 or overlap is not in [0, tile).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
                         f"overlap={overlap}")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    starts.append(size - tile)
    return starts


def blend_weights(starts: Sequence[int], tile: int, scale: int = 1,
                  kind: str = "linear") -> list[np.ndarray]:
    """1-D blending weights of each tile along one axis, in output units.

    Across the overlap of two neighbouring tiles (``scale`` output pixels per tile unit) the
    left tile's weight falls and the right tile's rises, linearly or along a half cosine, from
    (0.5 / overlap) to 1 - (0.5 / overlap); weights are 1 elsewhere and never 0, so dividing by
    their sum at each pixel (what ``StreamingVAE`` does) is always defined and makes them a
    partition of unity even where the last tile overlaps more.

    Args:
      starts: tile starts from ``tile_starts``.
      tile: tile length in input units.
      scale: output pixels per input unit (spatial_downsample when decoding, 1 when encoding).
      kind: "linear" or "cosine".

    Returns:
      One float32 array of length tile * scale per tile.

    Raises:
      ValueError: for an unknown ``kind``.
    """
    if kind not in ("linear", "cosine"):
        raise ValueError(f"blend must be 'linear' or 'cosine', got {kind!r}")
    n = tile * scale
    pos = np.arange(n, dtype=np.float64) + 0.5
    out = []
    for i, s in enumerate(starts):
        w = np.ones(n)
        if i > 0:
            left = (starts[i - 1] + tile - s) * scale
            if left > 0:
                w = np.minimum(w, pos / left)
        if i + 1 < len(starts):
            right = (s + tile - starts[i + 1]) * scale
            if right > 0:
                w = np.minimum(w, (n - pos) / right)
        if kind == "cosine":
            w = 0.5 - 0.5 * np.cos(np.pi * w)
        out.append(w.astype(np.float32))
    return out


def _pad_time(x: np.ndarray, length: int) -> np.ndarray:
    """Pads axis 1 at its end to ``length`` by repeating the last frame."""
    n = x.shape[1]
    if n == length:
        return x
    return np.concatenate([x, np.repeat(x[:, -1:], length - n, axis=1)], axis=1)


class StreamingVAE:
    """Encodes and decodes videos of any length and size with a ``CausalVAE``, chunk by chunk.

    Time chunking (Wan 2.1 VAE feature cache, exact for MAGVIT-v2 causal convs) keeps memory
    independent of the video's length; spatial tiling with overlap blending keeps it independent
    of the frame size. See the module docstring for the method.

    Args:
      vae: a ``CausalVAE``. ``nnx.split`` shares its Variables, so in-place updates of the
        model (a checkpoint restore, new latent statistics) are seen by later calls.
      chunk: latent frames per time chunk after the first (which is latent frame 0 alone:
        encoder input frame 0, decoder output frame 0), i.e. ``temporal_downsample * chunk``
        video frames; None: no time chunking (one whole pass per tile, memory grows with T).
        Larger chunks run faster per frame and need proportionally more memory.
      tile: spatial tile size in pixels, int or (height, width), positive multiples of
        ``spatial_downsample``; None: whole frames. Frames no larger than a tile are not tiled.
      overlap: tile overlap in pixels, int or (height, width), multiples of
        ``spatial_downsample`` below the tile size; None: a quarter of the tile (rounded down to
        a multiple of ``spatial_downsample``). 0 gives naive, seamed tiling.
      blend: overlap ramp, "linear" or "cosine".

    ``replace(chunk=..., tile=..., overlap=..., blend=...)`` gives a copy with other settings that
    shares the compiled programs.

    Attributes:
      trace_counts: ``collections.Counter`` of how many times each jitted step was traced
        (= compiled): keys "encode_first", "encode_rest", "encode_whole", "decode_first",
        "decode_rest", "decode_whole".

    Raises:
      ValueError: chunk < 1; tile or overlap not multiples of spatial_downsample; overlap not
        below tile; unknown blend.
    """

    def __init__(
        self,
        vae: CausalVAE,
        *,
        chunk: int | None = 1,
        tile: int | Sequence[int] | None = None,
        overlap: int | Sequence[int] | None = None,
        blend: str = "linear",
    ):
        self.spatial_downsample = vae.spatial_downsample
        self.temporal_downsample = vae.temporal_downsample
        self.in_channels = vae.in_channels
        self.latent_channels = vae.latent_channels
        self._set_layout(chunk, tile, overlap, blend)
        self._vae = vae
        self._graphdef, self._state = nnx.split(vae)
        self.trace_counts: collections.Counter = collections.Counter()
        graphdef, counts = self._graphdef, self.trace_counts

        def jitted(method: str):
            """(whole pass, one chunk with the feature cache) of ``vae.<method>``, jitted; the
            chunk function returns (output, cache features)."""
            def whole(state, x):
                counts[f"{method}_whole"] += 1
                return getattr(nnx.merge(graphdef, state), method)(x)

            def chunk(state, x, feats):
                # feats None (first chunk) and a list (later chunks) are different pytrees, so
                # jit traces this twice in all: once per kind of chunk.
                counts[f"{method}_first" if feats is None else f"{method}_rest"] += 1
                cache = FeatureCache(feats)
                return getattr(nnx.merge(graphdef, state), method)(x, cache), cache.feats

            return jax.jit(whole), jax.jit(chunk)

        self._encode_whole, self._encode_chunk = jitted("encode")
        self._decode_whole, self._decode_chunk = jitted("decode")

    def _set_layout(self, chunk, tile, overlap, blend) -> None:
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1):
            raise ValueError(f"chunk must be an int >= 1 (latent frames) or None, got {chunk!r}")
        if blend not in ("linear", "cosine"):
            raise ValueError(f"blend must be 'linear' or 'cosine', got {blend!r}")
        s = self.spatial_downsample
        self.chunk = None if chunk is None else int(chunk)
        self.blend = blend
        if tile is None:
            self.tile = None
            self.overlap = (0, 0)
            return
        tile = _pair(tile, "tile")
        if overlap is None:
            overlap = tuple(t // 4 // s * s for t in tile)
        overlap = _pair(overlap, "overlap")
        for name, v in (("tile", tile), ("overlap", overlap)):
            if any(x % s or x < 0 for x in v) or (name == "tile" and min(v) < s):
                raise ValueError(
                    f"{name}={v} pixels must be {'positive ' if name == 'tile' else ''}"
                    f"multiples of spatial_downsample={s}"
                )
        if any(o >= t for o, t in zip(overlap, tile)):
            raise ValueError(f"overlap={overlap} must be smaller than tile={tile}")
        self.tile = tile
        self.overlap = overlap

    _UNSET = object()

    def replace(self, *, chunk=_UNSET, tile=_UNSET, overlap=_UNSET, blend=_UNSET) -> StreamingVAE:
        """A copy with other chunk / tile / overlap / blend settings (same meaning and errors as
        the constructor; unnamed ones are kept, except that a new ``tile`` without ``overlap``
        takes the default overlap). The copy shares this one's parameters, jitted programs and
        ``trace_counts``, so shapes already compiled are not compiled again.
        """
        new = copy.copy(self)
        unset = StreamingVAE._UNSET
        if tile is not unset and overlap is unset:
            overlap = None
        new._set_layout(
            self.chunk if chunk is unset else chunk,
            self.tile if tile is unset else tile,
            self.overlap if overlap is unset else overlap,
            self.blend if blend is unset else blend,
        )
        return new

    # ------------------------------------------------------------------ planning

    def _tiles(self, h: int, w: int):
        """Latent-space tiles: (list of (h0, w0), tile (th, tw), starts_h, starts_w)."""
        if self.tile is None:
            return [(0, 0)], (h, w), [0], [0]
        s = self.spatial_downsample
        th, tw = self.tile[0] // s, self.tile[1] // s
        oh, ow = self.overlap[0] // s, self.overlap[1] // s
        th, tw = min(th, h), min(tw, w)
        sh = tile_starts(h, th, min(oh, th - 1))
        sw = tile_starts(w, tw, min(ow, tw - 1))
        return [(a, b) for a in sh for b in sw], (th, tw), sh, sw

    def _blend_maps(self, tiles, size, sh, sw, scale, full_hw):
        """Per-tile (th*scale, tw*scale, 1) weights, pre-divided by their sum over tiles."""
        th, tw = size
        if len(tiles) == 1:
            return [None]
        wh = blend_weights(sh, th, scale, self.blend)
        ww = blend_weights(sw, tw, scale, self.blend)
        maps = {}
        total = np.zeros(full_hw, np.float32)
        for i, a in enumerate(sh):
            for j, b in enumerate(sw):
                m = np.outer(wh[i], ww[j])
                maps[(a, b)] = m
                total[a * scale:(a + th) * scale, b * scale:(b + tw) * scale] += m
        return [
            (maps[(a, b)] / total[a * scale:(a + th) * scale, b * scale:(b + tw) * scale])
            [..., None].astype(np.float32)
            for a, b in tiles
        ]

    def _check_video(self, video) -> np.ndarray:
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(f"expected video of shape (B, T, H, W, {self.in_channels}), "
                             f"got {video.shape}")
        _, T, H, W, _ = video.shape
        self._vae._check_video_dims(T, H, W, what=f"video of shape {tuple(video.shape)}")
        return video

    def _check_latents(self, z) -> np.ndarray:
        if z.ndim != 5 or z.shape[-1] != self.latent_channels or min(z.shape[1:4]) < 1:
            raise ValueError(f"expected latents of shape (B, t, h, w, {self.latent_channels}) "
                             f"with t, h, w >= 1, got {z.shape}")
        return z

    # ------------------------------------------------------------------ encode

    def iter_encode(self, video: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields the posterior (mean, logvar) chunk by chunk, in time order.

        Args:
          video: (B, T, H, W, in_channels) float pixels in [-1, 1], T = 1 + td*k; numpy (a
            ``np.memmap`` is read one chunk at a time) or any array ``np.asarray`` accepts.

        Yields:
          (mean, logvar), float32 numpy (B, t_i, h, w, latent_channels) each: t_i = 1 for the
          first chunk, then ``chunk`` (fewer in the last); all t_i sum to 1 + k. Without time
          chunking, one pair for the whole video.

        Raises:
          ValueError: if the video's shape is not one ``CausalVAE.encode`` accepts.
        """
        video = self._check_video(video)
        B, T, H, W, _ = video.shape
        s, td = self.spatial_downsample, self.temporal_downsample
        h, w = H // s, W // s
        tiles, (th, tw), sh, sw = self._tiles(h, w)
        weights = self._blend_maps(tiles, (th, tw), sh, sw, 1, (h, w))
        if self.chunk is None:
            spans = [(0, T, (T - 1) // td + 1, T)]
        else:
            n = td * self.chunk
            spans = [(0, 1, 1, 1)] + [
                (lo, min(lo + n, T), (min(lo + n, T) - lo) // td, n) for lo in range(1, T, n)
            ]
        caches: list = [None] * len(tiles)
        self._num_tiles = len(tiles)
        for lo, hi, keep, length in spans:
            x = _pad_time(np.asarray(video[:, lo:hi], np.float32), length)
            if len(tiles) == 1:
                mean, logvar, caches[0] = self._encode_tile(x, caches[0])
            else:
                mean = np.zeros((B, keep, h, w, self.latent_channels), np.float32)
                logvar = np.zeros_like(mean)
                for k, (a, b) in enumerate(tiles):
                    xt = x[:, :, a * s:(a + th) * s, b * s:(b + tw) * s]
                    m, lv, caches[k] = self._encode_tile(xt, caches[k])
                    mean[:, :, a:a + th, b:b + tw] += m[:, :keep] * weights[k]
                    logvar[:, :, a:a + th, b:b + tw] += lv[:, :keep] * weights[k]
            yield mean[:, :keep], logvar[:, :keep]

    def _encode_tile(self, x: np.ndarray, feats):
        if self.chunk is None:
            mean, logvar = self._encode_whole(self._state, jnp.asarray(x))
            return np.asarray(mean, np.float32), np.asarray(logvar, np.float32), None
        (mean, logvar), feats = self._encode_chunk(self._state, jnp.asarray(x), feats)
        return np.asarray(mean, np.float32), np.asarray(logvar, np.float32), self._park(feats)

    def encode(self, video: np.ndarray, *, return_logvar: bool = False):
        """Posterior mean (and log-variance) of a video, chunked and tiled as configured.

        Args:
          video: (B, T, H, W, in_channels) float pixels in [-1, 1], T = 1 + td*k, H and W
            multiples of spatial_downsample.
          return_logvar: also return the log-variance.

        Returns:
          mean, float32 numpy (B, 1 + k, H / s, W / s, latent_channels); with return_logvar,
          (mean, logvar). Equal to ``CausalVAE.encode`` up to float rounding when not tiled.

        Raises:
          ValueError: if the video's shape is not one ``CausalVAE.encode`` accepts.
        """
        means, logvars = zip(*self.iter_encode(video))
        mean = np.concatenate(means, axis=1)
        return (mean, np.concatenate(logvars, axis=1)) if return_logvar else mean

    # ------------------------------------------------------------------ decode

    def iter_decode(self, z: np.ndarray) -> Iterator[np.ndarray]:
        """Yields decoded frames chunk by chunk, in time order, so a caller can write them out
        (e.g. to an mp4) without ever holding the whole video.

        Args:
          z: (B, t, h, w, latent_channels) float latents (numpy or anything ``np.asarray``
            accepts; a ``np.memmap`` is read one chunk at a time).

        Yields:
          float32 numpy (B, T_i, h * s, w * s, in_channels), unbounded (clip for display):
          T_i = 1 for the first chunk, then td * chunk (fewer in the last); all T_i sum to
          1 + td * (t - 1). Without time chunking, one array for the whole video.

        Raises:
          ValueError: if z is not 5-D with latent_channels channels.
        """
        z = self._check_latents(z)
        B, t, h, w, _ = z.shape
        s, td = self.spatial_downsample, self.temporal_downsample
        tiles, (th, tw), sh, sw = self._tiles(h, w)
        weights = self._blend_maps(tiles, (th, tw), sh, sw, s, (h * s, w * s))
        if self.chunk is None:
            spans = [(0, t, 1 + td * (t - 1), t)]
        else:
            spans = [(0, 1, 1, 1)] + [
                (lo, min(lo + self.chunk, t), td * (min(lo + self.chunk, t) - lo), self.chunk)
                for lo in range(1, t, self.chunk)
            ]
        caches: list = [None] * len(tiles)
        self._num_tiles = len(tiles)
        for lo, hi, keep, length in spans:
            zc = _pad_time(np.asarray(z[:, lo:hi], np.float32), length)
            if len(tiles) == 1:
                y, caches[0] = self._decode_tile(zc, caches[0])
                yield y[:, :keep]
                continue
            out = np.zeros((B, keep, h * s, w * s, self.in_channels), np.float32)
            for k, (a, b) in enumerate(tiles):
                y, caches[k] = self._decode_tile(zc[:, :, a:a + th, b:b + tw], caches[k])
                out[:, :, a * s:(a + th) * s, b * s:(b + tw) * s] += y[:, :keep] * weights[k]
            yield out

    def _decode_tile(self, z: np.ndarray, feats):
        if self.chunk is None:
            return np.asarray(self._decode_whole(self._state, jnp.asarray(z)), np.float32), None
        y, feats = self._decode_chunk(self._state, jnp.asarray(z), feats)
        return np.asarray(y, np.float32), self._park(feats)

    def _park(self, feats):
        # With several tiles, every tile's cache together is as large as a whole frame's: keep
        # them on the host between chunks so device memory holds one tile's at a time.
        return feats if self._num_tiles <= 1 else jax.device_get(feats)

    def decode(self, z: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Decodes latents to video, chunked and tiled as configured.

        Args:
          z: (B, t, h, w, latent_channels) float latents.
          out: optional preallocated float32 array (e.g. a ``np.memmap``) of the output shape to
            write into, so the host never holds a second copy.

        Returns:
          float32 numpy (B, 1 + td * (t - 1), h * s, w * s, in_channels) (``out`` if given),
          unbounded (clip for display). Equal to ``CausalVAE.decode`` up to float rounding when
          not tiled.

        Raises:
          ValueError: if z is not 5-D with latent_channels channels, or ``out`` has the wrong
            shape.
        """
        z = self._check_latents(z)
        B, t, h, w, _ = z.shape
        s = self.spatial_downsample
        shape = (B, 1 + self.temporal_downsample * (t - 1), h * s, w * s, self.in_channels)
        if out is None:
            out = np.empty(shape, np.float32)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        f = 0
        for y in self.iter_decode(z):
            out[:, f:f + y.shape[1]] = y
            f += y.shape[1]
        return out

    # ------------------------------------------------------------------ inspection

    def compiled_steps(self, direction: str, shape: Sequence[int]) -> dict[str, jax.stages.Compiled]:
        """Ahead-of-time compiled per-tile steps for an input shape (nothing is run).

        For memory planning: ``compiled.memory_analysis()`` of each step gives XLA's argument,
        output and temporary buffer sizes, which bound the device memory of a whole pass.

        Args:
          direction: "encode" (shape: video (B, T, H, W, C)) or "decode" (shape: latents
            (B, t, h, w, c)).
          shape: the full input shape; tiles and chunks are derived as in ``iter_encode`` /
            ``iter_decode``.

        Returns:
          {"first": ..., "rest": ...} with time chunking (rest only when the input has more
          than one chunk), {"whole": ...} without.

        Raises:
          ValueError: for an unknown direction.
        """
        if direction not in ("encode", "decode"):
            raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
        B, T, H, W, C = (int(v) for v in shape)
        s, td = self.spatial_downsample, self.temporal_downsample
        h, w = (H // s, W // s) if direction == "encode" else (H, W)
        _, (th, tw), _, _ = self._tiles(h, w)
        if direction == "encode":
            th, tw = th * s, tw * s
            per_chunk = None if self.chunk is None else td * self.chunk
            whole, step = self._encode_whole, self._encode_chunk
        else:
            per_chunk = self.chunk
            whole, step = self._decode_whole, self._decode_chunk
        spec = lambda n: jax.ShapeDtypeStruct((B, n, th, tw, C), jnp.float32)  # noqa: E731
        if self.chunk is None:
            return {"whole": whole.lower(self._state, spec(T)).compile()}
        out = {"first": step.lower(self._state, spec(1), None).compile()}
        if T > 1:
            feats = jax.eval_shape(step, self._state, spec(1), None)[-1]
            out["rest"] = step.lower(self._state, spec(per_chunk), feats).compile()
        return out
