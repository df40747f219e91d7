"""``sora-jax export --format stablehlo``: a run's generation as serialized StableHLO programs
(``jax.export``) with their weights kept apart in safetensors, for serving stacks that run
StableHLO without this package (:mod:`sora_jax.serving` is one, in this repository).

Programs (each ``<name>.stablehlo``: ``jax.export.Exported.serialize()`` bytes; the first
argument of each is its model's weights as a flat list, in the order of the manifest's
``weights`` keys, read from ``weights/<model>.safetensors``):

  denoiser        tokens (B, L, in_dim) f32, segment_ids (B, L) i32, positions (B, L, 3) i32,
                  timesteps (B, L) f32 in [0, 1], text (B, Lt, text_dim) f32, text_segment_ids
                  (B, Lt) i32 -> velocity (B, L, out_dim) f32. Symbolic B, L (>= 64), Lt.
  sampler_<solver> one solver step with classifier-free guidance (the loop body of
                  :func:`sora_jax.diffusion.samplers.sample`): (weights, i, num_steps, carry,
                  segment_ids, positions, text, text_segment_ids, negative_text,
                  negative_text_segment_ids, guidance (B,), shift (B, L), start (B, L)) -> carry.
                  Symbolic B, L, Lt; the step index and step count are arguments, so one
                  program serves every step count.
  text_encoder    input_ids, attention_mask (B, max_length) i32 -> states (B, max_length, D) f32.
  decoder         normalised latent (1, t, h, w, c) f32 -> video (1, T, H, W, 3) f32 in [-1, 1]
                  (the latent statistics are among its weights). Symbolic t, h, w: one program
                  decodes every length and size; batch 1 (generate decodes one video at a time).

``manifest.json`` holds the programs' signatures, the sampler settings, the latent geometry,
the text encoder's tokenization, the packing rules and the provenance; ``README.md`` says the
same for people; ``tokenizer/tokenizer.json`` is the text encoder's tokenizer.

Only custom calls on ``jax.export``'s list of targets guaranteed stable may appear; the export
refuses otherwise (``jax.export`` checks, and the manifest lists the ones used). Convolutions
are exported in their 3D form (``impl="conv3d"``), which every platform lowers; the CPU-only
"taps" form is a speed trick of the eager path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import export as jax_export

from sora_jax.diffusion import samplers
from sora_jax.errors import StageError
from sora_jax.interop.run_weights import config_sha256, load_run_models
from sora_jax.models.factory import text_encoder as minilm_encoder
from sora_jax.models.text_encoder import minilm_dir
from sora_jax.models.vae import CausalConv3d
from sora_jax.safetensors_files import TensorSpec, write_safetensors

__all__ = ["FORMAT", "PLATFORMS", "export_stablehlo", "stable_custom_calls"]

FORMAT = "sora-jax-stablehlo"
VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")
# rows shorter than this are never served (generate pads rows to at least 64 tokens); it lets
# jax.export decide comparisons against the DiT's fixed sizes (its conditioning groups)
MIN_ROW = 64


def stable_custom_calls() -> frozenset[str]:
    """The custom-call targets ``jax.export`` guarantees stable (its own list)."""
    from jax._src.export import _export  # the list is not public API; read, never modified

    return frozenset(_export._CUSTOM_CALL_TARGETS_GUARANTEED_STABLE)


def _custom_calls(exported: jax_export.Exported) -> list[str]:
    return sorted(set(re.findall(r"custom_call @([\w.$-]+)", exported.mlir_module())))


def _weights(model: nnx.Module, dtype: str | None) -> tuple[Any, Any, list[TensorSpec]]:
    """(graphdef, treedef, one :class:`TensorSpec` per leaf in flatten order): each leaf is
    copied to host (and cast) only when the writer reaches it, so the export holds one tensor
    beyond the restored model."""
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    specs = []
    for path, leaf in flat:
        key = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype

        def fetch(leaf=leaf, out=out):
            return np.asarray(jax.device_get(leaf)).astype(out, copy=False)

        specs.append(TensorSpec(key, tuple(int(d) for d in leaf.shape), np.dtype(out), fetch))
    return graphdef, treedef, specs


def _spec(specs: Sequence[TensorSpec]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in specs]


def _export(fn: Callable, args: Sequence[Any], platforms: Sequence[str]) -> jax_export.Exported:
    return jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def _signature(args: Sequence[Any]) -> list[dict[str, Any]]:
    def one(a):
        return {"shape": [str(d) for d in a.shape], "dtype": str(a.dtype)}

    out = []
    for a in args:
        if isinstance(a, list):
            out.append({"weights": len(a)})
        elif isinstance(a, tuple):
            out.append({"carry": [one(x) for x in a]})
        else:
            out.append(one(a))
    return out


def export_stablehlo(cfg: ml_collections.ConfigDict, workdir: str, out: str, *, dtype: str | None = None,
                     step: int | None = None, weights: str = "ema",
                     platforms: Sequence[str] = ("cpu",), solvers: Sequence[str] | None = None) -> dict[str, Any]:
    """Exports the run in ``workdir`` to the folder ``out`` (which must not exist); see the module
    docstring for what is written.

    Args:
      cfg: the run's config.
      dtype: the weights' dtype ("float32", "bfloat16"; None: as trained, float32).
      step, weights: which DiT checkpoint and weights (:func:`load_run_models`).
      platforms: lowering platforms among :data:`PLATFORMS` (several: one multi-platform program).
      solvers: the sampler steps exported (default: the config's ``sample.solver``).

    Returns:
      the report (also in ``manifest.json``): programs with their custom calls, bytes, seconds.

    Raises:
      StageError: an unknown platform or solver, a text encoder other than MiniLM (the umT5 of
        imported Wan runs is not exported yet), an image-to-video DiT, or a missing checkpoint.
    """
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise StageError(f"--platforms must be among {PLATFORMS}, got {list(platforms)}")
    solvers = tuple(solvers or (cfg.sample.solver,))
    bad = [s for s in solvers if s not in samplers.SOLVERS]
    if bad:
        raise StageError(f"unknown solver(s) {bad}; choose from {samplers.SOLVERS}")
    if cfg.text.get("encoder", "minilm") != "minilm":
        raise StageError("stablehlo export covers runs with the MiniLM text encoder; this run's is "
                         f"{cfg.text.encoder!r} (exporting umT5 and Wan's prompt cleaning is not built yet)")
    if cfg.dit.get("image_dim") or cfg.dit.get("in_channels"):
        raise StageError("stablehlo export of an image-to-video DiT is not supported")
    t0 = time.perf_counter()
    # dense XLA attention: the fused kernels (cuDNN, splash) are custom calls tied to one platform
    # and a fixed length, and "auto" picks among them by a length the export leaves symbolic
    traced = ml_collections.ConfigDict(cfg.to_dict())
    traced.dit.attention_backend = "xla"
    models = load_run_models(traced, workdir, step=step, weights=weights, names=("dit", "vae"))
    dit, vae = models["dit"].model, models["vae"].model
    text = minilm_encoder(int(cfg.text.max_length))
    for _, m in nnx.iter_modules(vae):  # every platform lowers the 3D convolution
        if isinstance(m, CausalConv3d):
            m.impl = "conv3d"
    prov = {"format": FORMAT, "config_sha256": config_sha256(cfg), "dit_step": str(models["dit"].step),
            "dit_checkpoint_sha256": models["dit"].checkpoint_sha256, "dit_weights": models["dit"].weights,
            "vae_checkpoint_sha256": models["vae"].checkpoint_sha256, "dtype": dtype or "float32"}
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "weights"))
    programs: dict[str, Any] = {}
    try:
        def save(name: str, model_name: str, exported: jax_export.Exported, args, seconds: float):
            blob = exported.serialize()
            with open(os.path.join(partial, f"{name}.stablehlo"), "wb") as f:
                f.write(blob)
            programs[name] = {"file": f"{name}.stablehlo", "weights": model_name, "bytes": len(blob),
                              "platforms": list(exported.platforms), "custom_calls": _custom_calls(exported),
                              "inputs": _signature(args), "seconds": round(seconds, 3)}

        weight_keys: dict[str, list[str]] = {}

        def weights_of(name: str, model: nnx.Module):
            graphdef, treedef, specs = _weights(model, dtype)
            write_safetensors(os.path.join(partial, "weights", f"{name}.safetensors"), specs, dict(prov, model=name))
            weight_keys[name] = [t.key for t in specs]
            return graphdef, treedef, _spec(specs)

        S = jax.ShapeDtypeStruct
        B, L, Lt = jax_export.symbolic_shape("B, L, Lt", constraints=[f"L >= {MIN_ROW}"])
        g, tdef, wspec = weights_of("dit", dit)
        f32, i32 = jnp.float32, jnp.int32

        def denoiser(params, tokens, seg, pos, t, txt, tseg):
            m = nnx.merge(g, jax.tree.unflatten(tdef, params))
            return m(tokens, seg, pos, t, txt, tseg).astype(f32)

        args = (wspec, S((B, L, dit.in_dim), f32), S((B, L), i32), S((B, L, 3), i32), S((B, L), f32),
                S((B, Lt, dit.text_dim), f32), S((B, Lt), i32))
        t1 = time.perf_counter()
        save("denoiser", "dit", _export(denoiser, args, platforms), args, time.perf_counter() - t1)
        for solver in solvers:
            def step_fn(params, i, num_steps, carry, seg, pos, txt, tseg, neg, nseg, w, shift, start,
                        solver=solver):
                m = nnx.merge(g, jax.tree.unflatten(tdef, params))
                inp = samplers.guidance_inputs(seg, pos, txt, tseg, w_text=w, neg_text=neg, neg_text_segment_ids=nseg)
                return samplers.solver_step(m, i, carry, inp, shift, start, num_steps=num_steps, solver=solver)

            carry = samplers.initial_carry(S((B, L, dit.out_dim), f32), solver)
            args = (wspec, S((), i32), S((), i32), carry, S((B, L), i32), S((B, L, 3), i32),
                    S((B, Lt, dit.text_dim), f32), S((B, Lt), i32), S((B, Lt, dit.text_dim), f32), S((B, Lt), i32),
                    S((B,), f32), S((B, L), f32), S((B, L), f32))
            t1 = time.perf_counter()
            save(f"sampler_{solver}", "dit", _export(step_fn, args, platforms), args, time.perf_counter() - t1)
            programs[f"sampler_{solver}"]["carry"] = _carry_recipe(solver)

        g_t, tdef_t, wspec_t = weights_of("text_encoder", text.model)
        n_text = int(cfg.text.max_length)

        def encode_text(params, ids, mask):
            return nnx.merge(g_t, jax.tree.unflatten(tdef_t, params))(ids, mask).astype(f32)

        (bt,) = jax_export.symbolic_shape("B")  # a scope of its own: no row length here
        args = (wspec_t, S((bt, n_text), i32), S((bt, n_text), i32))
        t1 = time.perf_counter()
        save("text_encoder", "text_encoder", _export(encode_text, args, platforms), args, time.perf_counter() - t1)

        g_v, tdef_v, wspec_v = weights_of("vae", vae)
        t_, h_, w_ = jax_export.symbolic_shape("t, h, w")

        def decoder(params, z):
            m = nnx.merge(g_v, jax.tree.unflatten(tdef_v, params))
            raw = z * m.latent_scale[...] + m.latent_shift[...]
            return jnp.clip(m.decode(raw).astype(f32), -1.0, 1.0)

        args = (wspec_v, S((1, t_, h_, w_, int(cfg.vae.latent_channels)), f32))
        t1 = time.perf_counter()
        save("decoder", "vae", _export(decoder, args, platforms), args, time.perf_counter() - t1)

        tok = os.path.join(partial, "tokenizer")
        os.makedirs(tok)
        shutil.copy2(os.path.join(minilm_dir(), "tokenizer.json"), os.path.join(tok, "tokenizer.json"))
        stable = stable_custom_calls()
        unstable = sorted({c for p in programs.values() for c in p["custom_calls"]} - stable)
        if unstable:
            raise StageError(f"the export uses custom calls jax.export does not guarantee stable: {unstable}")
        manifest = {
            "format": FORMAT, "version": VERSION, "platforms": list(platforms), "programs": programs,
            "weights": {k: {"file": f"weights/{k}.safetensors", "keys": v} for k, v in weight_keys.items()},
            "sampling": {"steps": int(cfg.sample.steps), "guidance": float(cfg.sample.guidance),
                         "solvers": list(solvers), "solver": solvers[0], "base_tokens": float(cfg.flow.base_tokens),
                         "max_shift": float(cfg.flow.max_shift),
                         "text_null_token": bool(cfg.dit.get("text_null_token", True))},
            "latent": {"channels": int(cfg.vae.latent_channels), "patch": [int(p) for p in cfg.dit.patch],
                       "temporal_downsample": int(cfg.vae.temporal_downsample),
                       "spatial_downsample": int(cfg.vae.spatial_downsample)},
            "text": {"kind": "minilm", "tokenizer": "tokenizer/tokenizer.json", "max_length": n_text,
                     "pad_id": int(text.config.pad_token_id), "hidden": int(text.hidden_size),
                     "zero_padding_states": True},
            "packing": {"row_length": int(cfg.dit_train.row_length), "row_multiple": 64,
                        "text_per_row": max(1, int(cfg.dit_train.text_length) // n_text)},
            "provenance": prov, "min_row": MIN_ROW,
        }
        with open(os.path.join(partial, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        with open(os.path.join(partial, "README.md"), "w") as f:
            f.write(_model_card(manifest))
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report = {"format": "stablehlo", "out": out, "seconds": round(time.perf_counter() - t0, 3),
              "programs": {k: {x: v[x] for x in ("bytes", "custom_calls", "seconds")} for k, v in programs.items()},
              "custom_calls": sorted({c for p in programs.values() for c in p["custom_calls"]})}
    return report


def _carry_recipe(solver: str) -> list[str]:
    """How a server fills the step's carry before step 0, leaf by leaf: "x" (the starting noise
    tokens), "zeros" (zeros shaped as x), "inf_rows" ((B, L) of +inf), as
    :func:`sora_jax.diffusion.samplers.initial_carry` starts it (checked against it)."""
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    recipe = []
    for leaf in jax.tree.leaves(samplers.initial_carry(x, solver)):
        leaf = np.asarray(leaf)
        if leaf.shape == x.shape and np.array_equal(leaf, x):
            recipe.append("x")
        elif leaf.shape == x.shape and not leaf.any():
            recipe.append("zeros")
        elif leaf.shape == x.shape[:2] and np.all(np.isposinf(leaf)):
            recipe.append("inf_rows")
        else:
            raise StageError(f"internal: the {solver} sampler's initial carry has a leaf the export cannot describe")
    return recipe


def _model_card(m: dict[str, Any]) -> str:
    lines = [
        "# sora-jax StableHLO export", "",
        "Serialized `jax.export` programs of a sora-jax run, with their weights in `weights/` (safetensors,",
        "flat keys in each program's argument order). Run them with `python -m sora_jax.serving` or load",
        "them with `jax.export.deserialize` in any JAX serving stack: no sora-jax model code is needed.", "",
        f"Platforms: {', '.join(m['platforms'])}. Custom calls used (all on jax.export's stable list): "
        f"{sorted({c for p in m['programs'].values() for c in p['custom_calls']})}.", "",
        "| program | weights | inputs |", "|---|---|---|",
    ]
    for name, p in m["programs"].items():
        shapes = "; ".join(f"w[{a['weights']}]" if "weights" in a else
                           "carry(" + ", ".join(f"{c['dtype']}{c['shape']}" for c in a["carry"]) + ")" if "carry" in a
                           else f"{a['dtype']}{a['shape']}" for a in p["inputs"])
        lines.append(f"| `{p['file']}` | `{p['weights']}` | {shapes} |")
    s, lat = m["sampling"], m["latent"]
    lines += [
        "", f"Sampler: {s['solver']} ({', '.join(s['solvers'])} exported), {s['steps']} steps, CFG {s['guidance']}, "
        f"shift sqrt(tokens / {s['base_tokens']}) clipped to [1, {s['max_shift']}].",
        f"Latents: {lat['channels']} channels, patch {lat['patch']}, downsampling {lat['temporal_downsample']} in "
        f"time and {lat['spatial_downsample']} in space (frames = 1 + {lat['temporal_downsample']} k).",
        f"Text: {m['text']['kind']}, {m['text']['max_length']} tokens.", "",
        "Provenance: " + ", ".join(f"{k} {v}" for k, v in m["provenance"].items()), "",
    ]
    return "\n".join(lines)
