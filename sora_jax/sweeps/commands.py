"""``sora-jax sweep``: the steps of a scaling-law sweep over the sweep's work folder.

  plan    the grid (:mod:`sora_jax.sweeps.plan`) -> ``<workdir>/plan.json`` and a table
  run     trains every point (or ``--point NAME``, one cluster job per point) in
          ``<workdir>/points/<name>/`` with the existing trainer and its Orbax resume: a finished
          point is skipped, an interrupted one resumes from its last checkpoint, a failed one is
          recorded with its error and the sweep goes on. Each finished point appends one row to
          ``<workdir>/results.jsonl``: held-out loss (fixed noise and timesteps), parameters,
          FLOPs, tokens, steps, wall time (of the last attempt: ``attempts`` > 1 means it resumed
          an interrupted one) and the point's config hash; ``loss_at_t``: the held-out
          loss at the fixed times ``dit_train.heldout_at_t`` (same noise).

  fit     the laws (:mod:`sora_jax.sweeps.fit`) of the finished IsoFLOP points of the fit budgets
          -> ``<workdir>/laws.json``, with the predictions at the held-out budgets
  report  plots, the results table and ``<workdir>/summary.json`` (:mod:`sora_jax.sweeps.report`)
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any

import ml_collections

from sora_jax import config as config_lib
from sora_jax.config_validation import validate_config
from sora_jax.data.pipeline import packed_dataset
from sora_jax.errors import StageError
from sora_jax.interop.run_weights import config_sha256
from sora_jax.io import write_json
from sora_jax.stages.dit import dit_sources, train_dit
from sora_jax.sweeps.fit import fit_laws, predict, read_laws, write_laws
from sora_jax.sweeps.plan import batch_examples, format_budget, plan_points, point_config
from sora_jax.sweeps.report import write_report
from sora_jax.sweeps.results import fit_rows, read_rows
from sora_jax.train.run_folder import paths
from sora_jax.train.trainer import Preempted

log = logging.getLogger(__name__)

__all__ = ["base_config", "fit", "plan", "probe_examples", "report", "run", "run_point"]

# what a point's folder shares with the sweep's source run (read only): prepared data, the VAE
# and the encoded latents
_SHARED = ("data", "vae", "latents")


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
    write_json(os.path.join(workdir, "plan.json"), out)
    out["table"] = [f"{p.name:>22} C={format_budget(p.budget):>7}{' (holdout)' if p.holdout else '':10} "
                    f"w={p.hidden_size:<4} depth={p.depth:<2} heads={p.num_heads:<2} N={p.params:>9,} "
                    f"D={p.tokens:>12,.0f} steps={p.steps:>6} lr={p.learning_rate:.3g} flops/C={p.flops / p.budget:.4f}"
                    for p in points]
    return out


def _read_plan(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "plan.json")
    if not os.path.isfile(path):
        raise StageError(f"{path} is missing: run `sora-jax sweep plan` first")
    with open(path) as f:
        return json.load(f)


def _status(point_dir: str) -> dict[str, Any]:
    path = os.path.join(point_dir, "status.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_point(sweep: ml_collections.ConfigDict, workdir: str, point: dict[str, Any], *,
              progress: bool = False) -> dict[str, Any]:
    """Trains one planned point (resuming its checkpoints) and returns its results row; a
    finished point returns its recorded row without training.

    Raises:
      whatever training raises (:func:`run` records it).
    """
    point_dir = os.path.join(workdir, "points", point["name"])
    status = _status(point_dir)
    if status.get("status") == "finished":
        return status["row"]
    os.makedirs(point_dir, exist_ok=True)
    source = os.path.abspath(sweep.source_run)
    for name in _SHARED:
        link = paths(point_dir)[name]
        if not os.path.lexists(link):
            os.symlink(paths(source)[name], link)
    cfg = point_config(base_config(sweep), sweep, int(point["hidden_size"]), int(point["steps"]),
                       depth=int(point["depth"]), lr=float(point["learning_rate"]),
                       parameterization=point.get("parameterization", "sp"), seed=point.get("seed"))
    # an earlier attempt that never finished (killed, preempted, failed): this one resumes it
    attempt = int(status.get("attempt", 0)) + 1
    write_json(os.path.join(point_dir, "status.json"), {"status": "running", "started": time.time(),
                                                          "attempt": attempt})
    t0 = time.perf_counter()
    summary = train_dit(cfg, point_dir, progress)
    row = dict(name=point["name"], budget=point["budget"], holdout=point["holdout"], params=point["params"],
               non_embedding_params=point["non_embedding_params"], flops=point["flops"], tokens=point["tokens"],
               steps=point["steps"], hidden_size=point["hidden_size"], depth=point["depth"],
               learning_rate=point["learning_rate"], kind=point.get("kind", "isoflop"),
               parameterization=point.get("parameterization", "sp"), seed=point.get("seed"),
               loss=float(summary["heldout_loss"]),
               loss_at_t=summary.get("heldout_loss_at_t", {}),
               wall_seconds=round(time.perf_counter() - t0, 2), attempts=attempt, config_sha256=config_sha256(cfg),
               status="finished")
    write_json(os.path.join(point_dir, "status.json"), {"status": "finished", "row": row})
    with open(os.path.join(workdir, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run(sweep: ml_collections.ConfigDict, workdir: str, *, point: str | None = None,
        progress: bool = False) -> dict[str, Any]:
    """Runs the planned points (all, or the one named ``point``) in plan order.

    Returns:
      ``{"finished": [names], "failed": {name: error}, "skipped_finished": [names]}``.

    Raises:
      StageError: no plan, or an unknown ``point``; with ``point`` given, its failure (the
        cluster job's exit code then says so).
      Preempted: SIGTERM reached a point's training: its checkpoint is saved, it is marked
        "interrupted", and no further point starts (the CLI exits 143, like train-dit).
    """
    planned = _read_plan(workdir)["points"]
    if point is not None:
        chosen = [p for p in planned if p["name"] == point]
        if not chosen:
            raise StageError(f"no point {point!r} in the plan; points: {[p['name'] for p in planned]}")
        planned = chosen
    out: dict[str, Any] = {"finished": [], "failed": {}, "skipped_finished": []}
    for p in planned:
        point_dir = os.path.join(workdir, "points", p["name"])
        if _status(point_dir).get("status") == "finished":
            out["skipped_finished"].append(p["name"])
            continue
        try:
            run_point(sweep, workdir, p, progress=progress)
            out["finished"].append(p["name"])
        except Preempted:
            # SIGTERM (a preempted or cancelled job): the point's checkpoint is saved and the whole
            # sweep stops here; the next `sweep run` resumes this point. Not a failure of the point.
            write_json(os.path.join(point_dir, "status.json"),
                        {"status": "interrupted", "attempt": int(_status(point_dir).get("attempt", 1))})
            raise
        except Exception as e:  # noqa: BLE001 - one point's failure does not stop the sweep
            msg = f"{type(e).__name__}: {e}"
            log.error("sweep point %s failed: %s", p["name"], msg)
            os.makedirs(point_dir, exist_ok=True)
            write_json(os.path.join(point_dir, "status.json"),
                        {"status": "failed", "error": msg, "traceback": traceback.format_exc(),
                         "attempt": int(_status(point_dir).get("attempt", 1))})
            with open(os.path.join(workdir, "results.jsonl"), "a") as f:
                f.write(json.dumps(dict(name=p["name"], budget=p["budget"], status="failed", error=msg)) + "\n")
            out["failed"][p["name"]] = msg
            if point is not None:
                raise StageError(f"sweep point {p['name']} failed: {msg}") from e
    return out


def _rows(workdir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(workdir, "results.jsonl")
    if not os.path.isfile(path):
        raise StageError(f"{path} is missing: no point has run (`sora-jax sweep run`)")
    try:
        return read_rows(path)
    except ValueError as e:
        raise StageError(f"sweep results: {e}") from None


def fit(sweep: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fits the laws to the finished IsoFLOP points of the fit budgets and writes
    ``<workdir>/laws.json`` (constants, bootstrap intervals, points used, code version, and
    ``predictions``: best loss, N* and D* at each held-out budget, which say where to place the
    held-out sizes).

    Returns:
      the exponents with their intervals and the predictions.

    Raises:
      StageError: no results; a budget the fitter refuses (fewer than 3 points, no interior
        minimum: the message names the budget).
    """
    points = fit_rows(_rows(workdir))
    try:
        laws = fit_laws(points, n_boot=int(sweep.get("n_boot", 200)))
    except ValueError as e:
        raise StageError(f"sweep fit: {e}") from None
    laws["predictions"] = {format_budget(float(c)): predict(laws, float(c)) for c in sweep.holdout_budgets}
    write_laws(os.path.join(workdir, "laws.json"), laws)
    iso, par = laws["isoflop"], laws["parametric"]
    return {"points_used": len(laws["points_used"]),
            "n_opt_exponent": iso["n_opt_exponent"], "n_opt_exponent_ci": iso["n_opt_exponent_ci"],
            "d_opt_exponent": iso["d_opt_exponent"], "d_opt_exponent_ci": iso["d_opt_exponent_ci"],
            "parametric": {k: par[k] for k in ("alpha", "beta", "E")},
            "per_budget": [{k: b[k] for k in ("budget", "n_opt", "d_opt", "loss_opt", "argmin_at_edge")}
                           for b in iso["per_budget"]],
            "predictions": laws["predictions"], "laws": os.path.join(workdir, "laws.json")}


def report(sweep: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes the sweep's report (:func:`sora_jax.sweeps.report.write_report`) from its plan,
    results and ``laws.json``; returns the summary.

    Raises:
      StageError: no plan, results or laws (run plan / run / fit first); no finished point at the
        held-out budget.
    """
    planned = _read_plan(workdir)["points"]
    path = os.path.join(workdir, "laws.json")
    if not os.path.isfile(path):
        raise StageError(f"{path} is missing: run `sora-jax sweep fit` first")
    try:
        return write_report(workdir, sweep.to_dict(), planned, _rows(workdir), read_laws(path))
    except ValueError as e:
        raise StageError(f"sweep report: {e}") from None
