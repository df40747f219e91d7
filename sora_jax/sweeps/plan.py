"""The grid of a scaling-law sweep: one point per (compute budget, model size), with its model
shape, counted parameters, training tokens, steps and FLOPs (``sora-jax sweep plan``).

Compute is counted exactly, per example: a packed row's attention is masked to each example's
own tokens, so an example of n latent tokens and m text tokens costs n x
:func:`~sora_jax.models.dit.dit_flops_per_token` (seq_len = n, text_len = m, per-token
conditioning) forward FLOPs, attention included (at video lengths attention is a large share,
which 6ND would miss), and training 3x that (forward + backward; remat's recomputation is not
model FLOPs). Padding costs nothing. The FLOPs of a step are the mean over ``probe_batches``
batches of the sweep's own data pipeline (the packing does not depend on the model, so one
probe serves every size); a point's steps are its budget over that, rounded, and its planned
FLOPs fall within 1% of the budget (the plan refuses a point where rounding would miss: too
few steps).

Model family: size i has width w_i (the sweep's ``widths``), depth max(1, round(w / aspect)) and
w / head_dim heads (Kaplan et al. 2020's fixed aspect ratio; heads of fixed width). Parameters
are counted on the built model (``nnx.eval_shape``); non-embedding parameters are those of the
transformer blocks (and adaLN-single's shared projection): everything but the patch, timestep,
text and label embeddings and the output layer.

Names: ``C<budget>-N<params>``, e.g. ``C3e13-N1.2M``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np
from flax import nnx

from sora_jax.models.dit import dit_flops_per_token
from sora_jax.models.factory import build_dit, dit_in_dim, dit_out_dim

__all__ = ["Point", "batch_examples", "count_params", "family_shape", "format_budget", "format_params",
           "plan_points", "point_config", "train_flops"]


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point. ``flops`` = ``steps`` x ``flops_per_step`` (training FLOPs, 3x forward);
    ``tokens`` = ``steps`` x ``tokens_per_step`` (real latent tokens, no padding)."""

    name: str
    budget: float
    holdout: bool
    hidden_size: int
    depth: int
    num_heads: int
    params: int
    non_embedding_params: int
    learning_rate: float
    steps: int
    flops_per_step: float
    tokens_per_step: float
    flops: float
    tokens: float
    # "isoflop" (the laws' grid) | "repeat" (an IsoFLOP point again with another seed: the noise
    # of a point) | "lr_transfer" (learning rate x width)
    kind: str = "isoflop"
    parameterization: str = "sp"
    seed: int | None = None  # None: the base config's seeds; else cfg.seed and dit_train.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_budget(c: float) -> str:
    """3e13 -> "3e13", 1.2e15 -> "1.2e15" (no "+", no trailing zeros)."""
    mantissa, exponent = f"{c:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def format_params(n: int) -> str:
    """1_234_567 -> "1.2M"; 950_000 -> "950K"; 3_400_000_000 -> "3.4B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.2g}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(n)


def family_shape(width: int, *, aspect: float, head_dim: int) -> tuple[int, int, int]:
    """(hidden_size, depth, num_heads) of the family member of ``width``.

    Raises:
      ValueError: ``width`` not a multiple of ``head_dim``.
    """
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    return width, max(1, int(round(width / aspect))), width // head_dim


def point_config(base: ml_collections.ConfigDict, sweep: ml_collections.ConfigDict, width: int,
                 steps: int = 1, *, depth: int | None = None, lr: float | None = None,
                 parameterization: str = "sp", seed: int | None = None) -> ml_collections.ConfigDict:
    """The run config of one point: ``base`` with the family shape of ``width`` (``depth`` instead
    of the family's, where given), the learning rate of the sweep's rule (or ``lr``),
    and ``steps`` training steps (warm-up a fixed fraction of them). ``parameterization`` "mup"
    sets μP with the learning-rate transfer sweep's base width and the family's head dimension
    as the base head dimension (the family adds heads of fixed width). ``seed`` replaces the
    initialisation seed (``seed``) and the data-order and noise seed (``dit_train.seed``)."""
    cfg = ml_collections.ConfigDict(base.to_dict())
    hidden, family_depth, heads = family_shape(width, aspect=sweep.family.aspect, head_dim=sweep.family.head_dim)
    cfg.dit.update(hidden_size=hidden, depth=int(depth) if depth else family_depth, num_heads=heads)
    if parameterization == "mup":
        cfg.dit.update(parameterization="mup", mup_base_width=int(sweep.lr_transfer.mup_base_width),
                       mup_base_head_dim=int(sweep.family.head_dim))
    lr = float(lr) if lr is not None else learning_rate(sweep, width)
    if seed is not None:
        cfg.seed = int(seed)
        cfg.dit_train.seed = int(seed)
    cfg.dit_train.update(steps=int(steps), learning_rate=lr,
                         warmup_steps=max(1, int(round(sweep.lr.warmup_fraction * steps))))
    return cfg


def learning_rate(sweep: ml_collections.ConfigDict, width: int) -> float:
    """The sweep's learning-rate rule: ``lr.base`` x (``lr.base_width`` / width) ^ ``lr.width_exponent``
    (0 keeps it constant across widths, as μP prescribes; SP sweeps often use 1 or 0.5)."""
    return float(sweep.lr.base) * (float(sweep.lr.base_width) / width) ** float(sweep.lr.width_exponent)


def count_params(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(parameters, non-embedding parameters) of ``cfg``'s DiT, counted on the built (abstract) model."""
    model = nnx.eval_shape(lambda: build_dit(cfg))
    total = non_embedding = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.get_value().shape))
        total += n
        if path[0] in ("blocks", "t_modulation"):
            non_embedding += n
    return total, non_embedding


def batch_examples(batch: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """(latent tokens, text tokens) of every example of a packed batch (from its segment ids)."""
    out = []
    seg, tseg = np.asarray(batch["segment_ids"]), np.asarray(batch["text_segment_ids"])
    for r in range(seg.shape[0]):
        ids, counts = np.unique(seg[r][seg[r] > 0], return_counts=True)
        for s, n in zip(ids, counts):
            out.append((int(n), int(np.sum(tseg[r] == s))))
    return out


def train_flops(cfg: ml_collections.ConfigDict, examples: Iterable[tuple[int, int]]) -> float:
    """Training FLOPs (3x forward) of the examples (latent tokens n, text tokens m) under ``cfg``'s
    DiT, each attending to its own tokens only (see the module docstring)."""
    d = cfg.dit
    kw = dict(in_dim=dit_in_dim(cfg), out_dim=dit_out_dim(cfg), hidden_size=d.hidden_size, depth=d.depth,
              mlp_ratio=d.mlp_ratio, text_dim=d.text_dim, cross_attention=not d.num_classes, adaln=d.adaln,
              condition_groups=0)
    return float(sum(3.0 * n * dit_flops_per_token(seq_len=n, text_len=m, **kw) for n, m in examples))


def plan_points(base: ml_collections.ConfigDict, sweep: ml_collections.ConfigDict,
                probe: Sequence[list[tuple[int, int]]]) -> tuple[list[Point], list[dict[str, Any]]]:
    """The sweep's grid.

    Args:
      base: the run config the points start from.
      sweep: the sweep config: ``budgets``, ``holdout_budgets``, ``widths``, ``holdout_widths``
        (the sizes at the held-out budgets; default ``widths``), ``family``, ``lr``, ``min_steps``,
        ``max_steps``; optionally ``repeats`` (``points``: (budget, width) pairs of the grid,
        ``seeds``: points of kind "repeat" named ``<point>-s<seed>``) and ``lr_transfer``
        (``widths``, ``depth``, ``learning_rates``, ``parameterizations``, ``steps``,
        ``mup_base_width``: points of kind "lr_transfer" named ``LR-<sp|mup>-w<width>-lr<lr>``).
      probe: per probed batch, its examples' (latent tokens, text tokens)
        (:func:`batch_examples` of the data pipeline's first batches).

    Returns:
      (points, skipped): every IsoFLOP point whose steps fall in [min_steps, max_steps], budgets
      in order and sizes by width, then the repeats and the learning-rate transfer points; and
      one {"budget", "width", "steps", "why"} per skipped pair.

    Raises:
      ValueError: an empty probe; a repeat of a point the grid lacks.
    """
    if not probe or not any(probe):
        raise ValueError("the data probe holds no examples")
    tokens_per_step = float(np.mean([sum(n for n, _ in b) for b in probe]))
    points, skipped = [], []

    def make(cfg, *, budget, holdout, steps, per_step, name=None, kind="isoflop", parameterization="sp") -> Point:
        params, non_embedding = count_params(cfg)
        return Point(
            name=name or f"C{format_budget(budget)}-N{format_params(params)}", budget=budget, holdout=holdout,
            hidden_size=cfg.dit.hidden_size, depth=cfg.dit.depth, num_heads=cfg.dit.num_heads, params=params,
            non_embedding_params=non_embedding, learning_rate=float(cfg.dit_train.learning_rate), steps=steps,
            flops_per_step=per_step, tokens_per_step=tokens_per_step, flops=steps * per_step,
            tokens=steps * tokens_per_step, kind=kind, parameterization=parameterization)

    holdout_widths = tuple(sweep.get("holdout_widths") or sweep.widths)
    budgets = ([(float(c), False, sweep.widths) for c in sweep.budgets]
               + [(float(c), True, holdout_widths) for c in sweep.holdout_budgets])
    for budget, holdout, widths in budgets:
        for width in widths:
            cfg = point_config(base, sweep, int(width))
            per_step = float(np.mean([train_flops(cfg, b) for b in probe]))
            steps = int(round(budget / per_step))
            if not sweep.min_steps <= steps <= sweep.max_steps:
                skipped.append(dict(budget=budget, width=int(width), steps=steps,
                                    why=f"{steps} steps, outside [{sweep.min_steps}, {sweep.max_steps}]"))
                continue
            if abs(steps * per_step - budget) > 0.01 * budget:  # only with very few steps
                skipped.append(dict(budget=budget, width=int(width), steps=steps, why="misses the budget by > 1%"))
                continue
            points.append(make(point_config(base, sweep, int(width), steps), budget=budget, holdout=holdout,
                               steps=steps, per_step=per_step))
    rep = sweep.get("repeats")
    if rep:  # IsoFLOP points again with other seeds: how much a point's loss moves with the noise
        by_shape = {(p.budget, p.hidden_size): p for p in points if p.kind == "isoflop"}
        for budget, width in rep.points:
            p = by_shape.get((float(budget), int(width)))
            if p is None:
                raise ValueError(f"repeats.points: ({budget:g}, {width}) is not an IsoFLOP point of the plan")
            points += [dataclasses.replace(p, name=f"{p.name}-s{int(s)}", kind="repeat", seed=int(s))
                       for s in rep.seeds]  # same shape, steps and FLOPs: only the seeds differ
    lt = sweep.get("lr_transfer")
    if lt:  # the learning-rate transfer grid: fixed depth and steps, learning rate x width, per parameterization
        for param in lt.parameterizations:
            for width in lt.widths:
                # one shape per (parameterization, width): parameters and FLOPs do not depend on the rate
                cfg = point_config(base, sweep, int(width), int(lt.steps), depth=int(lt.depth), parameterization=param)
                per_step = float(np.mean([train_flops(cfg, b) for b in probe]))
                shape = make(cfg, budget=int(lt.steps) * per_step, holdout=False, steps=int(lt.steps),
                             per_step=per_step, kind="lr_transfer", parameterization=param)
                points += [dataclasses.replace(shape, name=f"LR-{param}-w{int(width)}-lr{format_budget(float(lr))}",
                                               learning_rate=float(lr)) for lr in lt.learning_rates]
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two sweep points share the names {dup}: widen the gaps between widths")
    return points, skipped
