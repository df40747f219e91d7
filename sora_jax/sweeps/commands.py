"""``sora-jax sweep``: the steps of a scaling-law sweep over the sweep's work folder.

  plan    the grid (:mod:`sora_jax.sweeps.plan`) -> ``<workdir>/plan.json`` and a table

``run``, ``fit`` and ``report`` come next (issue 19): ``run`` trains each point in
``<workdir>/points/<name>/`` with the existing trainer, ``fit`` calls :mod:`sora_jax.sweeps.fit`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from sora_jax import config as config_lib
from sora_jax.config_validation import validate_config
from sora_jax.data.pipeline import packed_dataset
from sora_jax.errors import StageError
from sora_jax.stages.dit import dit_sources
from sora_jax.sweeps.plan import batch_examples, format_budget, plan_points

__all__ = ["base_config", "plan", "probe_examples"]


def base_config(sweep: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config every point starts from: ``sweep.base`` with ``sweep.base_overrides``, checked.

    Raises:
      ConfigError: a bad base config or override (named).
    """
    cfg = config_lib.apply_overrides(config_lib.load_config(sweep.base), list(sweep.base_overrides))
    validate_config(cfg)
    return cfg


def probe_examples(base: ml_collections.ConfigDict, source_run: str, batches: int) -> list[list[tuple[int, int]]]:
    """(latent tokens, text tokens) of the examples of the first ``batches`` batches the points'
    data pipeline yields (the same data, seed and packing as their training).

    Raises:
      StageError: ``source_run`` is not a run folder with prepared data and a VAE.
    """
    if not os.path.isfile(os.path.join(source_run, "config.json")):
        raise StageError(f"sweep source_run {source_run!r} is not a run folder: run `sora-jax quickstart` "
                         "(or prepare-data and train-vae) there first")
    source, text_table = dit_sources(base, source_run, progress=False)
    t = base.dit_train
    it = iter(packed_dataset(source, t, tuple(base.dit.patch), t.seed, text_table=text_table))
    try:
        return [batch_examples(next(it)) for _ in range(int(batches))]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def plan(sweep: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Plans the sweep and writes ``<workdir>/plan.json`` (the sweep config, the points, the
    skipped (budget, width) pairs and why).

    Returns:
      the plan, with ``table``: one line per point (name, budget, width, depth, heads,
      parameters, tokens, steps, FLOPs / budget).

    Raises:
      StageError, ConfigError: as :func:`probe_examples`, :func:`base_config`.
    """
    base = base_config(sweep)
    probe = probe_examples(base, sweep.source_run, sweep.probe_batches)
    try:
        points, skipped = plan_points(base, sweep, probe)
    except ValueError as e:
        raise StageError(f"sweep plan: {e}") from None
    out = {"sweep": sweep.to_dict(), "points": [p.to_dict() for p in points], "skipped": skipped}
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "plan.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "plan.json"))
    out["table"] = [f"{p.name:>18} C={format_budget(p.budget):>7}{' (holdout)' if p.holdout else '':10} "
                    f"w={p.hidden_size:<4} depth={p.depth:<2} heads={p.num_heads:<2} N={p.params:>9,} "
                    f"D={p.tokens:>12,.0f} steps={p.steps:>6} flops/C={p.flops / p.budget:.4f}" for p in points]
    return out
