"""The scaling-law sweep that fits on the 2-core CPU (``sora-jax sweep``; issue 19): IsoFLOP grids of
the quickstart's text-to-video DiT on the quickstart run's encoded Moving MNIST + real crops.

  sora-jax sweep plan   --config sweep_cpu --workdir runs/sweep_cpu
  sora-jax sweep run    --config sweep_cpu --workdir runs/sweep_cpu [--point NAME]
  sora-jax sweep fit    --config sweep_cpu --workdir runs/sweep_cpu
  sora-jax sweep report --config sweep_cpu --workdir runs/sweep_cpu

``source_run`` is a finished quickstart run folder (prepare-data, train-vae and its latents):
every point trains a DiT of its own on those latents, in ``<workdir>/points/<name>/``. Its
measured results (66 points, 83 minutes of training on 2 cores) are in the README, "Scaling-law
sweeps".
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.name = "sweep_cpu"
    c.base = "quickstart"  # the run config every point starts from
    c.base_overrides = ["dit_train.ema.profile='none'", "dit_train.checkpoint_every=500", "dit_train.log_every=100",
                        "dit_train.heldout_at_t=(0.25,0.5,0.75)"]
    c.source_run = "runs/quickstart"  # data/, vae/ and latents/ of a finished run
    # training FLOPs (3x forward of the real tokens, attention included); the held-out budget is
    # 4x the largest fit budget, to test the laws' prediction
    c.budgets = (5e11, 1e12, 2e12)
    c.holdout_budgets = (8e12,)
    # the model family: width w, depth round(w / aspect), heads of head_dim features
    c.widths = (32, 48, 64, 96, 128, 192)
    # the sizes trained at the held-out budget, around the N* the fit budgets' laws predict for it
    # (`sora-jax sweep fit` prints it: 779K here, 442K by the parametric fit), so its measured best
    # loss is a vertex, not an edge
    c.holdout_widths = (48, 64, 96, 128)
    c.family = ml_collections.ConfigDict(dict(aspect=32.0, head_dim=16))
    # learning rate lr.base x (lr.base_width / w) ^ lr.width_exponent (SP's Adam rates fall with
    # width; 2e-3 is the quickstart's tuned rate at width 128); warm-up a fraction of the steps
    c.lr = ml_collections.ConfigDict(dict(base=2e-3, base_width=128, width_exponent=0.5, warmup_fraction=0.05))
    c.min_steps, c.max_steps = 100, 20000
    # two fit points again with seeds 1 and 2 (init, data order and noise): the noise of a point's
    # loss, against which the prediction error is read
    c.repeats = ml_collections.ConfigDict(dict(points=((1e12, 64), (2e12, 64)), seeds=(1, 2)))
    c.n_boot = 200  # bootstrap resamples of `sweep fit`'s intervals
    c.probe_batches = 32  # batches of the data pipeline that measure the FLOPs of a step
    # learning rate x width at fixed depth and steps, under SP and μP (base width = the smallest):
    # where the best rate sits per width (μP's promise: it does not move)
    c.lr_transfer = ml_collections.ConfigDict(dict(
        widths=(32, 64, 128), depth=2, steps=300, learning_rates=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2),
        parameterizations=("sp", "mup"), mup_base_width=32))
    return c
