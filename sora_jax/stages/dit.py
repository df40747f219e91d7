"""``train-dit``: latent encoding, the DiT's training records, training, and held-out loss."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax import config as config_lib
from sora_jax.data.encoded import parse_mix, read_encoded
from sora_jax.data.packing import pack, patchify
from sora_jax.data.pipeline import PACKED_KEYS, mixed_source, packed_dataset
from sora_jax.data.records import read_dataset, write_array_record
from sora_jax.diffusion.flow import rectified_flow_loss
from sora_jax.errors import StageError
from sora_jax.inference.latents import load_codec
from sora_jax.io import to_float
from sora_jax.inference.text import load_text_encoder
from sora_jax.models.factory import build_dit, image_conditioned_dit
from sora_jax.models.info import model_info
from sora_jax.models.mup import lr_multipliers
from sora_jax.parallel.distributed import main_process_first
from sora_jax.parallel.mesh import create_mesh
from sora_jax.parallel.sharding import create_sharded
from sora_jax.train.run_folder import checkpoint_fingerprint, datasets, paths, save_config
from sora_jax.train.steps import dit_loss_fn
from sora_jax.train.trainer import TrainTask, make_optimizer, train


def encode_latents(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Encodes the DiT's training clips to normalised latents and captions to text states.

    The clips are Moving MNIST's, plus, when ``dit_train.real_clips`` is set, the real video
    crops and photos of ``real_clips_train`` (so that image and video prompts on real media
    land on latents the DiT has seen).

    Writes ``latents/latents_train-*.array_record`` (``latent``, ``caption_id``, ``caption``) and
    ``latents/text_states.npz`` (``captions``, ``states`` (N, Lt, 384), ``masks`` (N, Lt)).
    Idempotent: skipped when both exist and were made from the current VAE checkpoint (step and
    contents, ``checkpoint_fingerprint``), text length and dataset size.
    """
    names_to_prefix = datasets(workdir)
    p = paths(workdir)
    os.makedirs(p["latents"], exist_ok=True)
    stamp = os.path.join(p["latents"], "done.json")
    names = ["moving_mnist_train"] + (["real_clips_train"] if cfg.dit_train.real_clips else [])
    sources = [read_dataset(names_to_prefix[n]) for n in names]
    # what the encoded files depend on: a change in any of these re-encodes
    key = {"vae_checkpoint": checkpoint_fingerprint(p["vae"]), "text_max_length": cfg.text.max_length,
           "num_examples": sum(len(src) for src in sources), "datasets": names}
    if os.path.isfile(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if all(done.get(k) == v for k, v in key.items()):
            return done
    codec = load_codec(cfg, workdir)
    records = [src[i] for src in sources for i in range(len(src))]
    captions = sorted({str(r["caption"]) for r in records})
    cid = {c: i for i, c in enumerate(captions)}
    states, masks = load_text_encoder(cfg, workdir).encode(captions, pad_to=cfg.text.max_length)
    np.savez(p["text_states"], captions=np.asarray(captions), states=states.astype(np.float32),
             masks=masks.astype(bool))
    by_shape: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        by_shape.setdefault(r["video"].shape, []).append(i)
    latents: list[np.ndarray | None] = [None] * len(records)
    bs = 32
    with tqdm(total=len(records), desc="encode latents", disable=not progress) as bar:
        for shape, idx in sorted(by_shape.items()):
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                x = to_float(np.stack([records[i]["video"] for i in chunk]))
                for i, z in zip(chunk, codec.encode(x)):
                    latents[i] = z
                bar.update(len(chunk))
    write_array_record(
        p["latents_train"],
        ({"latent": latents[i].astype(np.float32), "caption_id": np.int32(cid[str(r["caption"])]),
          "caption": str(r["caption"])} for i, r in enumerate(records)),
        num_shards=cfg.data.num_shards,
    )
    info = dict(key, num_captions=len(captions))
    with open(stamp, "w") as f:
        json.dump(info, f)
    return info




def dit_sources(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True):
    """The DiT's training records for this process: (MapDataset, text table or None).

    ``dit_train.data`` empty: the run's own encoded Moving MNIST latents (captions as ids into
    ``text_states.npz``). Otherwise ``"prefix[:weight],..."``: datasets written by
    ``sora-jax encode`` (text states inline), mixed by weight.

    Raises:
      StageError: a listed dataset is missing or empty, a weight is not a positive number, or
        its latents have another channel count than ``vae.latent_channels``.
    """
    pi, pc = jax.process_index(), jax.process_count()
    spec = str(cfg.dit_train.data).strip()
    if not spec:  # encoded once, by process 0; the others wait, then read the files
        main_process_first(lambda: encode_latents(cfg, workdir, progress=progress), "encode_latents")
        p = paths(workdir)
        text = np.load(p["text_states"])
        return (mixed_source([read_dataset(p["latents_train"])], process_index=pi, process_count=pc),
                (text["states"], text["masks"]))
    try:
        mix = parse_mix(spec)
    except ValueError as e:
        raise StageError(f"config key 'dit_train.data': {e}") from None
    records, weights = [], []
    for prefix, w in mix:
        try:
            ds = read_encoded(prefix)
        except FileNotFoundError as e:
            raise StageError(f"config key 'dit_train.data': {e}") from None
        if len(ds) == 0:
            raise StageError(f"config key 'dit_train.data': {prefix} holds no records")
        channels = np.shape(ds[0]["latent"])[-1]
        if channels != cfg.vae.latent_channels:  # latents of another VAE than this config's
            raise StageError(f"config key 'dit_train.data': {prefix} holds {channels}-channel "
                             f"latents but vae.latent_channels is {cfg.vae.latent_channels}; "
                             "train with the config of the VAE run that encoded them")
        records.append(ds)
        weights.append(w)
    return mixed_source(records, weights, process_index=pi, process_count=pc), None


def train_dit(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Trains the DiT with rectified flow on NaViT-packed batches (encoding latents if needed).

    Returns the training summary (:func:`sora_jax.train.trainer.train`) with, when training on
    the run's own latents, ``heldout_loss`` (of the EMA weights where ``dit_train.ema`` keeps
    them) and ``heldout_loss_raw`` (of the last iterate).

    On several processes every process calls this: process 0 encodes the latents while the
    others wait, then each trains on its own shard of them over the config's ``mesh``.

    Raises:
      StageError: see :func:`dit_sources`; or an image-to-video DiT
        (:func:`~sora_jax.models.factory.image_conditioned_dit`).
    """
    why = image_conditioned_dit(cfg)
    if why:
        raise StageError(f"train-dit {workdir}: {why}")
    main_process_first(lambda: save_config(cfg, workdir), "save_config")
    source, text_table = dit_sources(cfg, workdir, progress)
    t = cfg.dit_train
    dataset = packed_dataset(source, t, tuple(cfg.dit.patch), t.seed, text_table=text_table,
                             process_count=jax.process_count())
    mesh, rules = create_mesh(cfg.mesh), cfg.mesh.rules
    # Over several devices the parameters are made on their shards (a big model never whole on
    # one host); on one device the eager build is kept, as earlier runs made it (the jitted
    # initialisers round a few values differently, by ~1e-8).
    dit = create_sharded(lambda: build_dit(cfg), mesh, rules) if mesh.size > 1 else build_dit(cfg)
    # model FLOPs of a step for MFU: every row position is counted (padding included), and
    # attention over the whole row, as the packed step computes it
    tokens = int(t.batch_size) * int(t.row_length)
    flops = 3.0 * model_info(cfg, seq_len=int(t.row_length))["flops_per_token"] * tokens
    optimizer_fn = None  # SP: make_optimizer
    if dit.parameterization == "mup":  # μP: per-parameter learning rates (sora_jax.models.mup)
        multipliers = lr_multipliers(dit, dit.mup_width_mult)
        optimizer_fn = functools.partial(make_optimizer, lr_multipliers=multipliers)
    task = TrainTask("dit", dit, dit_loss_fn(cfg.flow, cfg.conditioning), None,
                     meta={"config": config_lib.to_json(cfg)}, dataset=dataset,
                     tokens_per_step=tokens, flops_per_step=flops, optimizer_fn=optimizer_fn)
    summary = train(task, cfg.dit_train, paths(workdir)["dit"], progress=progress, mesh=mesh,
                    rules=rules)
    if not str(cfg.dit_train.data).strip():
        # of the weights sampling uses: the EMA's where the run keeps one
        at_t = tuple(cfg.dit_train.get("heldout_at_t", ()) or ())
        sampled = dit_heldout_losses(cfg, workdir, dit if task.ema is None else task.ema.weights, at_t=at_t)
        summary["heldout_loss"] = sampled.pop("mean")
        summary["heldout_loss_raw"] = (summary["heldout_loss"] if task.ema is None
                                       else dit_heldout_loss(cfg, workdir, dit))
        if at_t:
            summary["heldout_loss_at_t"] = sampled
    return summary


def dit_heldout_loss(cfg: ml_collections.ConfigDict, workdir: str, dit: nnx.Module, num_batches: int = 4) -> float:
    """Mean rectified-flow loss on held-out digit instances (``moving_mnist_eval``), fixed noise."""
    return dit_heldout_losses(cfg, workdir, dit, num_batches=num_batches)["mean"]


def dit_heldout_losses(cfg: ml_collections.ConfigDict, workdir: str, dit: nnx.Module, *, num_batches: int = 4,
                       at_t: Sequence[float] = ()) -> dict[str, float]:
    """Held-out rectified-flow losses on digit instances (``moving_mnist_eval``), fixed noise.

    Returns:
      ``{"mean": loss with timesteps drawn as in training (a fixed key per batch)}`` plus, for each
      t in ``at_t`` (in (0, 1)), ``{f"t={t:g}": loss with every token at time t}`` (same noise):
      the mean hides where along the path a model is better (scaling sweeps, issue 19).
    """
    codec = load_codec(cfg, workdir)
    data = read_dataset(datasets(workdir)["moving_mnist_eval"])
    records = [data[i] for i in range(len(data))]
    states, masks = load_text_encoder(cfg, workdir).encode([str(r["caption"]) for r in records],
                                              pad_to=cfg.text.max_length)
    examples = []
    for r, s, m in zip(records, states, masks):
        x = to_float(r["video"])[None]
        tokens, positions = patchify(codec.encode(x)[0], tuple(cfg.dit.patch))
        examples.append(dict(tokens=tokens, positions=positions, text=s, text_mask=m))
    t = cfg.dit_train
    kwargs = dict(cfg.flow.to_dict(), caption_dropout=0.0)
    graphdef, state = nnx.split(dit)
    loss_jit = jax.jit(lambda st, b, k, ts: rectified_flow_loss(nnx.merge(graphdef, st), b, k, timesteps=ts,
                                                                **kwargs)[0])
    losses: dict[str, list[float]] = {"mean": [], **{f"t={v:g}": [] for v in at_t}}
    k = 10  # examples per scored batch, each in its own row
    for b in range(num_batches):
        chunk = examples[b * k : (b + 1) * k]
        if not chunk:
            break
        # one row per example at most: every held-out example is scored, none dropped
        batch, _, dropped = pack(chunk, batch_size=len(chunk), length=t.row_length, text_length=t.text_length)
        assert dropped == 0
        batch = {key: batch[key] for key in PACKED_KEYS}
        key = jax.random.key(1000 + b)
        losses["mean"].append(float(loss_jit(state, batch, key, None)))
        for v in at_t:
            ts = np.full(batch["segment_ids"].shape, float(v), np.float32)
            losses[f"t={v:g}"].append(float(loss_jit(state, batch, key, ts)))
    return {name: float(np.mean(vals)) for name, vals in losses.items()}
