"""``import-weights``: a released diffusers checkpoint folder (Wan 2.1) -> a sora-jax run folder.

The folder's layout (diffusers' ``save_pretrained`` of a pipeline): ``model_index.json`` naming
the components, and ``transformer/``, ``vae/``, ``text_encoder/`` (each a ``config.json`` and
one ``*.safetensors`` file or shards with their ``*.safetensors.index.json``) and
``tokenizer/`` (``tokenizer.json``). What is written is the run folder our own training writes,
so ``generate`` and ``train-dit`` use it as they are:

  RUN/config.json                       configs/wan2_1.py with the checkpoint's model sections
  RUN/dit/checkpoints/0/                the transformer as our DiT (Orbax, item ``model``)
  RUN/vae/checkpoints/0/                the VAE (item ``model``, entry ``vae``, as train-vae saves)
  RUN/text_encoder/checkpoints/0/       umT5 (item ``model``), with tokenizer/tokenizer.json
  RUN/import.json                       provenance: source files, sizes, header SHA-256, dtype

Wan 2.1's image-to-video folders (I2V-14B, FLF2V-14B) import too: their transformer, with its
image embedder, added K/V and 36 input channels, VAE and umT5. Their CLIP ``image_encoder`` is
not imported (this project has no CLIP model); ``import.json`` lists it under ``not_imported``,
and ``generate`` / ``train-dit`` refuse such a run with a message saying so.

Order of work: every component's config is translated and every key map is checked against the
checkpoint headers (no tensor read) first, so a checkpoint that does not fit fails with one
message listing every missing, unexpected or mis-shaped key, before anything is written. Then
one component at a time is read tensor by tensor (:class:`sora_jax.safetensors_files.SafetensorsReader`),
converted, cast and placed (on a mesh: straight onto each parameter's shards), saved, and
dropped, so the peak host memory is about the largest component, not the pipeline. Everything
is written into ``RUN.partial/`` and renamed to ``RUN`` at the end: a failure leaves no run
folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import config as config_lib
from sora_jax.errors import StageError
from sora_jax.models import weight_map as wm
from sora_jax.models.factory import build_dit, build_umt5, build_wan_vae
from sora_jax.models.umt5 import UMT5Config, embedding_key, umt5_ignored_keys, umt5_key_map
from sora_jax.models.wan_dit import dit_fields, wan_transformer_ignored_keys, wan_transformer_key_map
from sora_jax.models.wan_vae import WAN_VAE_IGNORED_KEYS, WanVAEConfig, wan_vae_key_map
from sora_jax.parallel.axes import DEFAULT_RULES
from sora_jax.parallel.sharding import state_shardings
from sora_jax.safetensors_files import SafetensorsReader
from sora_jax.train.checkpoint import Checkpointer
from sora_jax.train.host_memory import map_large_allocations, release_free_host_memory
from sora_jax.train.run_folder import paths, save_config

__all__ = ["COMPONENT_CLASSES", "DTYPES", "build_config", "import_diffusers", "import_weights", "text_encoder_dir"]

log = logging.getLogger(__name__)

# model_index.json component -> the reference class this importer maps
COMPONENT_CLASSES = {
    "transformer": "WanTransformer3DModel",
    "vae": "AutoencoderKLWan",
    "text_encoder": "UMT5EncoderModel",
}
DTYPES = ("float32", "bfloat16")
# model_index.json entries that carry no weights to import
_NO_WEIGHTS = ("tokenizer", "scheduler", "image_processor")


def text_encoder_dir(workdir: str) -> str:
    """Where a run folder keeps an imported text encoder (checkpoints/ and tokenizer/)."""
    return paths(workdir)["text_encoder"]


class _VAEHolder(nnx.Module):
    """What ``train-vae`` saves is a model whose ``vae`` entry inference restores
    (``restore(..., subtree="vae")``); an imported VAE is saved the same way."""

    def __init__(self, vae: nnx.Module):
        self.vae = vae


@dataclasses.dataclass
class _Component:
    name: str
    folder: pathlib.Path
    reader: SafetensorsReader
    build: Callable[[], nnx.Module]  # abstract model (nnx.eval_shape)
    targets: list[wm.Target]
    ignored: tuple[str, ...]
    save_dir: str
    wrap: Callable[[nnx.Module], nnx.Module] = lambda m: m
    # values of the model's non-parameter variables (e.g. the VAE's latent statistics, from its
    # config): path -> array
    extra: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)


def _fill_extra(model: nnx.Module, extra: dict[tuple, np.ndarray]) -> nnx.Module:
    """Sets non-parameter variables of a model built abstractly; every variable must then hold
    an array (none may stay a shape)."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if tuple(path) in extra:
            var.set_value(jnp.asarray(extra[tuple(path)], var.dtype))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if tuple(path) in extra:
            continue
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise StageError(f"internal: {'.'.join(map(str, path))} has no value after import")
    return model


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path} is missing: is {path.parent.parent if path.name == 'config.json' else path.parent} "
                         "a diffusers model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON: {e}") from None


def _check_index(src: pathlib.Path) -> dict:
    index = _read_json(src / "model_index.json")
    problems = []
    for name, cls in COMPONENT_CLASSES.items():
        entry = index.get(name)
        if not entry or len(entry) != 2 or entry[1] != cls:
            problems.append(f"{name}: expected {cls}, model_index.json has {entry}")
    if problems:
        raise StageError(f"{src} is not a Wan 2.1 text-to-video pipeline this importer reads "
                         f"({index.get('_class_name')}): " + "; ".join(problems))
    if not (src / "tokenizer" / "tokenizer.json").is_file():
        raise StageError(f"{src / 'tokenizer' / 'tokenizer.json'} is missing (the tokenizer is read by the "
                         "`tokenizers` library from that file)")
    return index


def build_config(src: pathlib.Path, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Our run config for the diffusers folder ``src``: ``base`` (default ``configs/wan2_1.py``)
    with its ``dit``, ``vae`` and ``text`` sections replaced by what the components'
    ``config.json`` files say.

    Raises:
      StageError: a missing or unreadable config, or settings our models cannot express
        (named).
    """
    cfg = config_lib.load_config("wan2_1") if base is None else ml_collections.ConfigDict(base.to_dict())
    t = _read_json(src / "transformer" / "config.json")
    v = _read_json(src / "vae" / "config.json")
    _read_json(src / "text_encoder" / "config.json")  # a clear message when it is missing
    try:
        fields = dit_fields(t)
        vae = WanVAEConfig.from_dict(v)
        umt5 = UMT5Config.from_json(src / "text_encoder" / "config.json")
    except (ValueError, TypeError, KeyError) as err:
        raise StageError(f"{src}: {err}") from None
    if fields["latent_channels"] != vae.z_dim:
        raise StageError(f"{src}: the transformer takes {fields['latent_channels']} latent channels, "
                         f"the VAE makes {vae.z_dim}")
    if fields["dit"]["text_dim"] != umt5.d_model:
        raise StageError(f"{src}: the transformer takes {fields['dit']['text_dim']}-wide text states, "
                         f"the text encoder makes {umt5.d_model}")
    cfg.dit = ml_collections.ConfigDict(dict(cfg.dit.to_dict(), **fields["dit"]))
    wan = {k: (list(x) if isinstance(x, tuple) else x) for k, x in dataclasses.asdict(vae).items()}
    cfg.vae = ml_collections.ConfigDict(dict(
        kind="wan", in_channels=vae.in_channels, latent_channels=vae.z_dim,
        spatial_downsample=vae.spatial_downsample, temporal_downsample=vae.temporal_downsample, wan=wan))
    cfg.text = ml_collections.ConfigDict(dict(cfg.text.to_dict(), encoder="umt5",
                                              umt5=dataclasses.asdict(umt5)))
    return cfg


def _components(src: pathlib.Path, cfg: ml_collections.ConfigDict, out: str) -> list[_Component]:
    p = paths(out)
    umt5_cfg = UMT5Config(**cfg.text.umt5.to_dict())
    text_reader = SafetensorsReader(src / "text_encoder")
    embedding = embedding_key(text_reader)  # transformers may save the tied table under either name
    return [
        _Component("transformer", src / "transformer", SafetensorsReader(src / "transformer"),
                   lambda: nnx.eval_shape(lambda: build_dit(cfg)), wan_transformer_key_map(cfg.dit),
                   wan_transformer_ignored_keys(cfg.dit),
                   os.path.join(p["dit"], "checkpoints")),
        _Component("vae", src / "vae", SafetensorsReader(src / "vae"),
                   lambda: nnx.eval_shape(lambda: build_wan_vae(cfg)),
                   wan_vae_key_map(WanVAEConfig.from_dict(cfg.vae.wan.to_dict())), tuple(WAN_VAE_IGNORED_KEYS),
                   os.path.join(p["vae"], "checkpoints"), wrap=_VAEHolder,
                   extra={("latent_shift",): np.asarray(cfg.vae.wan.latents_mean, np.float32),
                          ("latent_scale",): np.asarray(cfg.vae.wan.latents_std, np.float32)}),
        _Component("text_encoder", src / "text_encoder", text_reader,
                   lambda: nnx.eval_shape(lambda: build_umt5(cfg)),
                   umt5_key_map(umt5_cfg, embedding_key=embedding), umt5_ignored_keys(embedding),
                   os.path.join(text_encoder_dir(out), "checkpoints")),
    ]


def _header_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(n)).hexdigest()


def import_diffusers(src: str | os.PathLike, workdir: str, *, dtype: str = "float32",
                     base: ml_collections.ConfigDict | None = None, mesh=None, rules=None) -> dict[str, Any]:
    """Imports a diffusers Wan 2.1 T2V folder into a new run folder (see the module docstring).

    Args:
      src: the diffusers folder (``model_index.json`` and the component folders).
      workdir: the run folder to create; it must not exist (or be empty).
      dtype: the parameters' dtype in the checkpoints, "float32" or "bfloat16" (the models'
        compute dtypes are their configs').
      base: the config whose non-model sections the run keeps (default ``configs/wan2_1.py``).
      mesh, rules: optional device mesh and logical-axis rules: each parameter is placed
        straight onto its shards (:func:`sora_jax.parallel.sharding.state_shardings`), so no
        process holds a whole parameter longer than its conversion.

    Returns:
      the report written to ``RUN/import.json``: per component its files, bytes, tensors,
      parameters, seconds and ``sharded_params`` (parameters placed split over several devices;
      0 without a mesh); the totals; the dtype; and ``not_imported``: the model_index entries
      with weights this importer does not read (an I2V folder's CLIP ``image_encoder``).

    Raises:
      StageError: not a folder this importer reads, an existing non-empty ``workdir``, an
        unknown dtype, or checkpoints that do not match their configs (every problem listed).
    """
    if dtype not in DTYPES:
        raise StageError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    src = pathlib.Path(src).expanduser()
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise StageError(f"{workdir} exists and is not empty: import-weights writes a new run folder")
    index = _check_index(src)
    cfg = build_config(src, base)
    partial = workdir.rstrip("/") + ".partial"
    comps = _components(src, cfg, partial)

    problems = []
    for c in comps:
        model = c.build()
        ours = wm.param_shapes(model)
        problems += [f"{c.name}: {p}" for p in wm.check_complete(c.targets, ours, c.reader.shapes(),
                                                                 ignored=c.ignored)]
    if problems:
        raise StageError(f"{src} does not match the models of its own config.json files "
                         f"({len(problems)} problems; nothing was written):\n  " + "\n  ".join(problems))

    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    target_dtype = jnp.dtype(dtype)
    skipped = {k: v for k, v in index.items()
               if not k.startswith("_") and k not in COMPONENT_CLASSES and k not in _NO_WEIGHTS and v and v[0]}
    for name, entry in skipped.items():
        log.warning("import-weights: %s (%s) is not imported: sora-jax has no such model", name, entry[-1])
    report: dict[str, Any] = {"source": str(src.resolve()), "model_index": index, "dtype": dtype, "components": {},
                              "not_imported": skipped}
    try:
        for c in comps:
            t0 = time.perf_counter()
            abstract = c.build()
            place, split = None, [0]
            if mesh is not None:
                shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                                   DEFAULT_RULES if rules is None else rules)))

                def place(path, value, var, shardings=shardings, split=split):  # noqa: ARG001
                    sharding = shardings[path].get_value()
                    split[0] += not sharding.is_fully_replicated
                    return jax.device_put(value, sharding)
            if target_dtype != jnp.float32:  # cast the abstract parameters so load() converts to dtype
                graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
                params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, target_dtype, sharding=s.sharding)
                                      if jnp.issubdtype(s.dtype, jnp.floating) else s, params)
                abstract = nnx.merge(graphdef, params, rest)
            model = wm.load(abstract, c.targets, c.reader, ignored=c.ignored, what=f"{c.name} ({c.folder})",
                            place=place)
            model = _fill_extra(model, c.extra)
            ckpt = Checkpointer(c.save_dir, max_to_keep=1, async_save=False, compress=False)
            ckpt.save(0, c.wrap(model), None, {"imported_from": str(c.folder), "dtype": dtype})
            ckpt.wait()
            ckpt.close()
            params = int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))
            del model
            release_free_host_memory()  # the next component reuses what this one freed
            report["components"][c.name] = dict(
                files=[dict(name=f.name, bytes=f.stat().st_size, header_sha256=_header_sha256(f))
                       for f in c.reader.files],
                tensors=len(c.reader), bytes=c.reader.nbytes, params=params, sharded_params=split[0],
                seconds=round(time.perf_counter() - t0, 3))
            log.info("import-weights: %s: %d tensors, %.1f MB, %d parameters in %.1f s", c.name, len(c.reader),
                     c.reader.nbytes / 1e6, params, time.perf_counter() - t0)
        tok = pathlib.Path(text_encoder_dir(partial)) / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        for f in (src / "tokenizer").iterdir():
            if f.is_file():
                shutil.copy2(f, tok / f.name)
        report["bytes"] = sum(c["bytes"] for c in report["components"].values())
        report["params"] = sum(c["params"] for c in report["components"].values())
        save_config(cfg, partial)
        with open(os.path.join(partial, "import.json"), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        if os.path.isdir(workdir):  # empty, checked above
            os.rmdir(workdir)
        os.replace(partial, workdir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def import_weights(cfg: ml_collections.ConfigDict, workdir: str, src: str, *, dtype: str = "float32") -> dict[str, Any]:
    """``sora-jax import-weights --from diffusers SRC``: :func:`import_diffusers` with ``cfg`` as
    the base config, in a process that does nothing else (so large allocations are mapped and
    unmapped one by one: :func:`sora_jax.train.host_memory.map_large_allocations`); returns the
    report without the (long) model index.

    Raises:
      StageError: as :func:`import_diffusers`.
    """
    map_large_allocations()  # a one-shot process: freed conversion buffers go straight back to the OS
    report = import_diffusers(src, workdir, dtype=dtype, base=cfg)
    return {k: v for k, v in report.items() if k != "model_index"} | {"workdir": workdir}
