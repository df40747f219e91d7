"""Every prompt mode on a tiny trained run: shapes, preserved frames, loops, SDEdit endpoints,
the prompt filter and provenance, through the Python API and the CLI."""

import json
import os

import numpy as np
import pytest

from sora_jax.cli import run
from sora_jax.inference.generate import Request
from sora_jax.evaluation.image_quality import psnr
from sora_jax.inference.modes import (LOOP_DECODE_PERIODS, ModeError, loop_seam_ratio, periodic_decode,
                                      run_mode, setup_mode)

KW = dict(frames=9, height=32, width=32, seed=0, guidance=2.0, steps=2)
PROMPT = "the digit 3 moves right"


def _video(frames=12, h=40, w=56, seed=0):
    """A deterministic uint8 test clip: a colour gradient with a bright square moving right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1)
    out = []
    for t in range(frames):
        f = base.copy()
        x0 = 4 + 3 * t
        f[10:22, x0:x0 + 12] = 255
        out.append(f)
    return (np.stack(out) + rng.integers(0, 3, (frames, h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def gen(trained_run):
    from sora_jax import config as config_lib
    from sora_jax.inference.generate import Generator
    from sora_jax.train.run_folder import paths

    cfg = config_lib.from_json(open(paths(trained_run)["config"]).read())
    return Generator(cfg, trained_run)


def test_text_modes_shapes(gen):
    assert run_mode(gen, "t2v", PROMPT, **KW).video.shape == (9, 32, 32, 3)
    assert run_mode(gen, "t2i", "the digit 3", **KW).video.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("mode,inputs,given", [
    ("i2v", lambda: [_video()[3]], [0]),
    ("extend-forward", lambda: [_video()], [0, 1, 2, 3, 4]),
    ("extend-backward", lambda: [_video()], [5, 6, 7, 8]),
    ("connect", lambda: [_video(seed=1), _video(seed=2)[::-1]], [0, 5, 6, 7, 8]),
])
def test_context_modes_keep_the_given_frames(gen, mode, inputs, given):
    res = run_mode(gen, mode, PROMPT, inputs=inputs(), **KW)
    assert res.video.shape == (9, 32, 32, 3) and res.video.dtype == np.uint8
    assert res.info["conditioned_frames"] == given
    # the context latents come back unchanged from the sampler
    st = setup_mode(gen, mode, PROMPT, frames=9, height=32, width=32, inputs=inputs())
    z = gen.sample_latents([st.request], seed=0, guidance=2.0, steps=2)[0]
    ctx = st.request.context_frames
    np.testing.assert_array_equal(z[ctx], st.request.context[ctx])
    assert not np.array_equal(z[~ctx], st.request.context[~ctx])
    # every given frame is in the output as the VAE reproduces the input
    assert res.info["conditioned_frames_psnr"] == 100.0
    if mode in ("i2v", "extend-forward"):  # given frames first: the causal decoder returns them exactly
        assert res.info["decoded_context_psnr"] >= 60.0 and "junction_ratio" not in res.info
    else:  # given frames after generated ones are decoded from a generated history, then replaced
        assert np.isfinite(res.info["decoded_context_psnr"]) and res.info["junction_ratio"] > 0
        j = given[-4]  # first frame of the trailing given group
        cut = np.mean(np.abs(res.video[j].astype(float) - res.video[j - 1]))
        steps = np.median(np.mean(np.abs(np.diff(res.video.astype(float), axis=0)), axis=(1, 2, 3)))
        assert res.info["junction_ratio"] == pytest.approx(cut / steps)


def test_extend_forward_output_starts_with_the_input_round_trip(gen):
    video = _video()
    res = run_mode(gen, "extend-forward", PROMPT, inputs=[video], **KW)
    from sora_jax.inference.modes import fit_media

    tail = fit_media(video, 32, 32)[-5:]
    rt = gen.decode(gen.encode(tail))
    assert psnr(res.video[:5], rt) >= 60.0


def test_sdedit_endpoints(gen):
    video = _video()
    s0 = run_mode(gen, "edit", PROMPT, inputs=[video], strength=0.0, **KW)
    assert s0.info["input_psnr"] == 100.0  # strength 0: the input's VAE round trip, exactly
    s1 = run_mode(gen, "edit", PROMPT, inputs=[video], strength=1.0, **KW)
    t2v = run_mode(gen, "t2v", PROMPT, **KW)
    np.testing.assert_array_equal(s1.video, t2v.video)  # strength 1: text-to-video
    mid = run_mode(gen, "edit", PROMPT, inputs=[video], strength=0.5, **KW)
    assert not np.array_equal(mid.video, s0.video) and not np.array_equal(mid.video, t2v.video)


def test_loop_is_the_clip_and_a_generated_link_decoded_periodically(gen):
    res = run_mode(gen, "loop", PROMPT, **KW)
    # the clip's latents: 1 for frame 0, then n = 2 groups of 4 frames; the link adds m = 1
    clip = gen.sample_latents([Request(PROMPT, 9, 32, 32)], seed=0, guidance=2.0, steps=2)[0]
    first, period = res.latent[0], res.latent[1:]
    np.testing.assert_array_equal(first, clip[0])
    np.testing.assert_array_equal(period[:2], clip[1:])
    assert period.shape[0] == 3 and not np.array_equal(period[2], clip[2])
    assert res.video.shape == (12, 32, 32, 3)
    assert res.info["clip_frames"] == 9 and res.info["link_frames"] == 4
    assert res.info["loop_seam_ratio"] == pytest.approx(loop_seam_ratio(res.video))
    # the output is the steady state: more periods before it change nothing that shows
    longer, _ = periodic_decode(gen.decode, first, period, periods=LOOP_DECODE_PERIODS + 3)
    assert psnr(res.video, longer) >= 40.0
    assert res.info["loop_period_psnr"] >= 40.0


def test_periodic_decode_reaches_the_steady_state_of_a_fading_decoder():
    """A causal decoder with fading memory (frames repeat their latent td times, then an
    exponential moving average y_t = a y_{t-1} + (1 - a) x_t): over a periodic input its
    steady state is y_t = (1 - a) sum_{j<N} a^j x_{t-j} / (1 - a^N), N the period in frames."""
    td, a = 4, 0.5
    rng = np.random.default_rng(0)

    def decode(z):
        x = np.concatenate([z[:1]] + [np.repeat(zi[None], td, 0) for zi in z[1:]]).astype(np.float64)
        y, out = x[0], []
        for xt in x:
            y = a * y + (1 - a) * xt
            out.append(y)
        return np.round(np.stack(out)).astype(np.uint8)

    first = rng.integers(0, 256, (1, 1, 3)).astype(np.float32)
    period = rng.integers(0, 256, (3, 1, 1, 3)).astype(np.float32)
    video, period_psnr = periodic_decode(decode, first, period)
    x = np.repeat(period, td, 0).astype(np.float64)  # one period of input frames, N = 12
    n = len(x)
    steady = np.stack([(1 - a) * sum(a ** j * x[(t - j) % n] for j in range(n)) / (1 - a ** n)
                       for t in range(n)])
    assert video.shape == (n, 1, 1, 3)
    np.testing.assert_allclose(video, steady, atol=1.0)
    assert period_psnr == 100.0  # the last two copies agree to the uint8 rounding
    # one period alone is not enough to forget frame 0 and the start
    short, short_psnr = periodic_decode(decode, first, period, periods=2)
    assert short_psnr < 100.0
    with pytest.raises(ValueError, match="periods >= 2"):
        periodic_decode(decode, first, period, periods=1)


def test_loop_seam_ratio_closed_form():
    frames = np.zeros((4, 2, 2, 3), np.float32)
    frames[1], frames[2], frames[3] = 1.0, 2.0, 3.0  # steps of 1, seam of 3
    assert loop_seam_ratio(frames) == pytest.approx(3.0)
    assert loop_seam_ratio(np.concatenate([frames, frames[2:0:-1]])) == pytest.approx(1.0)


def test_mode_input_errors(gen):
    with pytest.raises(ModeError, match="takes 1 input"):
        run_mode(gen, "i2v", PROMPT, **KW)
    with pytest.raises(ModeError, match="at least 9"):
        run_mode(gen, "edit", PROMPT, inputs=[_video(frames=5)], **KW)
    with pytest.raises(ModeError, match="unknown mode"):
        run_mode(gen, "zoom", PROMPT, **KW)
    with pytest.raises(ModeError, match="loop needs at least 5 frames"):
        run_mode(gen, "loop", PROMPT, **dict(KW, frames=1))


def test_cli_modes_write_provenance(trained_run, tmp_path):
    from sora_jax.io import write_mp4, write_png
    from sora_jax.inference.provenance import PROVENANCE_KEYS, read_provenance
    from sora_jax.train.run_folder import checkpoint_fingerprint, paths

    img = str(tmp_path / "photo.png")
    write_png(img, _video()[0])
    clip = str(tmp_path / "clip.mp4")
    write_mp4(clip, _video(), fps=8)
    common = ["--workdir", trained_run, "--frames", "9", "--height", "32", "--width", "32",
              "--steps", "2", "--seed", "5", "--no-progress"]
    out = str(tmp_path / "i2v")
    assert run(["generate", "--mode", "i2v", "--input", img, "--prompt", "3 going right",
                "--out", out, *common]) == 0
    info = json.load(open(os.path.join(out, "samples.json")))
    sample = info["samples"][0]
    assert sample["extended_prompt"] == "the digit 3 moves right"
    sidecar = json.load(open(sample["sidecar"]))
    assert set(PROVENANCE_KEYS) <= set(sidecar)
    assert sidecar["mode"] == "i2v" and sidecar["prompt"] == "3 going right"
    assert sidecar["extended_prompt"] == "the digit 3 moves right" and sidecar["seed"] == 5
    assert sidecar["sampler"] == "euler" and sidecar["steps"] == 2
    # the weights sampled from: the EMA's (the default), hashed from the checkpoint's ema item
    assert sidecar["weights"] == "ema"
    assert sidecar["checkpoint_sha256"] == checkpoint_fingerprint(paths(trained_run)["dit"], item="ema")["sha256"]
    assert sidecar["conditioned_frames_psnr"] >= 35.0
    assert sidecar["inputs"][0]["path"].endswith("photo.png")
    embedded = read_provenance(sample["path"])  # inside the mp4 itself
    assert embedded["extended_prompt"] == sidecar["extended_prompt"]
    assert embedded["checkpoint_sha256"] == sidecar["checkpoint_sha256"]

    out = str(tmp_path / "loop")
    assert run(["generate", "--mode", "loop", "--prompt", PROMPT, "--solver", "dpmpp_2m",
                "--out", out, *common]) == 0
    sidecar = json.load(open(json.load(open(os.path.join(out, "samples.json")))["samples"][0]["sidecar"]))
    assert sidecar["sampler"] == "dpmpp_2m" and np.isfinite(sidecar["loop_seam_ratio"])

    out = str(tmp_path / "t2i")
    assert run(["generate", "--mode", "t2i", "--prompt", "the digit 7", "--out", out, *common]) == 0
    sample = json.load(open(os.path.join(out, "samples.json")))["samples"][0]
    assert sample["path"].endswith(".png") and read_provenance(sample["path"])["mode"] == "t2i"

    out = str(tmp_path / "edit")
    assert run(["generate", "--mode", "edit", "--input", clip, "--strength", "0.3",
                "--visual-guidance", "1.5", "--prompt", PROMPT, "--out", out, *common]) == 0


def test_cli_refuses_filtered_prompts(trained_run, tmp_path, capsys):
    out = str(tmp_path / "refused")
    code = run(["generate", "--workdir", trained_run, "--prompt", "the digit 3 moves right",
                "--prompt", "Some GORE, please", "--out", out, "--no-progress"])
    assert code == 3
    assert "refused" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing generated for any prompt of the call
    code = run(["generate", "--workdir", trained_run, "--prompt", "a digit",
                "--mode", "connect", "--no-progress"])
    assert code == 2  # wrong input count is named
    assert "takes 2 --input" in capsys.readouterr().err


def test_loop_seams_average_the_loops_of_heldout_prompts_and_seeds(gen, trained_run):
    """The quickstart's loop seam is a mean over loops k = 0..n-1, each on held-out prompt
    k mod P with seed sample.seed + k, with the standard error s / sqrt(n)."""
    from sora_jax.stages.sampling import heldout_prompts, loop_seams

    cfg = gen.cfg.copy_and_resolve_references()
    cfg.evaluate.loop_samples = 3
    cfg.sample.steps = 2
    out = loop_seams(cfg, trained_run, gen, progress=False)
    prompts = heldout_prompts(cfg, trained_run, 3)
    s = cfg.sample
    ratios = [loop_seam_ratio(run_mode(gen, "loop", prompts[k % len(prompts)], frames=s.frames,
                                       height=s.height, width=s.width, seed=s.seed + k,
                                       guidance=s.guidance, steps=2, solver=s.solver).video)
              for k in range(3)]
    assert out["loop_seam_samples"] == 3
    assert out["loop_seam_ratio_mean"] == pytest.approx(np.mean(ratios))
    assert out["loop_seam_ratio_se"] == pytest.approx(np.std(ratios, ddof=1) / np.sqrt(3))
