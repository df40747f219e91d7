"""Sampling from a trained run: prompts (and optional context latents) -> latents -> videos.

:class:`Generator` holds a run's autoencoder, DiT and text encoder. Requests of any shapes are
packed into shared rows (NaViT) and denoised in one sampler call; a request may carry clean
context latent frames (image and video prompts, :mod:`sora_jax.diffusion.conditioning`) or an
input latent to edit from a given strength (SDEdit). The prompt modes built on it (i2v,
extension, connection, loops, editing) live in :mod:`sora_jax.inference.modes`.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.data.packing import pack, patchify, unpack, unpatchify
from sora_jax.diffusion.conditioning import token_condition_mask
from sora_jax.diffusion.flow import shift_time, time_shift_for_tokens
from sora_jax.diffusion.samplers import SOLVERS, sample
from sora_jax.errors import StageError
from sora_jax.inference.latents import load_codec
from sora_jax.io import to_float, to_uint8
from sora_jax.inference.text import load_text_encoder
from sora_jax.models.factory import build_dit, image_conditioned_dit, latent_shape
from sora_jax.train.run_folder import checkpoint_fingerprint, has_ema, paths, restore

log = logging.getLogger("sora_jax")

WEIGHTS = ("ema", "raw")


class Request(NamedTuple):
    """One generation request.

    prompt: text (already extended; see :mod:`sora_jax.inference.prompts`).
    frames, height, width: pixel shape of the video (frames = 1 + td k; 1 is an image).
    context: optional (t, h, w, c) float32 normalised latent of the video's shape; its frames
      where ``context_frames`` is True are given as clean context and kept unchanged.
    context_frames: optional (t,) bool over latent frames.
    init: optional (t, h, w, c) normalised latent to edit (SDEdit, Meng et al. 2022).
    strength: SDEdit strength s in [0, 1] with ``init``: the sampler starts at u = s, from
      (1 - t_s) init + t_s noise; 0 returns ``init``, 1 ignores it (plain generation).
    noise: optional (t, h, w, c) float32 starting noise of the latent's shape (default: drawn
      with ``[seed, i]``), e.g. to reproduce another implementation's sample from its noise.
    """

    prompt: str
    frames: int
    height: int
    width: int
    context: np.ndarray | None = None
    context_frames: np.ndarray | None = None
    init: np.ndarray | None = None
    strength: float = 1.0
    noise: np.ndarray | None = None


class Generator:
    """Video generation with the trained autoencoder, DiT and text encoder of a run folder.

    Args:
      cfg: the run's config.
      workdir: the run folder (needs ``vae/`` and ``dit/`` checkpoints).
      weights: the DiT's weights: ``"ema"`` (the EMA of its parameters,
        :mod:`sora_jax.train.ema`; a run trained without one falls back to the raw weights, with
        a warning) or ``"raw"`` (the last iterate); None: ``cfg.sample.weights``. The ones used
        are in ``self.weights``.

    Raises:
      StageError: a checkpoint is missing or does not match the config, unknown ``weights``, or
        an image-to-video DiT (:func:`~sora_jax.models.factory.image_conditioned_dit`).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, weights: str | None = None):
        why = image_conditioned_dit(cfg)
        if why:
            raise StageError(f"{workdir}: {why}")
        self.cfg = cfg
        self.workdir = workdir
        self.codec = load_codec(cfg, workdir)
        self.text_encoder = load_text_encoder(cfg, workdir)
        self._negative_cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # with_weights shares it
        self._load_dit(cfg.sample.weights if weights is None else weights)

    def _load_dit(self, weights: str):
        if weights not in WEIGHTS:
            raise StageError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        run = paths(self.workdir)["dit"]
        if weights == "ema" and os.path.isdir(run) and not has_ema(run):
            log.warning("the DiT checkpoint in %s holds no EMA of its weights (trained with "
                        "dit_train.ema.profile 'none'?): sampling from the raw weights", run)
            weights = "raw"
        self.weights = weights
        # remat only shapes the backward pass, which sampling has none of; unrolled remat blocks
        # inside the sampler's fori_loop also trip NNX's trace-level check
        cfg = self.cfg
        if cfg.dit.remat and not cfg.dit.scan_layers:
            cfg = ml_collections.ConfigDict(cfg.to_dict())
            cfg.dit.remat = False
        self.dit = build_dit(cfg)
        self.dit_step = (restore(self.dit, run, "dit", subtree="weights", item="ema") if weights == "ema"
                         else restore(self.dit, run, "dit"))
        self._hashes: dict[str, str] | None = None

    def _negative_text(self, prompt: str, max_text: int) -> tuple[np.ndarray, np.ndarray]:
        # encoded once per generator: umT5-XXL is the costliest model outside the sampler loop
        key = (prompt, max_text)
        if key not in self._negative_cache:
            self._negative_cache[key] = self.text_encoder.encode([prompt], pad_to=max_text)
        return self._negative_cache[key]

    def with_weights(self, weights: str) -> "Generator":
        """A Generator of the same run with the DiT's ``weights`` ("ema" or "raw"; see the
        class), sharing this one's autoencoder and text encoder (only the DiT is loaded).

        Raises:
          StageError: unknown ``weights`` or an unreadable DiT checkpoint.
        """
        other = copy.copy(self)
        other._load_dit(weights)
        return other

    def checkpoint_hashes(self) -> dict[str, str]:
        """``checkpoint_sha256`` (DiT: of the weights used, the EMA's or the raw ones) and
        ``vae_checkpoint_sha256``: the SHA-256 fingerprints of the weights of the run's latest
        checkpoints (:func:`sora_jax.train.run_folder.checkpoint_fingerprint`), hashed once per
        Generator."""
        if self._hashes is None:
            run = paths(self.workdir)
            item = "ema" if self.weights == "ema" else "model"
            self._hashes = {"checkpoint_sha256": checkpoint_fingerprint(run["dit"], item=item)["sha256"],
                            "vae_checkpoint_sha256": checkpoint_fingerprint(run["vae"])["sha256"]}
        return dict(self._hashes)

    @property
    def temporal_downsample(self) -> int:
        return int(self.cfg.vae.temporal_downsample)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent (t, h, w, c) for a pixel request; StageError if the request is impossible."""
        return latent_shape(self.cfg, frames, height, width)

    def encode(self, video: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 or float [-1, 1] -> (t, h, w, c) float32 normalised latent."""
        return np.asarray(self.codec.encode(to_float(video)[None])[0], np.float32)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(t, h, w, c) normalised latent -> (T, H, W, 3) uint8 video."""
        return to_uint8(self.codec.decode(np.asarray(latent)[None])[0])

    def __call__(self, prompts: list[str], *, frames: int, height: int, width: int, seed: int,
                 guidance: float, steps: int, solver: str = "euler") -> list[np.ndarray]:
        """Generates one uint8 video (frames, height, width, 3) per prompt (one shape for all)."""
        return self.generate([Request(p, frames, height, width) for p in prompts], seed=seed,
                             guidance=guidance, steps=steps, solver=solver)

    def generate(self, requests: list[Request], *, seed: int, guidance: float | None, steps: int,
                 solver: str = "euler", visual_guidance: float | None = None) -> list[np.ndarray]:
        """One uint8 video (frames, height, width, 3) per request; see :meth:`sample_latents`."""
        return [self.decode(z) for z in self.sample_latents(
            requests, seed=seed, guidance=guidance, steps=steps, solver=solver,
            visual_guidance=visual_guidance)]

    def sample_latents(self, requests: list[Request], *, seed: int, guidance: float | None,
                       steps: int, solver: str = "euler",
                       visual_guidance: float | None = None) -> list[np.ndarray]:
        """Samples one normalised latent (t, h, w, c) per request, each at its own size.

        Requests are packed first-fit into shared rows and denoised together in one sampler
        call (:func:`sora_jax.diffusion.samplers.sample`), each with the timestep shift of its
        own token count. Request i starts from noise drawn with ``[seed, i]``, and a sample
        does not depend on which other requests share its call (attention never crosses
        segments).

        Args:
          requests: see :class:`Request`.
          seed: noise seed.
          guidance: text CFG scale (None: conditional prediction only).
          steps: solver steps.
          solver: "euler", "heun", "dpmpp_2m" or "unipc".
          visual_guidance: CFG scale on the context frames (None: none); used only when some
            request has context.

        Raises:
          StageError: an impossible shape, a context / init latent of the wrong shape, a
            strength outside [0, 1], or an unknown solver.
        """
        if not requests:
            raise StageError("generate needs at least one request")
        if solver not in SOLVERS:
            raise StageError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        if steps < 1:
            raise StageError(f"steps must be >= 1, got {steps}")
        patch = tuple(self.cfg.dit.patch)
        shapes = [self.latent_shape(r.frames, r.height, r.width) for r in requests]
        max_text = self.cfg.text.max_length
        # one prompt at a time: a batch's size changes the encoder's float rounding, and a
        # sample must not depend on the other requests of its call
        encoded = [self.text_encoder.encode([r.prompt], pad_to=max_text) for r in requests]
        f = self.cfg.flow
        examples, grids, per_token = [], [], []
        for i, (r, shape) in enumerate(zip(requests, shapes)):
            if r.noise is not None:
                _check_latent(r.noise, shape, "noise")
                noise = np.asarray(r.noise, np.float32)
            else:
                noise = np.random.default_rng([seed, i]).standard_normal(shape).astype(np.float32)
            n_tokens = int(np.prod([s // p for s, p in zip(shape[:3], patch)]))
            shift = float(time_shift_for_tokens(n_tokens, f.base_tokens, f.max_shift))
            x, start = noise, 1.0
            if r.init is not None:
                if not 0.0 <= r.strength <= 1.0:
                    raise StageError(f"edit strength must be in [0, 1], got {r.strength}")
                _check_latent(r.init, shape, "init")
                if r.strength < 1.0:  # at 1 the start is pure noise, bit for bit as without init
                    t0 = float(shift_time(r.strength, shift))
                    x, start = (1.0 - t0) * r.init.astype(np.float32) + t0 * noise, float(r.strength)
            tokens, positions = patchify(x, patch)
            cond = np.zeros(tokens.shape[0], bool)
            if r.context is not None:
                _check_latent(r.context, shape, "context")
                frames_mask = np.asarray(r.context_frames, bool)
                if frames_mask.shape != (shape[0],):
                    raise StageError(f"context_frames must have shape ({shape[0]},), got {frames_mask.shape}")
                cond = token_condition_mask(frames_mask, positions, patch[0])
                ctx_tokens, _ = patchify(r.context.astype(np.float32), patch)
                tokens = np.where(cond[:, None], ctx_tokens, tokens)
            s, m = encoded[i][0][0], encoded[i][1][0]
            examples.append(dict(tokens=tokens, positions=positions, text=s, text_mask=m))
            per_token.append((shift, cond, start))
            grids.append((shape[0] // patch[0], shape[1] // patch[1], shape[2] // patch[2]))
        longest = max(e["tokens"].shape[0] for e in examples)
        length = max(self.cfg.dit_train.row_length, -(-longest // 64) * 64)
        per_row = max(1, self.cfg.dit_train.text_length // max_text)
        batch, placements, dropped = pack(examples, batch_size=len(examples), length=length,
                                          text_length=per_row * max_text)
        if dropped:
            raise StageError(f"internal: {dropped} requests did not fit the sampler rows")
        rows = max(pl.row for pl in placements) + 1  # first-fit fills rows in order
        batch = {k: v[:rows] for k, v in batch.items()}
        negative = None
        if guidance is not None and not self.cfg.dit.get("text_null_token", True):
            # a DiT without a null text (Wan 2.1) guides against a negative prompt's states, laid
            # out as the prompts' (same token and text counts: the same first-fit placements)
            s_neg, m_neg = self._negative_text(self.cfg.sample.get("negative_prompt", ""), max_text)
            neg, neg_placements, _ = pack([dict(e, text=s_neg[0], text_mask=m_neg[0]) for e in examples],
                                          batch_size=len(examples), length=length, text_length=per_row * max_text)
            if neg_placements != placements:
                raise StageError("internal: the negative prompt's text does not pack as the prompts' did")
            negative = (jnp.asarray(neg["text"][:rows]), jnp.asarray(neg["text_segment_ids"][:rows]))
        shift = np.ones(batch["segment_ids"].shape, np.float32)
        start = np.ones(batch["segment_ids"].shape, np.float32)
        cond_mask = np.zeros(batch["segment_ids"].shape, bool)
        for pl, (sh, cond, u0) in zip(placements, per_token):
            rows_cols = (pl.row, slice(pl.start, pl.start + pl.n))
            shift[rows_cols], cond_mask[rows_cols], start[rows_cols] = sh, cond, u0
        any_context = bool(cond_mask.any())
        out = sample(
            self.dit, x=jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"]),
            positions=jnp.asarray(batch["positions"]), text=jnp.asarray(batch["text"]),
            text_segment_ids=jnp.asarray(batch["text_segment_ids"]), num_steps=int(steps),
            solver=solver,
            guidance_scale=None if guidance is None else jnp.asarray(guidance, jnp.float32),
            visual_guidance_scale=(jnp.asarray(visual_guidance, jnp.float32)
                                   if visual_guidance is not None and any_context else None),
            shift=jnp.asarray(shift), cond_mask=jnp.asarray(cond_mask) if any_context else None,
            start=jnp.asarray(start),
            negative_text=None if negative is None else negative[0],
            negative_text_segment_ids=None if negative is None else negative[1],
        )
        tokens = unpack(np.asarray(out), placements)
        return [unpatchify(tk, g, patch, shape[3]) for tk, g, shape in zip(tokens, grids, shapes)]


def _check_latent(z: np.ndarray, shape: tuple[int, ...], what: str):
    if np.shape(z) != tuple(shape):
        raise StageError(f"{what} latent has shape {np.shape(z)}, expected {tuple(shape)}")
