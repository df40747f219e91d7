"""Weight export for serving: a run folder's models as safetensors files, or as a diffusers Wan 2.1
pipeline folder (the inverse of :mod:`sora_jax.interop.diffusers_import`).

``export_safetensors`` writes every model :func:`~sora_jax.interop.run_weights.load_run_models`
restores (the DiT, its EMA weights where the run keeps them; the autoencoder; the umT5 text
encoder of an imported run) under our own names::

  OUT/dit/model.safetensors            flat dotted NNX paths (``blocks.0.attn.qkv.kernel``), our layout
  OUT/dit/config.json                  the run's ``dit`` section + in_dim, out_dim, patch, latent_channels
  OUT/vae/...                          the autoencoder (its latent statistics included), ``vae`` section
  OUT/text_encoder/...                 umT5 (imported runs), ``text`` section

``export_diffusers`` writes what ``WanPipeline.from_pretrained`` reads, for runs whose models are
Wan's (those ``import-weights`` makes, or trained from them)::

  OUT/model_index.json                 WanPipeline (WanImageToVideoPipeline for an I2V DiT)
  OUT/transformer/                     WanTransformer3DModel config.json + diffusion_pytorch_model*.safetensors
  OUT/vae/                             AutoencoderKLWan config.json + weights
  OUT/text_encoder/                    transformers UMT5EncoderModel config.json + model*.safetensors
  OUT/tokenizer/                       the run's tokenizer files, as imported
  OUT/scheduler/scheduler_config.json  UniPCMultistepScheduler, flow prediction, flow_shift = flow.max_shift

Its tensors are the key maps' sources (``wan_transformer_key_map``, ``wan_vae_key_map``,
``umt5_key_map``) rebuilt from our parameters through the inverses registered with each
conversion (:func:`sora_jax.models.weight_map.register_inverse`): fused q / k / v and k / v
split, Wan's RoPE feature order restored, Linear and Conv layouts back to torch's. They are pure
re-layouts, so an imported checkpoint exports bitwise equal to its source (tests/test_weights_export.py).

Memory: every file's header is planned from shapes alone (no tensor read), then each tensor is
fetched to host (``np.asarray(jax.device_get(x))``), cast, re-laid out, written and dropped
(:func:`sora_jax.safetensors_files.write_safetensors`), so the peak host memory beyond the
restored models is about one parameter and its reference pieces. Everything is written into
``OUT.partial/`` and renamed to ``OUT`` at the end: a failure leaves no output folder.

Provenance, in every safetensors file's ``__metadata__`` (str -> str): ``format`` ("sora-jax";
"pt" in the diffusers export, because transformers 4.x refuses to load a file whose format is
not "pt" / "tf" / "flax" / "mlx", with ``exporter`` "sora-jax" instead), ``model``, ``step``,
``checkpoint_sha256``, ``config_sha256``, ``weights`` and ``dtype``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax.errors import StageError
from sora_jax.interop.run_weights import RunModel, config_sha256, flat_arrays, load_run_models
from sora_jax.models import weight_map as wm
from sora_jax.models.factory import dit_in_dim, dit_out_dim, wan_vae_config
from sora_jax.models.umt5 import UMT5Config, umt5_key_map
from sora_jax.models.wan_dit import wan_transformer_config, wan_transformer_incompatibilities, wan_transformer_key_map
from sora_jax.models.wan_vae import WanVAEConfig, rms_gamma, wan_vae_key_map
from sora_jax.safetensors_files import TensorSpec, write_sharded
from sora_jax.train.run_folder import paths

__all__ = ["DTYPES", "FORMAT", "export_diffusers", "export_safetensors", "wan_incompatibilities"]

log = logging.getLogger(__name__)

FORMAT = "sora-jax"
DTYPES = ("float32", "bfloat16")
# the library releases whose classes and config.json fields the Wan key maps and configs mirror
# (the versions the reference fixtures were made with); recorded in the configs written
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.25.0"
# umT5's sentencepiece vocabulary: </s> is 1, <pad> (also the decoder start) 0
_UMT5_EOS_ID = 1


# ------------------------------------------------------------------------------------ shared


def _check_dtype(dtype: str | None) -> np.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise StageError(f"export dtype must be one of {DTYPES} (or None: keep each tensor's), got {dtype!r}")
    return np.dtype(jnp.dtype(dtype))


def _out_dtype(dtype: Any, target: np.dtype | None) -> np.dtype:
    """The dtype a tensor is written in: ``target`` for floating tensors (bfloat16 included),
    its own otherwise (integer tensors are never cast)."""
    dtype = np.dtype(dtype)
    return target if target is not None and jnp.issubdtype(dtype, jnp.floating) else dtype


def _host(x: Any, dtype: np.dtype) -> np.ndarray:
    """One array to host memory, cast (no copy when it already has ``dtype``)."""
    return np.asarray(jax.device_get(x)).astype(dtype, copy=False)


def _params(model: nnx.Module) -> int:
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _provenance(rm: RunModel, cfg_sha: str, dtype: str, **extra: str) -> dict[str, str]:
    return dict(format=FORMAT, model=rm.name, step=str(rm.step), checkpoint_sha256=rm.checkpoint_sha256,
                config_sha256=cfg_sha, weights=rm.weights, dtype=dtype, **extra)


def _dtype_name(dtype: str | None, model: nnx.Module) -> str:
    """The dtype recorded: the requested one, else the parameters' own (e.g. "float32"; "mixed"
    when they differ)."""
    if dtype is not None:
        return dtype
    kinds = {str(np.dtype(v.dtype)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _file_report(folder: pathlib.Path, written: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(written["files"]) + ([written["index"]] if written["index"] else [])
    return [dict(name=n, bytes=(folder / n).stat().st_size) for n in names]


def _start(out: str) -> str:
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # the leftovers of an interrupted export
    os.makedirs(partial)
    return partial


# ------------------------------------------------------------------------ safetensors export


def _model_config(cfg: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    if name == "dit":
        return dict(cfg.dit.to_dict(), in_dim=dit_in_dim(cfg), out_dim=dit_out_dim(cfg),
                    patch=[int(p) for p in cfg.dit.patch], latent_channels=int(cfg.vae.latent_channels))
    if name == "vae":
        return cfg.vae.to_dict()
    return cfg.text.to_dict()


def export_safetensors(cfg: ml_collections.ConfigDict, workdir: str, out: str, *, dtype: str | None = None,
                       step: int | None = None, weights: str = "ema",
                       max_shard_bytes: int = 5 * 2**30, mesh=None, rules=None) -> dict[str, Any]:
    """Writes the run's models as safetensors files under our own parameter names (see the
    module docstring for the layout).

    Each model's folder ``OUT/<name>/`` (name "dit", "vae", "text_encoder" where the run holds
    one) gets ``model.safetensors`` (or ``model-0000k-of-0000N.safetensors`` shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``) holding every array variable
    :func:`~sora_jax.interop.run_weights.flat_arrays` yields, keyed by its dotted NNX path, in
    our layout (e.g. Linear kernels (in, out), conv kernels (kt, kh, kw, in, out)), and a
    ``config.json`` to rebuild the model with (the DiT: the run's ``dit`` section plus
    ``in_dim``, ``out_dim``, ``patch``, ``latent_channels``; the VAE: ``vae``; the text
    encoder: ``text``).

    Args:
      cfg: the run's config.
      workdir: the run folder.
      out: the folder to create (must not exist; ``OUT.partial`` is used while writing).
      dtype: "float32" or "bfloat16": floating tensors are cast to it (integer ones never are);
        None keeps each tensor's dtype.
      step: the DiT checkpoint step (None: the latest).
      weights: "ema" (the DiT's EMA weights where the run keeps them, else its raw ones) or "raw".
      max_shard_bytes: the most tensor bytes per file.
      mesh, rules: restore onto this (single-host) mesh, each tensor on its shards, and gather
        one tensor at a time to the host (:func:`~sora_jax.interop.run_weights.load_run_models`).

    Returns:
      ``{"format": "safetensors", "out", "dtype", "config_sha256", "models": {name: {"files":
      [{"name", "bytes"}], "bytes" (tensor bytes), "tensors", "params" (parameter elements,
      ``nnx.Param`` only), "provenance"}}}``.

    Raises:
      StageError: an unknown dtype, or as :func:`~sora_jax.interop.run_weights.load_run_models`
        (missing checkpoints, unknown ``weights``); nothing is written then.
    """
    target = _check_dtype(dtype)
    models = load_run_models(cfg, workdir, step=step, weights=weights, mesh=mesh, rules=rules)
    cfg_sha = config_sha256(cfg)
    report: dict[str, Any] = dict(format="safetensors", out=out, dtype=dtype, config_sha256=cfg_sha, models={})
    partial = _start(out)
    try:
        for name, rm in models.items():
            t0 = time.perf_counter()
            folder = pathlib.Path(partial) / name
            folder.mkdir()
            specs = []
            for key, x in flat_arrays(rm.model):
                dt = _out_dtype(x.dtype, target)
                specs.append(TensorSpec(key, tuple(x.shape), dt, lambda x=x, dt=dt: _host(x, dt)))
            provenance = _provenance(rm, cfg_sha, _dtype_name(dtype, rm.model))
            written = write_sharded(folder, specs, prefix="model", max_shard_bytes=max_shard_bytes,
                                    metadata=provenance)
            _write_json(folder / "config.json", _model_config(cfg, name))
            report["models"][name] = dict(files=_file_report(folder, written), bytes=written["bytes"],
                                          tensors=written["tensors"], params=_params(rm.model),
                                          provenance=provenance)
            log.info("export: %s: %d tensors, %.1f MB in %.1f s", name, written["tensors"], written["bytes"] / 1e6,
                     time.perf_counter() - t0)
        os.replace(partial, out)  # whole, or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


# -------------------------------------------------------------------------- diffusers export


def wan_incompatibilities(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every setting of ``cfg`` that a diffusers Wan 2.1 pipeline (WanTransformer3DModel,
    AutoencoderKLWan, umT5) cannot express, one line each naming the config key; empty for a
    Wan-shaped run. Reads only the config."""
    problems = []
    if cfg.dit.get("parameterization", "sp") != "sp":  # its forward multipliers have no diffusers form
        problems.append(f"dit.parameterization is {cfg.dit.parameterization!r}, Wan needs 'sp' (μP's attention "
                        "and output multipliers are not in diffusers' model)")
    latent = int(cfg.vae.get("latent_channels", 0) or 0)
    problems += wan_transformer_incompatibilities(cfg.dit.to_dict(), latent)
    kind = cfg.vae.get("kind")
    if kind != "wan":
        problems.append(f"vae.kind is {kind!r}, Wan needs 'wan' (diffusers' AutoencoderKLWan)")
    else:
        try:
            wan_vae_config(cfg)
        except (ValueError, TypeError, KeyError) as err:
            problems.append(f"vae.wan: {err}")
    encoder = cfg.text.get("encoder", "minilm")
    if encoder != "umt5":
        problems.append(f"text.encoder is {encoder!r}, Wan needs 'umt5' (transformers' UMT5EncoderModel)")
    else:
        try:
            d_model = UMT5Config(**cfg.text.umt5.to_dict()).d_model
            if int(cfg.dit.text_dim) != d_model:
                problems.append(f"dit.text_dim {cfg.dit.text_dim} != the umT5 width text.umt5.d_model {d_model}")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            problems.append(f"text.umt5: {err}")
    return problems


def _unstacked(flat: dict[tuple, Any], cfg: ml_collections.ConfigDict) -> dict[tuple, Callable[[], Any]]:
    """Our DiT's parameters as the Wan key map names them (unrolled blocks ``blocks.<i>....``),
    each as a zero-argument fetch. With ``dit.scan_layers`` the blocks are stacked on a leading
    ``layers`` axis: block i is sliced on its device, so only that block reaches the host."""
    out: dict[tuple, Callable[[], Any]] = {}
    for path, x in flat.items():
        if cfg.dit.get("scan_layers") and path[0] == "blocks" and not isinstance(path[1], int):
            for i in range(int(cfg.dit.depth)):
                out[("blocks", i, *path[1:])] = lambda x=x, i=i: x[i]
        else:
            out[path] = lambda x=x: x
    return out


def _vae_known_shapes(targets: list[wm.Target], ours: Mapping[tuple, tuple[int, ...]]) -> dict[str, tuple]:
    """The RMS-norm gammas' reference shapes, which ours (C,) does not determine: diffusers'
    ``WanAttentionBlock`` norm is ``WanRMS_norm(dim)`` (images=True: (C, 1, 1)); every other
    (residual blocks, ``norm_out``) has images=False: (C, 1, 1, 1)."""
    known = {}
    for t in targets:
        if t.convert is rms_gamma:
            c = int(ours[t.path][0])
            known[t.sources[0]] = (c, 1, 1) if ".attentions." in t.sources[0] else (c, 1, 1, 1)
    return known


@dataclasses.dataclass
class _Part:
    """One diffusers component: its folder, our model, the key map and how to fetch our arrays."""

    folder: str
    run_model: RunModel
    targets: list[wm.Target]
    ours: dict[tuple, Callable[[], Any]]
    shapes: dict[tuple, tuple[int, ...]]
    dtypes: dict[tuple, np.dtype]
    known: dict[str, tuple[int, ...]]
    prefix: str
    config: dict[str, Any]
    reference: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


class _Inverted:
    """The reference arrays of the target last inverted, handed out one key at a time and
    dropped as they are written (a fused qkv is split once for its three files' entries)."""

    def __init__(self, part: _Part, target: np.dtype | None):
        self.part, self.target = part, target
        self.current: wm.Target | None = None
        self.arrays: dict[str, np.ndarray] = {}

    def fetch(self, t: wm.Target, key: str) -> np.ndarray:
        if self.current is not t or key not in self.arrays:
            self.arrays = {}  # drop what is left before computing the next
            ours = _host(self.part.ours[t.path](), _out_dtype(self.part.dtypes[t.path], self.target))
            self.arrays = dict(zip(t.sources, wm.invert_target(t, ours, self.part.known)))
            self.current = t
            del ours
        return self.arrays.pop(key)


def _flat_params(model: nnx.Module) -> dict[tuple, Any]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _latent_stats(cfg: ml_collections.ConfigDict, vae: nnx.Module) -> dict[str, list[float]]:
    """``latents_mean`` / ``latents_std`` for the VAE's config.json: the checkpoint's statistics
    (``latent_shift`` / ``latent_scale``), written as the run config's numbers where those round
    to the same float32 values (so an imported run's config.json keeps its source's text)."""
    out = {}
    for name, var in (("latents_mean", "latent_shift"), ("latents_std", "latent_scale")):
        ours = np.asarray(jax.device_get(getattr(vae, var)[...]), np.float32).reshape(-1)
        given = cfg.vae.wan.get(name)
        if given is not None and np.array_equal(np.asarray(given, np.float32), ours):
            out[name] = [float(v) for v in given]
        else:
            out[name] = [float(v) for v in ours]
    return out


def _vae_config(cfg: ml_collections.ConfigDict, vae: nnx.Module) -> dict[str, Any]:
    w = dataclasses.asdict(WanVAEConfig.from_dict(cfg.vae.wan.to_dict()))
    w = {k: (list(v) if isinstance(v, tuple) else v) for k, v in w.items()}
    w.update(_latent_stats(cfg, vae))
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": DIFFUSERS_VERSION, **w}


def _umt5_config(u: UMT5Config, dtype: str) -> dict[str, Any]:
    """transformers' ``UMT5EncoderModel`` config.json for ``u`` (the fields a released umT5
    carries; the decoder ones describe the encoder-decoder it was cut from)."""
    return {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "classifier_dropout": 0.0,
        "d_ff": u.d_ff, "d_kv": u.d_kv, "d_model": u.d_model, "decoder_start_token_id": u.pad_token_id,
        "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "dtype": dtype, "eos_token_id": _UMT5_EOS_ID,
        "feed_forward_proj": u.feed_forward_proj, "initializer_factor": 1.0, "is_decoder": False,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": u.layer_norm_epsilon,
        "num_decoder_layers": u.num_layers, "num_heads": u.num_heads, "num_layers": u.num_layers,
        "pad_token_id": u.pad_token_id, "relative_attention_max_distance": u.relative_attention_max_distance,
        "relative_attention_num_buckets": u.relative_attention_num_buckets, "scale_decoder_outputs": True,
        "tie_word_embeddings": True, "transformers_version": TRANSFORMERS_VERSION, "use_cache": True,
        "vocab_size": u.vocab_size,
    }


def _scheduler_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """UniPC with flow prediction and flow sigmas shifted by the run's ``flow.max_shift``, as the
    ``scheduler/`` of Wan's diffusers repositories (the other fields are the scheduler's defaults)."""
    return {
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
        "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": float(cfg.flow.max_shift),
        "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
        "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
        "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
        "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
        "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
    }


def _model_index(cfg: ml_collections.ConfigDict, workdir: str, i2v: bool) -> dict[str, Any]:
    tokenizer = ["transformers", "T5TokenizerFast"]
    imported = pathlib.Path(workdir) / "import.json"
    if imported.is_file():  # keep the tokenizer class the source pipeline named
        try:
            entry = json.loads(imported.read_text()).get("model_index", {}).get("tokenizer")
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
                tokenizer = entry
        except json.JSONDecodeError:
            pass
    index = {
        "_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": tokenizer, "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if i2v:  # the CLIP image encoder is no part of a sora-jax run: the pipeline's optional None
        index.update(image_encoder=[None, None], image_processor=[None, None])
    return index


def export_diffusers(cfg: ml_collections.ConfigDict, workdir: str, out: str, *, dtype: str | None = None,
                     step: int | None = None, weights: str = "ema",
                     max_shard_bytes: int = 5 * 2**30, mesh=None, rules=None) -> dict[str, Any]:
    """Writes a Wan-shaped run as a diffusers Wan 2.1 pipeline folder (layout in the module
    docstring) that ``WanPipeline.from_pretrained`` and ``import-weights`` read.

    Tensors carry the reference key names and torch layouts (Linear (out, in), Conv
    (out, in, *k), Wan's interleaved RoPE feature order, separate to_q / to_k / to_v), built
    from our parameters by the inverse of each key-map conversion. Files: diffusers'
    ``diffusion_pytorch_model.safetensors`` (or ``diffusion_pytorch_model-0000k-of-0000N``
    shards plus ``diffusion_pytorch_model.safetensors.index.json``) for the transformer and the
    VAE, transformers' ``model.safetensors`` (+ index) for the text encoder, which holds the tied
    token embedding once, as ``shared.weight`` (transformers ties ``encoder.embed_tokens.weight``
    to it on load). The VAE's ``latents_mean`` / ``latents_std`` come from its checkpoint. The
    transformer's ``rope_max_seq_len``, which no run records, is Wan's 1024. An image-to-video
    DiT (``dit.image_dim``) is written as ``WanImageToVideoPipeline`` without its CLIP
    ``image_encoder`` (the run has none; ``model_index.json`` lists it as None).

    Args:
      cfg: the run's config; every model section must be Wan's (:func:`wan_incompatibilities`).
      workdir: the run folder (with ``text_encoder/tokenizer/``, as ``import-weights`` writes it).
      out: the folder to create (must not exist; ``OUT.partial`` is used while writing).
      dtype: "float32" / "bfloat16" for the floating tensors; None keeps each tensor's.
      step, weights: the DiT checkpoint and weights, as :func:`export_safetensors`.
      max_shard_bytes: the most tensor bytes per file.
      mesh, rules: restore onto this (single-host) mesh, each tensor on its shards, and gather
        one tensor at a time to the host (:func:`~sora_jax.interop.run_weights.load_run_models`).

    Returns:
      ``{"format": "diffusers", "out", "dtype", "pipeline" (the model_index class),
      "config_sha256", "components": {"transformer" | "vae" | "text_encoder": {"files", "bytes",
      "tensors", "params", "provenance"}}, "not_exported": {name: why}}``.

    Raises:
      StageError: a run that is not Wan-shaped (one message naming every setting, before
        anything is read), no tokenizer in the run, an unknown dtype, a key map that cannot be
        inverted for these models, or as ``load_run_models``; no output folder is left.
    """
    target = _check_dtype(dtype)
    problems = wan_incompatibilities(cfg)
    if problems:
        raise StageError(f"{workdir} is not a Wan-shaped run, so it has no diffusers Wan 2.1 form "
                         f"({len(problems)} settings; nothing was written):\n  " + "\n  ".join(problems))
    tok = pathlib.Path(paths(workdir)["text_encoder"]) / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        raise StageError(f"{tok / 'tokenizer.json'} is missing: the diffusers pipeline needs the run's umT5 "
                         "tokenizer (import-weights copies it there)")
    models = load_run_models(cfg, workdir, step=step, weights=weights, mesh=mesh, rules=rules)
    cfg_sha = config_sha256(cfg)
    latent = int(cfg.vae.latent_channels)
    umt5 = UMT5Config(**cfg.text.umt5.to_dict())

    parts = []
    for folder, name in (("transformer", "dit"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        rm = models.get(name)
        if rm is None:
            raise StageError(f"{workdir} holds no {name} checkpoint to export")
        flat = _flat_params(rm.model)
        # arrays that are not parameters have no key in the maps: only the VAE's latent
        # statistics, which go to its config.json, may be left out
        left = [k for k, _ in flat_arrays(rm.model) if tuple(k.split(".")) not in {tuple(map(str, p)) for p in flat}
                and not (name == "vae" and k in ("latent_shift", "latent_scale"))]
        if left:
            raise StageError(f"internal: the {name} holds arrays the diffusers form has no place for: {left}")
        if name == "dit":
            targets = wan_transformer_key_map(dict(cfg.dit.to_dict(), scan_layers=False))
            ours = _unstacked(flat, cfg)
            dtypes = {p: np.dtype(flat[p].dtype if p in flat else flat[(p[0], *p[2:])].dtype) for p in ours}
            shapes = {p: tuple(flat[p].shape) if p in flat else tuple(flat[(p[0], *p[2:])].shape[1:]) for p in ours}
            pt, ph, pw = (int(p) for p in cfg.dit.patch)
            in_ch = dit_in_dim(cfg) // (pt * ph * pw)
            known = {"patch_embedding.weight": (int(cfg.dit.hidden_size), in_ch, pt, ph, pw)}
            config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
                      **wan_transformer_config(cfg.dit.to_dict(), latent)}
            prefix = "diffusion_pytorch_model"
        elif name == "vae":
            targets = wan_vae_key_map(WanVAEConfig.from_dict(cfg.vae.wan.to_dict()))
            ours = {p: (lambda x=x: x) for p, x in flat.items()}
            dtypes = {p: np.dtype(x.dtype) for p, x in flat.items()}
            shapes = {p: tuple(x.shape) for p, x in flat.items()}
            known = _vae_known_shapes(targets, shapes)
            config = _vae_config(cfg, rm.model)
            prefix = "diffusion_pytorch_model"
        else:
            targets = umt5_key_map(umt5)  # the tied embedding as shared.weight
            ours = {p: (lambda x=x: x) for p, x in flat.items()}
            dtypes = {p: np.dtype(x.dtype) for p, x in flat.items()}
            shapes = {p: tuple(x.shape) for p, x in flat.items()}
            known = {}
            config = _umt5_config(umt5, _dtype_name(dtype, rm.model))
            prefix = "model"
        parts.append(_Part(folder, rm, targets, ours, shapes, dtypes, known, prefix, config))

    # plan every file from shapes alone and check the maps both ways before writing anything
    problems = []
    for part in parts:
        try:
            part.reference = wm.reference_shapes_for(part.targets, part.shapes, part.known)
        except ValueError as err:
            problems.append(f"{part.folder}: {err}")
            continue
        problems += [f"{part.folder}: {p}" for p in wm.check_complete(part.targets, part.shapes, part.reference)]
    if problems:
        raise StageError("internal: the Wan key maps do not invert for this run's models (nothing was written):\n  "
                         + "\n  ".join(problems))

    i2v = bool(cfg.dit.get("image_dim"))
    report: dict[str, Any] = dict(format="diffusers", out=out, dtype=dtype, config_sha256=cfg_sha,
                                  pipeline="WanImageToVideoPipeline" if i2v else "WanPipeline", components={},
                                  not_exported={"image_encoder": "the CLIP image encoder is not part of a sora-jax "
                                                                  "run"} if i2v else {})
    partial = _start(out)
    try:
        for part in parts:
            t0 = time.perf_counter()
            folder = pathlib.Path(partial) / part.folder
            folder.mkdir()
            inverted = _Inverted(part, target)
            specs = [TensorSpec(key, part.reference[key], _out_dtype(part.dtypes[t.path], target),
                                lambda t=t, key=key: inverted.fetch(t, key))
                     for t in part.targets for key in t.sources]
            rm = part.run_model
            provenance = _provenance(rm, cfg_sha, _dtype_name(dtype, rm.model), component=part.folder,
                                     exporter=FORMAT)
            provenance["format"] = "pt"  # transformers 4.x loads only "pt" / "tf" / "flax" / "mlx" files
            written = write_sharded(folder, specs, prefix=part.prefix, max_shard_bytes=max_shard_bytes,
                                    metadata=provenance)
            _write_json(folder / "config.json", part.config)
            report["components"][part.folder] = dict(
                files=_file_report(folder, written), bytes=written["bytes"], tensors=written["tensors"],
                params=_params(rm.model), provenance=provenance)
            log.info("export: %s: %d tensors, %.1f MB in %.1f s", part.folder, written["tensors"],
                     written["bytes"] / 1e6, time.perf_counter() - t0)
        shutil.copytree(tok, pathlib.Path(partial) / "tokenizer")
        (pathlib.Path(partial) / "scheduler").mkdir()
        _write_json(pathlib.Path(partial) / "scheduler" / "scheduler_config.json", _scheduler_config(cfg))
        _write_json(pathlib.Path(partial) / "model_index.json", _model_index(cfg, workdir, i2v))
        os.replace(partial, out)  # whole, or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report
