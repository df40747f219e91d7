"""The quickstart over several training seeds: is its prompt adherence a result or a coin toss?

Runs ``sora-jax quickstart --config.seed=N`` once per seed, each in its own run folder
(``<workdir>/seed<N>``). ``--config.seed`` moves everything a seed can move: the bundled
datasets' draws (training clips and held-out prompt instances), the VAE's and the DiT's
initial weights; ``dit_train.seed`` / ``vae_train.seed`` (data order and noise) are not
touched. A folder that already holds ``quickstart_metrics.json`` is read, not rerun
(``--rerun`` overrides), so an interrupted benchmark continues where it stopped.

Seeds may run side by side (``--parallel K``), each process pinned to its own share of the
CPUs: the metrics do not depend on speed (step counts are fixed), only the wall time does.

Prints one JSON object: ``seeds``, ``<metric>_by_seed``, ``<metric>_mean``, ``<metric>_std``
(sample standard deviation) and ``<metric>_spread`` (max - min) for ``digit_accuracy``,
``direction_accuracy``, ``joint_accuracy`` (EMA weights), their ``raw_`` counterparts, the
autoencoder's held-out PSNRs, ``loop_seam_ratio`` (the demo loop), ``loop_seam_ratio_over_loops``
(each run's ``loop_seam_ratio_mean`` over ``evaluate.loop_samples`` loops; absent when a run
predates it) and
``dit_heldout_loss``; ``floors_met`` (the quickstart's goals: mean digit >= 0.8, direction
>= 0.95, joint >= 0.75, spread of digit and direction <= 0.1) and ``seconds_by_seed`` (stage
time of each run).

Run: ``python benchmarks/quickstart_seeds.py --seeds 0 1 2 --parallel 2`` (about 35 minutes on
2 CPU cores). Extra ``--config.*`` overrides are passed to every run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import numpy as np

METRICS = ("digit_accuracy", "direction_accuracy", "joint_accuracy", "raw_digit_accuracy",
           "raw_direction_accuracy", "raw_joint_accuracy", "vae_psnr_heldout_video",
           "vae_psnr_heldout_image", "vae_psnr_heldout_digits", "dit_heldout_loss")
FLOORS = {"digit_accuracy": 0.8, "direction_accuracy": 0.95, "joint_accuracy": 0.75}
MAX_SPREAD = 0.1


def _cpu_sets(parallel: int) -> list[list[int] | None]:
    """Disjoint CPU sets, one per concurrent run (None: no pinning)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if parallel <= 1 or len(cpus) < parallel:
        return [None] * max(1, parallel)
    share = len(cpus) // parallel
    return [cpus[i * share:(i + 1) * share] for i in range(parallel)]


def _run(seed: int, workdir: str, overrides: list[str], cpus: list[int] | None, rerun: bool) -> dict:
    metrics_path = os.path.join(workdir, "quickstart_metrics.json")
    if os.path.isfile(metrics_path) and not rerun:
        with open(metrics_path) as f:
            return json.load(f)
    if rerun and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "sora_jax.cli", "quickstart", "--workdir", workdir, "--no-progress",
           f"--config.seed={seed}", *overrides]
    if cpus is not None:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    with open(os.path.join(workdir, "quickstart.log"), "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not os.path.isfile(metrics_path):
        raise RuntimeError(f"seed {seed}: quickstart failed with exit code {code}; see {workdir}/quickstart.log")
    with open(metrics_path) as f:
        return json.load(f)


def summarize(by_seed: dict[int, dict]) -> dict:
    """Per-metric values by seed, mean, sample std and spread; whether the floors are met."""
    seeds = sorted(by_seed)
    out: dict = {"seeds": seeds}
    metrics = dict((k, [by_seed[s].get(k) for s in seeds]) for k in METRICS)
    loop = {s: by_seed[s].get("modes", {}).get("loop", {}) for s in seeds}
    metrics["loop_seam_ratio"] = [loop[s].get("loop_seam_ratio") for s in seeds]  # the demo loop
    # each run's mean over its evaluate.loop_samples loops (named apart from "<metric>_mean")
    metrics["loop_seam_ratio_over_loops"] = [loop[s].get("loop_seam_ratio_mean") for s in seeds]
    for k, values in metrics.items():
        if any(v is None for v in values):
            continue
        v = np.asarray(values, np.float64)
        out[f"{k}_by_seed"] = [float(x) for x in v]
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out[f"{k}_spread"] = float(v.max() - v.min())
    out["floors_met"] = bool(
        all(out[f"{k}_mean"] >= floor for k, floor in FLOORS.items())
        and all(out[f"{k}_spread"] <= MAX_SPREAD for k in ("digit_accuracy", "direction_accuracy")))
    out["seconds_by_seed"] = [by_seed[s].get("total_seconds") for s in seeds]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="runs/quickstart_seeds")
    p.add_argument("--parallel", type=int, default=1, help="runs side by side, each on its own CPUs")
    p.add_argument("--rerun", action="store_true", help="rerun seeds whose folder has metrics")
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    cpu_sets = _cpu_sets(args.parallel)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cpu_sets)) as pool:
        futures = {}
        free = list(range(len(cpu_sets)))
        pending = list(args.seeds)
        by_seed = {}
        while pending or futures:
            while pending and free:
                slot, seed = free.pop(0), pending.pop(0)
                fut = pool.submit(_run, seed, os.path.join(args.workdir, f"seed{seed}"), overrides,
                                  cpu_sets[slot], args.rerun)
                futures[fut] = (slot, seed)
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                slot, seed = futures.pop(fut)
                free.append(slot)
                by_seed[seed] = fut.result()
    result = summarize(by_seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
