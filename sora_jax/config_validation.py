"""Checks of a whole run config, one validator per section, before any stage runs.

Every value a stage reads is checked here, so a bad one is a one-line :class:`ConfigError`
naming its key before anything is written (a run's ``config.json`` included). The checks read
the config only: no file is opened, no model built, no module of the user's imported.

The sections and what reads them: ``data`` (prepare-data), ``vae``, ``vae_loss``, ``vae_train``,
``vae_eval``, ``vae_inference`` (the autoencoder stages), ``text``, ``dit``, ``flow``,
``conditioning``, ``dit_train``, ``mesh`` (train-dit), ``sample``, ``prompt``, ``evaluate``
(generate, evaluate, the prompt modes), ``model_info``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from sora_jax.data import navit, real_clips, sources
from sora_jax.data.encoded import parse_mix
from sora_jax.diffusion.conditioning import conditioning_settings
from sora_jax.diffusion.samplers import SOLVERS
from sora_jax.errors import ConfigError, StageError
from sora_jax.inference.generate import WEIGHTS
from sora_jax.inference.prompts import EXTENDERS, make_filter
from sora_jax.models.attention import ATTENTION_BACKENDS
from sora_jax.models.dit import ADALN_KINDS, FINAL_MODULATIONS, POS_EMBEDS, QK_NORMS, REMAT_POLICIES
from sora_jax.models.factory import TEXT_ENCODERS, VAE_KINDS, latent_shape, wan_vae_config
from sora_jax.models.mup import PARAMETERIZATIONS
from sora_jax.models.text_encoder import BertConfig
from sora_jax.models.umt5 import UMT5Config
from sora_jax.models.vae_loss import vae_loss_settings
from sora_jax.parallel.axes import normalize_rules
from sora_jax.parallel.mesh import MESH_AXES
from sora_jax.train.ema import EMA_PROFILES

__all__ = ["SECTIONS", "validate_config"]

LOSS_WEIGHTINGS = ("per_token", "per_example")


def _bad(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {message}")


def _key(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _int(section: ml_collections.ConfigDict, name: str, key: str, low: int = 0) -> int:
    """``section[name]`` as an int >= low (bools are not ints here)."""
    v = section[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _bad(_key(key, name), f"must be an integer >= {low}, got {v!r}")
    return v


def _float(section: ml_collections.ConfigDict, name: str, key: str, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """``section[name]`` as a finite float in [low, high] (ends open where asked)."""
    v = section[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(_key(key, name), f"must be a finite number, got {v!r}")
    if ((low is not None and (v < low or (low_open and v == low)))
            or (high is not None and (v > high or (high_open and v == high)))):
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise _bad(_key(key, name), f"must be in {lo or '(-inf'}, {hi or 'inf)'}, got {v}")
    return float(v)


def _choice(section: ml_collections.ConfigDict, name: str, key: str, choices) -> str:
    v = section[name]
    if v not in choices:
        raise _bad(_key(key, name), f"{v!r} is not one of {tuple(choices)}")
    return v


def _choice_default(section: ml_collections.ConfigDict, name: str, key: str, choices, default) -> str:
    """:func:`_choice` for a key that configs saved before it existed lack (``default`` then)."""
    return _choice(section, name, key, choices) if name in section else default


def _shape(cfg: ml_collections.ConfigDict, key: str, frames: int, height: int, width: int):
    try:
        return latent_shape(cfg, frames, height, width)
    except StageError as e:
        raise _bad(key, str(e)) from None


def _training_latents(cfg: ml_collections.ConfigDict) -> list[tuple[int, int, int, int]]:
    """Latent shapes of every training example shape ``data`` makes (Moving MNIST and clips)."""
    d, out = cfg.data, []
    for key, durations, sizes in (("data.durations/data.sizes", d.durations, d.sizes),
                                  ("data.clip_durations/data.clip_sizes", d.clip_durations, d.clip_sizes)):
        out += [_shape(cfg, key, frames, height, width) for frames in durations for height, width in sizes]
    return out


def check_train(t: ml_collections.ConfigDict, key: str):
    """A training-loop section (``vae_train``, ``dit_train``: ``configs/common.py``'s
    ``train_section``)."""
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "max_to_keep"):
        _int(t, name, key, 1)
    for name in ("warmup_steps", "seed", "nonfinite_limit", "profile_start_step", "profile_steps"):
        _int(t, name, key, 0)
    if not isinstance(t.compilation_cache_dir, str):
        raise _bad(f"{key}.compilation_cache_dir", f"must be a folder path or '', got {t.compilation_cache_dir!r}")
    _float(t, "learning_rate", key, 0.0, low_open=True)
    _float(t, "min_lr_ratio", key, 0.0, 1.0)
    _float(t, "weight_decay", key, 0.0)
    _float(t, "grad_clip", key, 0.0, low_open=True)
    _float(t, "b1", key, 0.0, 1.0, high_open=True)
    _float(t, "b2", key, 0.0, 1.0, high_open=True)
    _float(t, "peak_flops_per_device", key, 0.0)
    _choice(t.ema, "profile", f"{key}.ema", EMA_PROFILES)
    _float(t.ema, "decay", f"{key}.ema", 0.0, 1.0, high_open=True)
    _float(t.ema, "sigma_rel", f"{key}.ema", 0.0, 0.28, low_open=True, high_open=True)


def check_data(cfg: ml_collections.ConfigDict):
    """``data``: the bundled datasets (counts, canvas sizes, durations, generator settings)."""
    d = cfg.data
    for name in ("mnist_train", "mnist_eval", "heldout_prompts", "clips_train", "clips_eval"):
        _int(d, name, "data")
    _int(d, "num_shards", "data", 1)
    _int(d, "digit_size", "data", 1)
    _float(d, "two_digit_prob", "data", 0.0, 1.0)
    _float(d, "photo_fraction", "data", 0.0, 1.0)
    _float(d, "mnist_fps", "data", 0.0, low_open=True)
    lo, hi = d.speed_range
    if not 1 <= lo <= hi:
        raise _bad("data.speed_range", f"needs 1 <= low <= high pixels per frame, got {d.speed_range}")
    lo, hi = d.clip_scale_range
    if not 0 < lo <= hi:
        raise _bad("data.clip_scale_range", f"needs 0 < low <= high, got {d.clip_scale_range}")
    if d.heldout_prompts and not any(t > 1 for t in d.durations):
        raise _bad("data.durations", "the held-out prompts need a duration > 1")
    for height, width in d.sizes:
        if min(height, width) < d.digit_size:
            raise _bad("data.sizes", f"canvas {height}x{width} is smaller than "
                                     f"data.digit_size={d.digit_size}")
    _training_latents(cfg)


def check_vae(cfg: ml_collections.ConfigDict):
    """``vae``: the autoencoder's kind and shape (the constructor checks the rest)."""
    v = cfg.vae
    kind = _choice(v, "kind", "vae", VAE_KINDS)
    for name in ("in_channels", "latent_channels", "spatial_downsample", "temporal_downsample"):
        _int(v, name, "vae", 1)
    if kind == "wan":
        try:
            wan_vae_config(cfg)
        except (TypeError, ValueError, AttributeError) as e:
            raise _bad("vae.wan", str(e)) from None
    if kind == "identity":
        for name, want in (("latent_channels", v.in_channels), ("spatial_downsample", 1),
                           ("temporal_downsample", 1), ("patch_size", 1)):
            if v.get(name, want) != want:  # patch_size: a causal-VAE key that may be absent
                raise _bad(f"vae.{name}", f"the identity autoencoder needs {want}, got {v[name]} "
                                          "(pixel patches are set by dit.patch)")


def _by_reader(section: str, settings: Callable[[Any], Any]) -> Callable[[ml_collections.ConfigDict], None]:
    """The validator of a section whose reader checks it (``vae_loss_settings``,
    ``conditioning_settings``): its ValueError becomes a ConfigError naming the section."""
    def check(cfg: ml_collections.ConfigDict):
        try:
            settings(cfg[section])
        except ValueError as e:
            raise ConfigError(f"config section '{section}': {e}") from None
    return check


check_vae_loss = _by_reader("vae_loss", vae_loss_settings)
check_conditioning = _by_reader("conditioning", conditioning_settings)


def check_vae_train(cfg: ml_collections.ConfigDict):
    t = cfg.vae_train
    check_train(t, "vae_train")
    _shape(cfg, "vae_train.crop", *t.crop)
    _float(t, "image_prob", "vae_train", 0.0, 1.0)
    _float(t, "mnist_weight", "vae_train", 0.0, 1.0)


def check_vae_inference(cfg: ml_collections.ConfigDict):
    i, sds = cfg.vae_inference, cfg.vae.spatial_downsample
    for name in ("chunk", "tile", "overlap"):
        _int(i, name, "vae_inference")
    if i.tile and (i.tile % sds or i.overlap % sds or i.overlap >= i.tile):
        raise ConfigError(f"config key 'vae_inference.tile' / 'vae_inference.overlap': {i.tile} / "
                          f"{i.overlap} pixels must be multiples of vae.spatial_downsample={sds}, "
                          "overlap smaller than tile")


def check_vae_eval(cfg: ml_collections.ConfigDict):
    """``vae_eval``: the named held-out sets must be bundled sources no training set uses."""
    e, v = cfg.vae_eval, cfg.vae
    tds, sds = v.temporal_downsample, v.spatial_downsample
    if e.video_frames < 1 or (e.video_frames - 1) % tds:
        raise _bad("vae_eval.video_frames", f"{e.video_frames} is not 1 + {tds}k frames")
    for name in ("video_size", "image_size"):
        h, w = e[name]
        if h < 1 or w < 1 or h % sds or w % sds:
            raise _bad(f"vae_eval.{name}", f"{h}x{w} is not a multiple of vae.spatial_downsample={sds}")
    if e.video_source not in sources.VIDEOS or e.video_source in real_clips.TRAIN_VIDEOS:
        raise _bad("vae_eval.video_source", f"{e.video_source!r} is not a held-out bundled video "
                                            f"(use {real_clips.HELDOUT_VIDEO!r})")
    bad = [n for n in e.image_sources if n not in sources.PHOTOS or n in real_clips.TRAIN_PHOTOS]
    if bad or not e.image_sources:
        raise _bad("vae_eval.image_sources", f"{bad or 'empty'} are not held-out bundled photos "
                                             f"(use some of {list(real_clips.HELDOUT_PHOTOS)})")
    _int(e, "max_digits", "vae_eval")
    for name in ("max_videos", "max_images", "batch"):
        _int(e, name, "vae_eval", 1)
    for name in ("video_scale", "image_scale"):  # downscale factors
        _float(e, name, "vae_eval", 1.0)


def check_text(cfg: ml_collections.ConfigDict):
    # configs saved before text.encoder existed are MiniLM's
    if _choice_default(cfg.text, "encoder", "text", TEXT_ENCODERS, "minilm") == "umt5":
        try:
            UMT5Config(**cfg.text.umt5.to_dict())
        except (TypeError, ValueError, AttributeError) as e:
            raise _bad("text.umt5", str(e)) from None
        _int(cfg.text, "max_length", "text", 1)
        return
    # [CLS] and [SEP] take two tokens; BERT's learned positions end at max_position_embeddings
    limit = BertConfig().max_position_embeddings
    n = _int(cfg.text, "max_length", "text", 3)
    if n > limit:
        raise _bad("text.max_length", f"{n} is more than the text encoder's {limit} positions")


def check_dit(cfg: ml_collections.ConfigDict):
    d = cfg.dit
    for name in ("hidden_size", "depth", "num_heads", "text_dim"):
        _int(d, name, "dit", 1)
    _int(d, "num_classes", "dit")
    _int(d, "condition_groups", "dit")
    if d.hidden_size % d.num_heads:
        raise _bad("dit.num_heads", f"{d.num_heads} heads do not divide dit.hidden_size={d.hidden_size}")
    if len(d.patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in d.patch):
        raise _bad("dit.patch", f"must be 3 positive integers (pt, ph, pw), got {d.patch}")
    _float(d, "mlp_ratio", "dit", 0.0, low_open=True)
    _float(d, "rope_theta", "dit", 0.0, low_open=True)
    _choice(d, "attention_backend", "dit", ATTENTION_BACKENDS)
    _choice(d, "adaln", "dit", ADALN_KINDS)
    _choice(d, "pos_embed", "dit", POS_EMBEDS)
    _choice(d, "remat_policy", "dit", REMAT_POLICIES)
    _choice(d, "qk_norm", "dit", QK_NORMS)
    # the Wan 2.1 options (sora_jax.models.wan_dit); run folders saved before them lack the keys
    if "final_modulation" in d:
        _choice(d, "final_modulation", "dit", FINAL_MODULATIONS)
    for name in ("text_null_token", "pooled_text", "context_flag"):
        if name in d and not isinstance(d[name], bool):
            raise _bad(f"dit.{name}", f"must be True or False, got {d[name]!r}")
    for name in ("in_channels", "image_dim", "image_pos_len"):  # Wan 2.1 I2V; None: off
        if d.get(name) is not None:
            _int(d, name, "dit", 1)
    if d.get("image_pos_len") is not None and d.get("image_dim") is None:
        raise _bad("dit.image_pos_len", "is set but dit.image_dim is not (positions of which image tokens?)")
    # μP (sora_jax.models.mup); configs saved before it lack the keys: "sp"
    if _choice_default(d, "parameterization", "dit", PARAMETERIZATIONS, "sp") == "mup":
        if d.get("mup_base_width") is None:
            raise _bad("dit.mup_base_width", "is None but dit.parameterization is 'mup': give the base width "
                                             "(the width at which μP equals 'sp')")
        _int(d, "mup_base_width", "dit", 1)
    elif d.get("mup_base_width") is not None:
        _int(d, "mup_base_width", "dit", 1)
    if d.get("mup_base_head_dim") is not None:
        _int(d, "mup_base_head_dim", "dit", 1)
    try:
        jnp.dtype(d.dtype)
    except TypeError:
        raise _bad("dit.dtype", f"{d.dtype!r} is not a dtype name (float32, bfloat16)") from None
    width = (cfg.text.umt5.d_model if cfg.text.get("encoder", "minilm") == "umt5"
             else BertConfig().hidden_size)
    if not d.num_classes and d.text_dim != width:
        raise _bad("dit.text_dim", f"{d.text_dim} is not the text encoder's width {width}")


def check_flow(cfg: ml_collections.ConfigDict):
    f = cfg.flow
    _float(f, "logit_mean", "flow")
    _float(f, "logit_std", "flow", 0.0, low_open=True)
    _float(f, "base_tokens", "flow", 0.0, low_open=True)
    _float(f, "max_shift", "flow", 1.0)
    _float(f, "caption_dropout", "flow", 0.0, 1.0)
    if f.caption_dropout > 0 and not cfg.dit.get("text_null_token", True):
        raise _bad("flow.caption_dropout", f"{f.caption_dropout}: a dropped caption leaves its tokens no text to "
                                           "attend to in a DiT without a null text (dit.text_null_token False, "
                                           "Wan 2.1); set it to 0")
    _choice(f, "loss_weighting", "flow", LOSS_WEIGHTINGS)


def check_dit_train(cfg: ml_collections.ConfigDict):
    """``dit_train``: the loop, and NaViT packing (every training example must fit a row)."""
    t, (pt, ph, pw) = cfg.dit_train, cfg.dit.patch
    check_train(t, "dit_train")
    longest = max((lt // pt) * (lh // ph) * (lw // pw) for lt, lh, lw, _ in _training_latents(cfg))
    if t.row_length < longest:
        raise _bad("dit_train.row_length", f"{t.row_length} tokens cannot hold the longest "
                                           f"training example ({longest} tokens)")
    if not 1 <= t.max_tokens <= t.row_length:
        raise _bad("dit_train.max_tokens", f"{t.max_tokens} must be in [1, row_length={t.row_length}]")
    if t.text_length < cfg.text.max_length:
        raise _bad("dit_train.text_length", f"{t.text_length} cannot hold one caption of "
                                            f"text.max_length={cfg.text.max_length} tokens")
    _choice(t, "resolution", "dit_train", navit.RESOLUTION_DISTRIBUTIONS)
    _float(t, "min_scale", "dit_train", 0.0, 1.0, low_open=True)
    _float(t, "token_drop_rate", "dit_train", 0.0, 1.0, high_open=True)
    _choice(t, "token_drop_distribution", "dit_train", navit.TOKEN_DROP_DISTRIBUTIONS)
    _int(t, "packing_bins", "dit_train", 1)
    _int(t, "max_examples_per_row", "dit_train")  # 0 = no cap
    _int(t, "data_workers", "dit_train")
    at_t = t.get("heldout_at_t", ())
    if not isinstance(at_t, (tuple, list)) or not all(isinstance(v, (int, float)) and 0.0 < v < 1.0 for v in at_t):
        raise _bad("dit_train.heldout_at_t", f"{at_t!r} must be a tuple of times in (0, 1), e.g. (0.25, 0.5, 0.75)")
    if not isinstance(t.data, str):
        raise _bad("dit_train.data", f"must be a string 'prefix[:weight],...', got {t.data!r}")
    try:
        parse_mix(t.data)
    except ValueError as e:
        raise _bad("dit_train.data", str(e)) from None


def check_mesh(cfg: ml_collections.ConfigDict):
    """``mesh``: axis sizes (the device count is checked when the mesh is made) and rules."""
    for group in ("ici", "dcn"):
        sizes = cfg.mesh[group]
        unknown = sorted(set(sizes) - set(MESH_AXES))
        values = [sizes[a] for a in sizes]
        if (unknown or any(isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1) for v in values)
                or values.count(-1) > 1):
            raise _bad(f"mesh.{group}", f"{dict(sizes)}: axes are {MESH_AXES}, sizes >= 1 with at "
                                        "most one -1 (the devices left)")
    try:
        normalize_rules(cfg.mesh.rules)
    except ValueError as e:
        raise _bad("mesh.rules", str(e)) from None


def check_sample(cfg: ml_collections.ConfigDict):
    """``sample``: the sampler settings of generate, evaluate and the prompt modes."""
    s = cfg.sample
    _shape(cfg, "sample", s.frames, s.height, s.width)
    _int(s, "steps", "sample", 1)
    _int(s, "seed", "sample")
    _int(s, "fps", "sample", 1)
    _float(s, "guidance", "sample")
    _float(s, "visual_guidance", "sample")
    _float(s, "strength", "sample", 0.0, 1.0)
    _choice(s, "solver", "sample", SOLVERS)
    _choice(s, "weights", "sample", WEIGHTS)
    if not isinstance(s.get("negative_prompt", ""), str):  # configs saved before it lack the key
        raise _bad("sample.negative_prompt", f"must be a string, got {s.negative_prompt!r}")


def check_prompt(cfg: ml_collections.ConfigDict):
    """``prompt``: the extender's name (a ``module:function`` is only imported when used) and
    the filter's terms and patterns."""
    ext = cfg.prompt.extender
    if not isinstance(ext, str) or not (ext in EXTENDERS or ":" in ext):
        raise _bad("prompt.extender", f"{ext!r} is not one of {EXTENDERS} or 'module.path:function'")
    try:
        make_filter(cfg.prompt.filter)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config section 'prompt.filter': {e}") from None


def check_evaluate(cfg: ml_collections.ConfigDict):
    _int(cfg.evaluate, "num_samples", "evaluate", 1)
    _int(cfg.evaluate, "seeds", "evaluate", 1)
    _int(cfg.evaluate, "batch", "evaluate", 1)
    _int(cfg.evaluate, "loop_samples", "evaluate", 1)


def check_model_info(cfg: ml_collections.ConfigDict):
    latent = cfg.model_info.latent
    if latent is not None and (len(latent) != 3 or any(int(v) < 1 for v in latent)):
        raise _bad("model_info.latent", f"must be None or 3 positive sizes (t, h, w), got {latent}")


def check_top(cfg: ml_collections.ConfigDict):
    if not isinstance(cfg.name, str) or not cfg.name:
        raise _bad("name", f"must be a non-empty string, got {cfg.name!r}")
    _int(cfg, "seed", "")


# section -> its validator, in the order they run
SECTIONS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {
    "name": check_top, "vae": check_vae, "data": check_data, "vae_loss": check_vae_loss,
    "vae_train": check_vae_train, "vae_inference": check_vae_inference,
    "vae_eval": check_vae_eval, "text": check_text, "dit": check_dit, "flow": check_flow,
    "conditioning": check_conditioning, "mesh": check_mesh, "dit_train": check_dit_train,
    "sample": check_sample, "prompt": check_prompt, "evaluate": check_evaluate,
    "model_info": check_model_info,
}


def validate_config(cfg: ml_collections.ConfigDict):
    """Checks every section of a run config (see :data:`SECTIONS`); reads nothing else.

    Raises:
      ConfigError: a missing section or key, or a value no stage could use; the message names
        the key.
    """
    missing = [name for name in (*SECTIONS, "seed") if name not in cfg]
    if missing:
        raise ConfigError(f"config sections missing: {missing} (start from a packaged config, "
                          "e.g. sora_jax.configs.quickstart)")
    for check in SECTIONS.values():
        try:
            check(cfg)
        except (KeyError, AttributeError) as e:  # a key the section lacks
            raise ConfigError(f"config key missing: {e} (a run folder's config.json written before "
                              "that key existed: pass --config with the run's packaged config, "
                              "e.g. --config quickstart, and its overrides)") from None
