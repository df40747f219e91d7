"""The scaling-law sweep that fits on the 2-core CPU (``sora-jax sweep``; issue 19): IsoFLOP grids of
the quickstart's text-to-video DiT on the quickstart run's encoded Moving MNIST + real crops.

  sora-jax sweep plan   --config sweep_cpu --workdir runs/sweep_cpu
  sora-jax sweep run    --config sweep_cpu --workdir runs/sweep_cpu [--point NAME]
  sora-jax sweep fit    --config sweep_cpu --workdir runs/sweep_cpu
  sora-jax sweep report --config sweep_cpu --workdir runs/sweep_cpu

``source_run`` is a finished quickstart run folder (prepare-data, train-vae and its latents):
every point trains a DiT of its own on those latents, in ``<workdir>/points/<name>/``.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.name = "sweep_cpu"
    c.base = "quickstart"  # the run config every point starts from
    c.base_overrides = ["dit_train.ema.profile='none'", "dit_train.checkpoint_every=500", "dit_train.log_every=100"]
    c.source_run = "runs/quickstart"  # data/, vae/ and latents/ of a finished run
    # training FLOPs (3x forward of the real tokens, attention included); the held-out budget is
    # 4x the largest fit budget, to test the laws' prediction
    c.budgets = (3e13, 6e13, 1.2e14)
    c.holdout_budgets = (4.8e14,)
    # the model family: width w, depth round(w / aspect), heads of head_dim features
    c.widths = (32, 48, 64, 96, 128, 192)
    c.family = ml_collections.ConfigDict(dict(aspect=32.0, head_dim=16))
    # learning rate lr.base x (lr.base_width / w) ^ lr.width_exponent; warm-up a fraction of the steps
    c.lr = ml_collections.ConfigDict(dict(base=1e-3, base_width=64, width_exponent=0.0, warmup_fraction=0.05))
    c.min_steps, c.max_steps = 100, 20000
    c.probe_batches = 32  # batches of the data pipeline that measure the FLOPs of a step
    return c
