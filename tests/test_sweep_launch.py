"""The sweep launchers: launch/sweep_slurm.sh (one SLURM job array), launch/sweep_point.sbatch (its
tasks) and launch/sweep_xpk.sh (one XPK workload per point), through their --dry-run output."""

import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
POINTS = [  # names with dots, a '+' and upper case, two kinds
    {"name": "C1.6e13-N5.2M", "budget": 1.6e13, "holdout": False, "kind": "isoflop"},
    {"name": "C1.6e13-N12M", "budget": 1.6e13, "holdout": True, "kind": "isoflop"},
    {"name": "LR-mup-w64-lr1.6e-2", "budget": 0.0, "holdout": False, "kind": "lr_transfer"},
]
NAMES = [p["name"] for p in POINTS]
XPK_ENV = {"CLUSTER": "gke1", "TPU_TYPE": "v5p-8"}  # xpk.sh requires both
WORKLOAD = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _plan(tmp_path, points=POINTS, folder="Sweep_A.1") -> pathlib.Path:
    workdir = tmp_path / folder
    workdir.mkdir()
    (workdir / "plan.json").write_text(json.dumps({"sweep": {"name": "s"}, "points": points, "skipped": []}))
    return workdir


def _bin(tmp_path) -> str:
    """A PATH with the few tools the launchers use plus python3, and no sbatch, srun or xpk."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        for tool in ("basename", "dirname", "sed", "tr", "date", "cat"):
            found = shutil.which(tool)
            if found:
                (bin_dir / tool).symlink_to(found)
        (bin_dir / "python3").symlink_to(sys.executable)  # a login node's python3: the stdlib is enough
    return str(bin_dir)


def _bash(script, args, tmp_path, **env):
    env = {"PATH": _bin(tmp_path), "HOME": str(tmp_path), **env}
    return subprocess.run(["/bin/bash", str(LAUNCH / script), *args], env=env, cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _args(workdir) -> list[str]:
    return ["--config", "configs/sweep_cpu.py", "--workdir", str(workdir), "--config.source_run=runs/my run"]


def _table(stdout: str) -> dict[int, str]:
    rows = [line.split() for line in stdout.splitlines() if re.match(r"^\s+\d+\s", line)]
    return {int(r[0]): r[-1] for r in rows}


def _option(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def test_slurm_dry_run_submits_one_array_of_every_point(tmp_path):
    args = _args(_plan(tmp_path))
    r = _bash("sweep_slurm.sh", ["--dry-run", *args], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _table(r.stdout) == dict(enumerate(NAMES))  # index -> name
    (cmd,) = _commands(r.stdout)
    assert cmd[:2] == ["sbatch", "--array=0-2%3"]
    i = cmd.index(str(LAUNCH / "sweep_point.sbatch"))
    assert cmd[i + 1:] == args  # passed through, the space survives
    assert re.fullmatch(r"ALL,SWEEP_PLAN_SHA256=[0-9a-f]{64}", _option(cmd, "--export"))
    r = _bash("sweep_slurm.sh", ["--dry-run", "--", *args], tmp_path, MAX_PARALLEL="2",
              SBATCH_ARGS="--partition=gpu --gpus-per-node=1")
    (cmd,) = _commands(r.stdout)
    assert cmd[1] == "--array=0-2%2" and cmd[3:5] == ["--partition=gpu", "--gpus-per-node=1"]


@pytest.mark.parametrize("points,array,names", [
    ("kind:isoflop", "0-1%2", NAMES[:2]),
    ("kind:lr_transfer", "2%1", NAMES[2:]),
    ("LR-mup-w64-lr1.6e-2, C1.6e13-N5.2M", "0,2%2", [NAMES[0], NAMES[2]]),  # plan order
    ("kind:lr_transfer,C1.6e13-N12M", "1-2%2", NAMES[1:]),
])
def test_slurm_points_filter_keeps_the_plan_indices(tmp_path, points, array, names):
    r = _bash("sweep_slurm.sh", ["--dry-run", *_args(_plan(tmp_path))], tmp_path, POINTS=points)
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    assert cmd[1] == f"--array={array}"
    assert sorted(_table(r.stdout).items()) == [(NAMES.index(n), n) for n in names]


@pytest.mark.parametrize("script", ["sweep_slurm.sh", "sweep_xpk.sh"])
def test_missing_plan_and_empty_selections_exit_2(tmp_path, script):
    workdir = _plan(tmp_path)
    r = _bash(script, ["--dry-run", *_args(tmp_path / "nowhere")], tmp_path, **XPK_ENV)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"{script}: {tmp_path / 'nowhere' / 'plan.json'} is missing: run `sora-jax sweep plan` first\n"
    for points, message in [("kind:nothing", "no point of kind 'nothing'"),
                            ("C1.6e13-n5.2m", "no point 'C1.6e13-n5.2m'")]:  # names are exact
        r = _bash(script, ["--dry-run", *_args(workdir)], tmp_path, POINTS=points, **XPK_ENV)
        assert r.returncode == 2 and message in r.stderr and r.stdout == ""
    (workdir / "plan.json").write_text(json.dumps({"points": []}))
    r = _bash(script, ["--dry-run", *_args(workdir)], tmp_path, **XPK_ENV)
    assert r.returncode == 2 and "has no points" in r.stderr


@pytest.mark.parametrize("script", ["sweep_slurm.sh", "sweep_xpk.sh"])
def test_arguments_are_checked(tmp_path, script):
    workdir = _plan(tmp_path)
    for args, message in [(["--config", "c"], "no --workdir"),
                          (["sweep", "run", *_args(workdir)], "not 'sweep'"),
                          ([*_args(workdir), "--point", NAMES[0]], "POINTS=")]:
        r = _bash(script, ["--dry-run", *args], tmp_path, **XPK_ENV)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = _bash(script, ["--help"], tmp_path)
    assert r.returncode == 0 and "POINTS" in r.stdout and "--dry-run" in r.stdout


def test_slurm_submits_with_sbatch_outside_dry_run(tmp_path):
    args = _args(_plan(tmp_path))
    r = _bash("sweep_slurm.sh", args, tmp_path)
    assert r.returncode == 2 and "'sbatch' not found" in r.stderr and r.stdout == ""
    log = tmp_path / "sbatch.json"
    fake = pathlib.Path(_bin(tmp_path)) / "sbatch"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
                    "print('Submitted batch job 42')\n")
    fake.chmod(0o755)
    r = _bash("sweep_slurm.sh", args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Submitted batch job 42" in r.stdout and _table(r.stdout) == dict(enumerate(NAMES))
    argv = json.loads(log.read_text())
    assert argv[0] == "--array=0-2%3" and argv[2:] == [str(LAUNCH / "sweep_point.sbatch"), *args]


def test_array_task_runs_the_point_of_its_index(tmp_path):
    workdir = _plan(tmp_path)
    args = _args(workdir)
    r = _bash("sweep_point.sbatch", ["--dry-run", *args], tmp_path, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="12345")
    assert r.returncode == 0, r.stderr
    assert f"sweep run --point {NAMES[1]}" in r.stdout and "SORA_JAX_COORDINATOR_PORT=32345" in r.stdout
    (cmd,) = _commands(r.stdout)
    assert cmd == ["srun", "--kill-on-bad-exit=1", "sora-jax", "sweep", "run", "--point", NAMES[1], *args]
    # the plan's sha256 that sweep_slurm.sh passes: the same plan runs, a changed one stops the task
    (submit,) = _commands(_bash("sweep_slurm.sh", ["--dry-run", *args], tmp_path).stdout)
    sha = _option(submit, "--export").split("=")[1]
    r = _bash("sweep_point.sbatch", ["--dry-run", *args], tmp_path, SLURM_ARRAY_TASK_ID="2", SWEEP_PLAN_SHA256=sha)
    assert r.returncode == 0 and f"sweep run --point {NAMES[2]} " in r.stdout
    (workdir / "plan.json").write_text(json.dumps({"points": POINTS[::-1]}))
    r = _bash("sweep_point.sbatch", ["--dry-run", *args], tmp_path, SLURM_ARRAY_TASK_ID="2", SWEEP_PLAN_SHA256=sha)
    assert r.returncode == 2 and "changed since this array was submitted" in r.stderr and r.stdout == ""
    r = _bash("sweep_point.sbatch", ["--dry-run", *args], tmp_path, SLURM_ARRAY_TASK_ID="3")
    assert r.returncode == 2 and "array index 3 is past the last point" in r.stderr
    r = _bash("sweep_point.sbatch", ["--dry-run", *args], tmp_path)
    assert r.returncode == 2 and "SLURM_ARRAY_TASK_ID is not set" in r.stderr
    r = _bash("sweep_point.sbatch", ["--help"], tmp_path)
    assert r.returncode == 0 and "SLURM_ARRAY_TASK_ID" in r.stdout and "#SBATCH --nodes" not in r.stdout
    header = (LAUNCH / "sweep_point.sbatch").read_text()
    assert "#SBATCH --nodes=1\n" in header and "#SBATCH --output=slurm-%x-%A_%a.out\n" in header


def _workloads(r) -> list[tuple[str, str]]:
    """(workload, point) of each `xpk workload create` command."""
    cmds = _commands(r.stdout)
    assert all(c[:3] == ["xpk", "workload", "create"] for c in cmds), r.stdout
    out = []
    for c in cmds:
        tail = shlex.split(_option(c, "--command").split("python3 -m sora_jax.cli", 1)[1])
        assert tail[:3] == ["sweep", "run", "--point"]
        out.append((_option(c, "--workload"), tail[3]))
    return out


def test_xpk_dry_run_creates_one_workload_per_point(tmp_path):
    args = _args(_plan(tmp_path))
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV, NUM_SLICES="2")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert len(cmds) == 3
    for c in cmds:
        assert "--cluster=gke1" in c and "--tpu-type=v5p-8" in c and "--num-slices=2" in c
        assert shlex.split(_option(c, "--command").split("python3 -m sora_jax.cli", 1)[1])[4:] == args
    workloads = _workloads(r)
    assert [p for _, p in workloads] == NAMES
    assert [w for w, _ in workloads] == ["sweep-a-1-c1-6e13-n5-2m", "sweep-a-1-c1-6e13-n12m",
                                         "sweep-a-1-lr-mup-w64-lr1-6e-2"]  # prefix: the work folder's name
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV, WORKLOAD_PREFIX="s7", POINTS="kind:isoflop")
    assert _workloads(r) == [("s7-c1-6e13-n5-2m", NAMES[0]), ("s7-c1-6e13-n12m", NAMES[1])]
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV, POINTS="C1.6e13-N12M")
    assert [p for _, p in _workloads(r)] == [NAMES[1]]
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV, WORKLOAD_PREFIX="Bad_Prefix")
    assert r.returncode == 2 and "WORKLOAD_PREFIX" in r.stderr
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, TPU_TYPE="v5p-8")
    assert r.returncode == 2 and "xpk.sh: set CLUSTER" in r.stderr and not _commands(r.stdout)


def test_xpk_names_long_or_clashing_points_with_a_stable_hash(tmp_path):
    names = ["C1.6e13-N5.2M", "C1.6e13+N5.2M", "LR-mup-w1024-lr1.6e-2-" + "X" * 40, "LR-mup-w1024-lr1.6e-2-" + "Y" * 40,
             "Short"]
    args = _args(_plan(tmp_path, [{"name": n, "kind": "isoflop"} for n in names],
                       folder="A-Very-Long-Sweep-Folder-Name-2025"))
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV)
    assert r.returncode == 0, r.stderr
    workloads = _workloads(r)
    assert [p for _, p in workloads] == names
    got = [w for w, _ in workloads]
    assert len(set(got)) == len(names)
    for w in got:
        assert WORKLOAD.match(w) and len(w) <= 40, w
    assert got[-1] == "a-very-long-sweep-fo-short"  # 20-character prefix, no hash needed
    assert all(re.search(r"-[0-9a-f]{6}$", w) for w in got[:4])  # '.' and '+' clash; too long
    # stable: the same names for one point on its own
    r = _bash("sweep_xpk.sh", ["--dry-run", *args], tmp_path, **XPK_ENV, POINTS=names[1])
    assert _workloads(r) == [(got[1], names[1])]
