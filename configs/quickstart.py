"""CPU quickstart: every stage end to end on a 2-core laptop CPU in about 15 minutes.

Run: ``sora-jax quickstart --config configs/quickstart.py --workdir runs/quickstart``
Any field can be overridden, e.g. ``--config.dit_train.steps=2000``.

Scale: Moving MNIST canvases of 32x32 / 32x48 / 48x32 pixels with 24-pixel digits, clips of 9
frames and images; a VAE with 4x4 spatial and 4x temporal compression and 8 latent channels; a
DiT of width 128 and depth 4 over (1, 2, 2) latent patches. Step counts are set by what a
2-core CPU does in the budget (VAE ~0.16 s/step on 16x16 crops, DiT ~0.11 s/step on 2 rows of 256 tokens).
"""

import ml_collections

from sora_jax.configs.common import mesh_section, packing_section, train_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.name = "quickstart"
    c.seed = 0

    c.data = dict(
        mnist_train=3000,
        mnist_eval=200,
        heldout_prompts=40,
        clips_train=600,
        clips_eval=40,
        sizes=((32, 32), (32, 48), (48, 32)),
        durations=(1, 9),
        digit_size=24,
        two_digit_prob=0.15,
        clip_sizes=((32, 32), (32, 48)),
        clip_durations=(1, 9),
        speed_range=(1, 3),  # Moving MNIST pixels per frame
        mnist_fps=8.0,
        photo_fraction=0.2,  # of the real clips datasets: photo crops, the rest video crops
        clip_scale_range=(2.0, 8.0),  # spatial downscale of real crops
        num_shards=2,
    )

    c.vae = dict(
        kind="causal",  # "causal" (CausalVAE) | "identity" (pixel mode, see configs/pixel.py)
        in_channels=3,
        latent_channels=8,
        base_channels=16,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        spatial_downsample=4,
        temporal_downsample=4,
        logvar_init=0.0,
    )
    # Every term of the recipe (sora_jax.train.steps.vae_loss_fn); the quickstart's budget only
    # affords L1 + L2 + KL, the autoencoder configs (configs/vae_*.py) add SSIM and the GAN.
    c.vae_loss = dict(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, ssim_weight=0.0,
                      gan_weight=0.0, disc_start=0, adaptive_weight=True, max_adaptive_weight=1e4,
                      disc_channels=64, disc_layers=3, disc_lr_mult=1.0)
    c.vae_train = train_section(
        steps=1200, batch_size=8, learning_rate=2e-3, warmup_steps=50, log_every=10,
        checkpoint_every=400,
    )
    # VAE crops (frames, height, width): the VAE is convolutional, so it trains on 16x16 crops
    # (4x cheaper per step than 32x32, and steps are what a CPU budget lacks) and runs at any
    # size. A fraction of batches are single images.
    c.vae_train.crop = (9, 16, 16)
    c.vae_train.image_prob = 0.2
    c.vae_train.mnist_weight = 0.7  # the rest are real video crops and photos

    # evaluate-vae's named held-out sets (sora_jax.evaluation.vae_eval), built from bundled
    # sources no training set uses: non-overlapping 9x32x32 tiles of carphone_pristine at its
    # native 176x144 (13 windows x 20 tiles; 32 kept, evenly spaced), and 32x32 tiles of the
    # photos coffee and flower downscaled 4x (27 tiles). max_digits caps the extra Moving MNIST
    # held-out digit clips (scored at the sample size).
    c.vae_eval = dict(
        video_source="carphone_pristine",
        video_frames=9,
        video_size=(32, 32),
        video_scale=1.0,
        max_videos=32,
        image_sources=("coffee", "flower"),
        image_size=(32, 32),
        image_scale=4.0,
        max_images=32,
        max_digits=64,
        batch=8,
    )

    # How encode / decode run after training (sora_jax.inference.latents.VAECodec): 0 = one pass per
    # video; chunk = latent frames per time chunk (feature cache: memory independent of the
    # length), tile / overlap = spatial tiles in pixels. The quickstart's clips are short.
    c.vae_inference = dict(chunk=0, tile=0, overlap=0)

    # text tokens per caption fed to cross-attention; encoder: "minilm" (all-MiniLM-L6-v2, from its
    # wheel) or "umt5" (Wan 2.1's umT5-XXL, imported into the run folder: configs/wan2_1.py)
    c.text = dict(encoder="minilm", max_length=16)

    # DiT training's device mesh (sora_jax.parallel): every device on "data" by default, so the
    # same command runs on one CPU, on 8 simulated devices and on several processes; e.g.
    # --config.mesh.ici.fsdp=-1 --config.mesh.ici.data=1 shards parameters instead.
    c.mesh = mesh_section()

    c.dit = dict(
        patch=(1, 2, 2),
        hidden_size=128,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        qk_norm=True,  # True / "per_head" | "across_heads" (Wan 2.1) | False
        text_dim=384,
        attention_backend="xla",
        # "per_block": adaLN-Zero with a modulation Linear per block (DiT); "single": one shared
        # Linear plus a per-block table (PixArt-alpha's adaLN-single, Wan's shared timestep MLP)
        adaln="per_block",
        rope_axes_dims=None,  # head dims given to RoPE's (t, h, w) axes; None: the default split
        rope_theta=10000.0,
        pos_embed="rope",  # "rope" (3D RoPE) | "sincos" (the class-conditional DiT's)
        num_classes=0,  # > 0: class-conditional (label embedding instead of text)
        # scan_layers stacks the blocks (nnx.scan); remat then keeps only each block's input
        # for the backward (policy: a jax.checkpoint_policies name)
        scan_layers=False,
        remat=False,
        remat_policy="nothing_saveable",
        dtype="float32",  # matmul compute dtype; parameters and optimizer state stay float32
        # timestep embedding and adaLN modulations computed once per distinct (segment,
        # timestep) of a row, up to this many, then gathered (0: per token; same results)
        condition_groups=32,
        # Wan 2.1's variants of the same blocks (sora_jax.models.wan_dit sets them on import):
        # cross-attention without our learned null token, no pooled text in c, the output
        # head's (shift, scale) from a table + c instead of a Linear, no context-flag embedding
        text_null_token=True,
        pooled_text=True,
        final_modulation="linear",
        context_flag=True,
        # "sp" (standard) | "mup" (μP, sora_jax.models.mup: init, learning rates and attention /
        # output multipliers scaled by width / mup_base_width, equal to "sp" at that width)
        parameterization="sp",
        mup_base_width=None,  # with "mup": the width whose tuned hyperparameters transfer
        mup_base_head_dim=None,  # with "mup": the base's head dimension (None: same heads as this model)
    )
    # base_tokens 5: a 9x32x32 clip (48 tokens) trains and samples at shift sqrt(48/5) = 3.1
    # (the cap 3), an image (16 tokens) at 1.8; at shift 1 (base_tokens 48) direction accuracy
    # was 0.87 and digit 0.24, at 3: 1.00 and 0.36, at 5: 0.98 and 0.25 (one seed each, 120
    # samples; issue 16's table)
    c.flow = dict(
        logit_mean=0.0,
        logit_std=1.0,
        base_tokens=5,
        max_shift=3.0,
        caption_dropout=0.1,
        loss_weighting="per_token",
    )
    # Small packed batches and many steps: at equal CPU time, 4000 steps of 2 rows reached a
    # lower held-out loss (0.270) than 2200 steps of 4 rows (0.293) or 1100 of 8 (0.341).
    # Learning rate 2e-3: held-out loss 0.253 against 0.269 at 1e-3 (shift 1), 0.299 against
    # 0.310 at shift 3; 3e-3 gave 0.301. Sampling uses the EMA of the weights (EDM2's power
    # profile, the last ~5% of training as its width).
    c.dit_train = train_section(
        steps=4500, batch_size=2, learning_rate=2e-3, warmup_steps=100, log_every=20,
        checkpoint_every=1500,
    )
    c.dit_train.ema.update(profile="power", sigma_rel=0.05)
    # 2 rows of 256 latent tokens (5-15 examples: 16-token images, 48/72-token clips)
    # plus the real crops and photos (1 in 6 examples), so image and video prompts on real media
    # (the modes stage) condition on latents the DiT has seen
    c.dit_train.update(packing_section(row_length=256, text_length=64, max_tokens=256,
                                       real_clips=True))

    # Image and video prompts (sora_jax.diffusion.conditioning): the share of training examples
    # given each pattern of clean context frames; visual_dropout removes the drawn context
    # instead, which trains the branch that visual guidance subtracts. One run each at this
    # budget, with the real clips in the mix: 70% "none" kept text-to-video at its level
    # (direction accuracy 0.95), 40% gave 0.475 (0.925 without the real clips).
    c.conditioning = dict(none=0.7, first_frame=0.1, first_k=0.05, last_k=0.05, first_last=0.05,
                          keyframes=0.05, max_k=2, keyframe_prob=0.3, visual_dropout=0.1)

    # solver: euler | heun | dpmpp_2m | unipc; guidance: classifier-free guidance scale on text;
    # visual_guidance: guidance on context frames (1.0 = none, no extra model pass); strength:
    # SDEdit strength of `--mode edit`.
    # weights: the DiT's "ema" (the moving average of its parameters, dit_train.ema) or "raw".
    # negative_prompt: what CFG guides against with a DiT that has no learned null text
    # (dit.text_null_token False: Wan 2.1; its pipeline's default is the empty prompt)
    c.sample = dict(steps=25, guidance=4.0, frames=9, height=32, width=32, fps=8, seed=0,
                    solver="euler", visual_guidance=1.0, strength=0.6, weights="ema", negative_prompt="")
    # Prompts pass the filter, then the extender ("caption_style": rewrite into the training
    # captions' grammar; "none"; or "module.path:function", any local callable str -> str).
    # filter.blocked_terms None = sora_jax.inference.prompts.DEFAULT_BLOCKED_TERMS; refusals exit with 3.
    c.prompt = dict(extender="caption_style",
                    filter=dict(enabled=True, blocked_terms=None, blocked_patterns=()))
    # num_samples held-out prompts x seeds noise seeds each, from the EMA and the raw weights;
    # loop_samples loops (held-out prompts, seeds sample.seed + k) for the loop seam's mean
    c.evaluate = dict(num_samples=40, seeds=3, batch=8, loop_samples=16)
    # model-info's row: latent (t, h, w) to patchify; None = the latent of the sample size
    c.model_info = dict(latent=None)
    return c
