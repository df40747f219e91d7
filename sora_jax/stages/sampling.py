"""``evaluate`` and the quickstart's prompt modes: sampling from a trained run folder.

``generate`` itself is :func:`sora_jax.inference.samples.generate_samples`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from sora_jax.data import sources
from sora_jax.data.records import read_dataset
from sora_jax.errors import StageError
from sora_jax.evaluation.digits import evaluate_samples
from sora_jax.inference.generate import Generator
from sora_jax.inference.modes import run_mode
from sora_jax.inference.prompts import make_extender
from sora_jax.inference.samples import provenance_fields, write_sample, write_samples
from sora_jax.io import write_contact_sheet, write_json
from sora_jax.train.run_folder import datasets, paths


def heldout_prompts(cfg: ml_collections.ConfigDict, workdir: str, limit: int) -> list[str]:
    """Captions of held-out digit/motion combinations on held-out digit instances (single digit)."""
    data = read_dataset(datasets(workdir)["moving_mnist_heldout_prompts"])
    captions = [str(data[i]["caption"]) for i in range(len(data))]
    return captions[:limit]


SHOWN = 10  # samples written by evaluate (the held-out set has 10 digit/direction combinations)


def _standard_errors(result: dict[str, Any]) -> dict[str, float]:
    """Binomial standard errors sqrt(p (1 - p) / n) of the accuracies of ``evaluate_samples``."""
    n = {"digit_accuracy": result["num_samples"], "direction_accuracy": result["num_direction_samples"],
         "joint_accuracy": result["num_direction_samples"]}
    return {f"{k}_se": float(np.sqrt(result[k] * (1.0 - result[k]) / n[k])) if n[k] else float("nan")
            for k in n}


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, generator: Generator | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Prompt adherence on held-out prompts: digit, direction and joint accuracy of samples.

    Every one of the first ``evaluate.num_samples`` held-out prompts is sampled with
    ``evaluate.seeds`` noise seeds (``sample.seed + 1000 k``), from the generator's weights (by
    default the DiT's EMA; ``weights`` in the result) and again from its raw weights (once
    only when those are the ones already used, e.g. a run without an EMA). Each accuracy comes
    with its binomial standard error (``*_se``); the raw weights' results carry the prefix
    ``raw_``.
    One EMA sample of each distinct prompt (up to ``SHOWN``) is written to ``<workdir>/eval/``
    with a contact sheet.

    Raises:
      StageError: no held-out prompts.
    """
    s, e = cfg.sample, cfg.evaluate
    prompts = heldout_prompts(cfg, workdir, e.num_samples)
    if not prompts:
        raise StageError("no held-out prompts to evaluate: data.heldout_prompts and evaluate.num_samples must be > 0")
    main = generator or Generator(cfg, workdir, weights="ema")
    runs = [main] if main.weights == "raw" else [main, main.with_weights("raw")]
    captions = [p for _ in range(e.seeds) for p in prompts]
    by_weights, shown = {}, None
    for gen in runs:
        videos = []
        with tqdm(total=len(captions), desc=f"evaluate ({gen.weights})", disable=not progress) as bar:
            for k in range(e.seeds):
                for i in range(0, len(prompts), e.batch):
                    videos += gen(prompts[i : i + e.batch], frames=s.frames, height=s.height,
                                  width=s.width, seed=s.seed + 1000 * k + i, guidance=s.guidance,
                                  steps=s.steps, solver=s.solver)
                    bar.update(len(prompts[i : i + e.batch]))
        res = evaluate_samples(videos, captions)
        res.update(_standard_errors(res))
        by_weights[gen.weights] = res
        shown = videos if shown is None else shown
    result = dict(by_weights[main.weights], weights=main.weights)
    raw = by_weights["raw"]
    for k in ("digit_accuracy", "direction_accuracy", "joint_accuracy"):
        result[f"raw_{k}"], result[f"raw_{k}_se"] = raw[k], raw[f"{k}_se"]
    result["raw_per_sample"] = raw["per_sample"]
    out = paths(workdir)["eval"]
    info = {"checkpoint_step": main.dit_step, "weights": main.weights, "seed": s.seed,
            "guidance": s.guidance, "steps": s.steps}
    # one sample of each distinct held-out prompt (all ten digit/direction combinations), first seed
    index_of: dict[str, int] = {}
    for i, c in enumerate(captions):
        index_of.setdefault(c, i)
    picked = list(index_of.values())[:SHOWN]
    result["samples"] = write_samples(out, [captions[i] for i in picked], [shown[i] for i in picked],
                                      info, fps=s.fps)
    write_json(os.path.join(out, "evaluate.json"), result)
    return result


# The quickstart's image and video prompts on bundled real media: (mode, prompt, inputs, options).
# Inputs name bundled sources: "video:<name>:<first frame>:<stride>" or "photo:<name>".
DEMO_MODES = (
    ("t2v", "the digit 3 moves left and the digit 7 moves up", (), {}),
    ("t2i", "the digit 8", (), {}),
    ("i2v", "a clip from bikes", ("photo:motorcycle_left",), {}),
    ("extend-forward", "a clip from big buck bunny", ("video:bigbuckbunny:40:2",), {}),
    ("extend-backward", "a clip from big buck bunny", ("video:bigbuckbunny:90:2",), {}),
    ("connect", "a clip from bikes", ("video:bikes:0:2", "video:bigbuckbunny:20:2"), {}),
    ("loop", "the digit 5 moves up", (), {}),
    ("edit", "the digit 3 moves right", ("video:bikes:100:2",), {"strength": 0.6}),
)


def _demo_input(spec: str, frames: int) -> np.ndarray:
    kind, name, *rest = spec.split(":")
    if kind == "photo":
        return np.asarray(sources.load_photo(name))
    start, stride = (int(v) for v in rest)
    video = sources.load_video(name, max_frames=start + stride * frames)
    return np.asarray(video[start::stride][:frames])


def prompt_modes(cfg: ml_collections.ConfigDict, workdir: str, generator: Generator | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """One sample of every prompt mode (``DEMO_MODES``) on bundled real media, with provenance.

    Writes ``<workdir>/modes/``: ``<mode>.mp4`` (``.png`` for t2i) with a ``.json`` sidecar each,
    ``contact_sheet.png`` (one row per mode) and ``modes.json`` (each mode's measurements:
    ``conditioned_frames_psnr``, ``loop_seam_ratio``, ``input_psnr``; the loop's entry also holds
    :func:`loop_seams` over ``evaluate.loop_samples`` more loops).
    """
    gen = generator or Generator(cfg, workdir)
    s = cfg.sample
    extend = make_extender(cfg.prompt.extender)
    out = paths(workdir)["modes"]
    solver = s.solver
    visual = None if s.visual_guidance == 1.0 else s.visual_guidance
    results, videos, labels = {}, [], []
    for mode, prompt, specs, opts in tqdm(DEMO_MODES, desc="modes", disable=not progress):
        inputs = [_demo_input(spec, 2 * s.frames) for spec in specs]
        ext = extend(prompt)
        res = run_mode(gen, mode, ext, frames=s.frames, height=s.height, width=s.width, seed=s.seed,
                       guidance=s.guidance, steps=s.steps, solver=solver, visual_guidance=visual,
                       inputs=inputs, strength=opts.get("strength", s.strength))
        fields = provenance_fields(gen, solver=solver, steps=s.steps, guidance=s.guidance,
                                   visual_guidance=visual, inputs=[{"source": sp} for sp in specs])
        results[mode] = write_sample(os.path.join(out, mode), res.video, prompt=prompt,
                                     extended_prompt=ext, seed=s.seed, fields=fields, info=res.info,
                                     fps=s.fps)
        videos.append(res.video)
        labels.append(f"{mode}: {ext}")
    write_contact_sheet(os.path.join(out, "contact_sheet.png"), videos, labels=labels,
                        max_frames=max(len(v) for v in videos), scale=max(1, 64 // max(s.height, s.width)))
    if "loop" in results:
        results["loop"].update(loop_seams(cfg, workdir, gen, progress))
    write_json(os.path.join(out, "modes.json"), results)
    return results


def loop_seams(cfg: ml_collections.ConfigDict, workdir: str, generator: Generator,
               progress: bool = True) -> dict[str, Any]:
    """The loop mode's seam over ``evaluate.loop_samples`` loops, not one.

    One loop's ``loop_seam_ratio`` moves with its noise draw more than between recipes (issue
    16: the first loop of eight quickstart-size checkpoints read 0.40 to 1.12, while their
    16-loop means had standard errors of 0.04-0.10; the fresh-clone quickstart model's demo
    loop read 0.62, its 16 loops 1.02 +- 0.05). Loop k uses prompt k mod P of the first
    P = min(n, available) held-out prompts and noise seed ``sample.seed + k``.

    Returns:
      ``loop_seam_ratio_mean``, ``loop_seam_ratio_se`` (sample standard deviation / sqrt(n); 0
      for one loop) and ``loop_seam_samples`` n.

    Raises:
      StageError: ``evaluate.loop_samples`` is 0 or there are no held-out prompts.
    """
    s, n = cfg.sample, int(cfg.evaluate.loop_samples)
    prompts = heldout_prompts(cfg, workdir, n)
    if not prompts or n < 1:
        raise StageError("no loops to measure: data.heldout_prompts and evaluate.loop_samples must be > 0")
    visual = None if s.visual_guidance == 1.0 else s.visual_guidance
    ratios = []
    for k in tqdm(range(n), desc="loop seams", disable=not progress):
        res = run_mode(generator, "loop", prompts[k % len(prompts)], frames=s.frames, height=s.height,
                       width=s.width, seed=s.seed + k, guidance=s.guidance, steps=s.steps,
                       solver=s.solver, visual_guidance=visual, inputs=[], strength=s.strength)
        ratios.append(res.info["loop_seam_ratio"])
    r = np.asarray(ratios, np.float64)
    se = float(r.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return {"loop_seam_ratio_mean": float(r.mean()), "loop_seam_ratio_se": se, "loop_seam_samples": n}
