"""Wan 2.1 T2V (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models") as a
sora-jax run: the 2.1 video VAE (4x8x8, 16 channels), the umT5-XXL text encoder (prompts padded
to 512 tokens) and the transformer as our DiT with its Wan options (``sora_jax.models.wan_dit``).

``sora-jax import-weights --from diffusers DIR --workdir RUN`` starts from this config and
replaces its model sections by what the checkpoint's own ``config.json`` files say, so the
numbers below are the released models' (``wan2_1:1.3b``, the default, or ``wan2_1:14b``) and only
matter for ``model-info`` / ``aot-compile`` without a download:

  sora-jax model-info --config wan2_1:14b
  sora-jax import-weights --from diffusers ~/Wan2.1-T2V-1.3B-Diffusers --workdir runs/wan1_3b

Sampling as Wan's 480p setting: 81 frames of 480x832 at 16 fps, flow shift 3.0, CFG 5.0,
50 steps of UniPC (solver "unipc": diffusers' UniPCMultistepScheduler with Wan's settings, order 2,
bh2, flow sigmas; ``sora_jax.diffusion.samplers``). The time grid is ours, u_i = 1 - i / 50 before
the shift; diffusers' set_timesteps spaces its sigmas by 0.999 / 50 and jumps from the last one to
0 (``samplers.diffusers_flow_grid``), which moves every u by at most 0.001.
"""

import ml_collections

from sora_jax.configs import quickstart

SIZES = {  # (heads of 128, layers, FFN width)
    "1.3b": (12, 30, 8960),
    "14b": (40, 40, 13824),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "1.3b"
    if size not in SIZES:
        raise ValueError(f"configs/wan2_1.py takes one of {sorted(SIZES)}, got {arg!r}")
    heads, layers, ffn = SIZES[size]
    c = quickstart.get_config()
    c.name = f"wan2_1_{size.replace('.', '_')}"
    c.vae = ml_collections.ConfigDict(dict(
        kind="wan", in_channels=3, latent_channels=16, spatial_downsample=8, temporal_downsample=4,
        # diffusers' AutoencoderKLWan config (sora_jax.models.wan_vae.WanVAEConfig); empty: its defaults,
        # which are the released 2.1 VAE's
        wan=ml_collections.ConfigDict(dict(base_dim=96, z_dim=16)),
    ))
    # umT5-XXL (sora_jax.models.umt5.UMT5Config fields); the weights live in the run folder
    c.text = ml_collections.ConfigDict(dict(
        encoder="umt5", max_length=512,
        umt5=ml_collections.ConfigDict(dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                            num_heads=64, relative_attention_num_buckets=32,
                                            relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                                            feed_forward_proj="gated-gelu")),
    ))
    hidden = heads * 128
    # rebuilt rather than updated: qk_norm changes type (True -> "across_heads")
    c.dit = ml_collections.ConfigDict(dict(
        c.dit.to_dict(), patch=(1, 2, 2), hidden_size=hidden, depth=layers, num_heads=heads,
        mlp_ratio=ffn / hidden, qk_norm="across_heads", text_dim=4096, adaln="single",
        rope_axes_dims=(44, 42, 42), rope_theta=10000.0, pos_embed="rope", num_classes=0, text_null_token=False,
        pooled_text=False, final_modulation="table", context_flag=False, scan_layers=False, remat=True,
        attention_backend="auto"))
    # fine-tuning rows: one 81x480x832 clip (32760 tokens) with its 512 text tokens
    c.dit_train.update(batch_size=1, row_length=32768, max_tokens=32768, text_length=512)
    # Wan's flow shift is a constant 3.0 at 480p: saturate the resolution rule at 3
    # no caption dropout in fine-tuning: Wan's DiT has no null text to drop a caption to (CFG
    # guides against the encoded negative prompt instead)
    c.flow.update(base_tokens=1, max_shift=3.0, caption_dropout=0.0)
    c.sample.update(steps=50, guidance=5.0, frames=81, height=480, width=832, fps=16, solver="unipc",
                    weights="raw")
    # prompts go to umT5 as written: the quickstart's extender rewrites into Moving MNIST captions
    c.prompt.extender = "none"
    c.model_info = dict(latent=(21, 60, 104))  # 81x480x832 clips: 32760 tokens
    return c
