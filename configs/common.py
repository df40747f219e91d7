"""Config pieces shared by every run config (importable as ``sora_jax.configs.common``)."""

import ml_collections


def train_section(**overrides) -> ml_collections.ConfigDict:
    """Optimizer and loop settings read by ``sora_jax.train.trainer.train``."""
    cfg = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=8,
            learning_rate=3e-4,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.0,
            grad_clip=1.0,
            b1=0.9,
            b2=0.99,
            seed=0,
            log_every=10,
            checkpoint_every=500,
            max_to_keep=2,
            # steps in a row with a non-finite loss or gradient (each skipped) before the run
            # stops; 0 = never
            nonfinite_limit=10,
            # peak FLOP/s of one device for the MFU metric; 0 = the data-sheet table by device
            # kind, or on CPU a matmul measured at start (sora_jax/train/throughput.py)
            peak_flops_per_device=0.0,
            # a jax.profiler trace of steps [profile_start_step, + profile_steps) into logs/
            # (TensorBoard's profile plugin); 0 steps = no trace
            profile_start_step=10,
            profile_steps=0,
            # JAX's persistent compilation cache (a folder, shared by runs and hosts); "" = off
            compilation_cache_dir="",
            # an exponential moving average of the parameters (sora_jax/train/ema.py), kept in
            # every checkpoint and sampled from by default: profile "none" | "power" (EDM2's
            # power function, width sigma_rel as a fraction of training) | "warmup"
            # (min(decay, (1 + t) / (10 + t)))
            ema=dict(profile="none", decay=0.9999, sigma_rel=0.05),
        )
    )
    cfg.update(overrides)
    return cfg


def packing_section(**overrides) -> dict:
    """NaViT input settings of a DiT ``train`` section (``sora_jax.data.pipeline.packed_dataset``).

    row_length / text_length: latent / text tokens per packed row (L, Lt).
    max_tokens: per-example token budget; larger examples are resampled down, aspect kept.
    resolution: "native" (keep stored size unless over budget) or "uniform" (NaViT's random
      resolution: side scale ~ U(min_scale, 1)).
    token_drop_rate / token_drop_distribution: NaViT token dropping, "fixed" rate or U(0, rate).
    packing_bins: rows filled at once by first-fit packing (more bins, less padding).
    max_examples_per_row: cap on examples per row (0 = none).
    data: training latents, "prefix[:weight],prefix[:weight]" (e.g. images and videos encoded
      apart, mixed by weight); "" = the run's own encoded Moving MNIST latents.
    real_clips: with data "", also the run's real video crops and photos (real_clips_train).
    data_workers: processes that run the per-example NaViT work (Grain's multiprocess
      prefetch; the same batches as 0 = in the training process). Worth it where that work is
      heavy, large stored latents on a host with cores to spare (benchmarks/input_pipeline.py);
      for small latents moving examples between processes costs more than the work.
    heldout_at_t: times t in (0, 1) at which the end-of-training held-out loss is also scored
      with every token at that t (``heldout_loss_at_t``; scaling sweeps record it); () = none.
    """
    cfg = dict(row_length=256, text_length=64, max_tokens=256, resolution="native", min_scale=0.5,
               token_drop_rate=0.0, token_drop_distribution="fixed", packing_bins=8,
               max_examples_per_row=8, data="", real_clips=False, data_workers=0, heldout_at_t=())
    cfg.update(overrides)
    return cfg


def mesh_section(**ici) -> ml_collections.ConfigDict:
    """Device mesh and logical-axis rules (``sora_jax.parallel``).

    ici / dcn: sizes of the mesh axes data, fsdp, context, tensor within a slice (or host)
      and across slices (hosts); one -1 per group takes the devices left.
    rules: (logical axis, mesh axes) pairs; a logical name without a rule is replicated.
      The defaults: rows over data and fsdp, parameters' model width over fsdp, heads and
      MLP width over tensor, tokens over context (MaxText's scheme).
    """
    from sora_jax.parallel.axes import DEFAULT_RULES

    sizes = dict(data=-1, fsdp=1, context=1, tensor=1)
    sizes.update(ici)
    return ml_collections.ConfigDict(dict(
        ici=sizes, dcn=dict(data=-1, fsdp=1, context=1, tensor=1),
        rules=[[name, list(axes)] for name, axes in DEFAULT_RULES]))
