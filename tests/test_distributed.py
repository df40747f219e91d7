"""Multi-host initialisation (sora_jax.parallel.distributed) and the launchers under launch/."""

import json
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from sora_jax.parallel import distributed
from sora_jax.parallel.distributed import (
    SINGLE,
    DistributedSpec,
    first_slurm_host,
    resolve,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
OURS = {"SORA_JAX_COORDINATOR": "10.0.0.1:1234", "SORA_JAX_NUM_PROCESSES": "4",
        "SORA_JAX_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_STEP_NUM_NODES": "4",
         "SLURM_JOB_NODELIST": "gpu[07-10]"}
FLAGS = {"coordinator_address": "host0:99", "num_processes": 2, "process_id": 1}


# ----------------------------------------------------------------------------- resolve: sources

def test_nothing_set_is_a_single_process():
    spec = resolve(None, {})
    assert spec == SINGLE and spec.source == "single" and not spec.is_multi_process
    assert resolve({"coordinator_address": None, "num_processes": None, "process_id": None}, {}) == SINGLE


def test_flags_win_over_every_environment_source():
    env = {**OURS, **SLURM, "TPU_WORKER_ID": "0"}
    assert resolve(FLAGS, env) == DistributedSpec("host0:99", 2, 1, None, "flags")
    spec = resolve({"coordinator_address": "[::1]:5", "num_processes": "3", "process_id": " 0 "}, {})
    assert spec == DistributedSpec("[::1]:5", 3, 0, None, "flags") and spec.is_multi_process


def test_our_variables_win_over_slurm_and_tpu():
    spec = resolve({}, {**OURS, **SLURM, "MEGASCALE_COORDINATOR_ADDRESS": "x"})
    assert spec == DistributedSpec("10.0.0.1:1234", 4, 3, None, "env:SORA_JAX")
    spec = resolve({}, {**OURS, "SORA_JAX_LOCAL_DEVICE_IDS": "0, 2"})
    assert spec.local_device_ids == (0, 2)
    assert resolve({"local_device_ids": [1]}, {**OURS, "SORA_JAX_LOCAL_DEVICE_IDS": "0,2"}).local_device_ids == (1,)


def test_empty_variables_count_as_unset():
    assert resolve({}, {"SORA_JAX_COORDINATOR": "", "SORA_JAX_NUM_PROCESSES": " ",
                        "SORA_JAX_PROCESS_ID": "", "SLURM_PROCID": ""}) == SINGLE


def test_one_process_of_a_multi_process_job_via_flags_is_not_initialised():
    spec = resolve({"coordinator_address": "h:1", "num_processes": 1, "process_id": 0}, {})
    assert spec.num_processes == 1 and not spec.is_multi_process


def test_slurm_one_task_per_node_sees_all_its_gpus():
    spec = resolve({}, SLURM)
    assert spec == DistributedSpec("gpu07:8476", 4, 2, None, "slurm")
    assert resolve({}, {**SLURM, "SORA_JAX_COORDINATOR_PORT": "31000"}).coordinator_address == "gpu07:31000"
    no_step = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
    no_step["SLURM_JOB_NODELIST"] = "login3,gpu[01-02]"
    assert resolve({}, no_step).coordinator_address == "login3:8476"


def test_slurm_one_task_per_gpu_uses_the_local_id():
    env = {**SLURM, "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-2]"}
    assert resolve({}, env) == DistributedSpec("n1:8476", 16, 11, (3,), "slurm")
    assert resolve({}, {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}).local_device_ids == (3,)
    # --gpus-per-task=1: SLURM already bound one GPU to the task
    assert resolve({}, {**env, "CUDA_VISIBLE_DEVICES": "3"}).local_device_ids is None
    # a local id > 0 means several tasks per node even when the node count is unknown
    env.pop("SLURM_STEP_NUM_NODES")
    assert resolve({}, env).local_device_ids == (3,)
    assert resolve({}, {**env, "SORA_JAX_LOCAL_DEVICE_IDS": "6,7"}).local_device_ids == (6, 7)


def test_slurm_single_task_and_salloc_shell_are_one_process():
    spec = resolve({}, {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert spec.source == "slurm" and spec.num_processes == 1 and not spec.is_multi_process
    assert resolve({}, {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8"}) == SINGLE  # salloc shell, no srun


@pytest.mark.parametrize("var", distributed.TPU_ENV_VARS)
def test_tpu_environment_lets_jax_detect_the_rest(var):
    spec = resolve({}, {var: "1"})
    assert spec == DistributedSpec(None, None, None, None, "tpu") and spec.is_multi_process
    assert resolve({}, {var: "1", **SLURM}).source == "slurm"


def test_sora_jax_distributed_forces_auto_detection_or_a_single_process():
    assert resolve({}, {"SORA_JAX_DISTRIBUTED": "auto"}).source == "tpu"
    assert resolve({}, {"SORA_JAX_DISTRIBUTED": "OFF", **SLURM, "TPU_WORKER_ID": "1"}) == SINGLE
    assert resolve(FLAGS, {"SORA_JAX_DISTRIBUTED": "off"}).source == "flags"


def test_resolve_reads_os_environ_by_default(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SORA_JAX", "SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU")):
            monkeypatch.delenv(k)
    for k, v in OURS.items():
        monkeypatch.setenv(k, v)
    assert resolve().source == "env:SORA_JAX"


# ----------------------------------------------------------------------------- resolve: errors

@pytest.mark.parametrize("missing", ["coordinator_address", "num_processes", "process_id"])
def test_partial_flags_name_the_missing_flag(missing):
    flags = {k: v for k, v in FLAGS.items() if k != missing}
    with pytest.raises(ValueError, match=distributed.FLAG_NAMES[missing]):
        resolve(flags, {})


@pytest.mark.parametrize("missing", sorted(OURS))
def test_partial_variables_name_the_missing_variable(missing):
    env = {k: v for k, v in OURS.items() if k != missing}
    with pytest.raises(ValueError, match=f"{missing} missing"):
        resolve({}, env)


@pytest.mark.parametrize("flags,env,message", [
    ({**FLAGS, "process_id": 2}, {}, "--process-id=2 must be < --num-processes=2"),
    ({**FLAGS, "num_processes": "two"}, {}, "--num-processes must be an integer"),
    ({**FLAGS, "num_processes": 0}, {}, "--num-processes must be >= 1"),
    ({**FLAGS, "process_id": -1}, {}, "--process-id must be >= 0"),
    ({**FLAGS, "process_id": 1.0}, {}, "--process-id must be an integer"),
    ({**FLAGS, "coordinator_address": "host0"}, {}, "--coordinator-address must look like host:port"),
    ({**FLAGS, "coordinator_address": "host0:http"}, {}, r"--coordinator-address \(port\) must be an integer"),
    ({**FLAGS, "coordinator_address": "host0:70000"}, {}, "port in"),
    ({**FLAGS, "coordinator_address": ":80"}, {}, "host:port"),
    ({**FLAGS, "coordinator_address": "::1"}, {}, "host:port"),
    ({**FLAGS, "tpu": True}, {}, "unknown distributed flags"),
    ({}, {**OURS, "SORA_JAX_PROCESS_ID": "4"}, "SORA_JAX_PROCESS_ID=4 must be < SORA_JAX_NUM_PROCESSES=4"),
    ({}, {**OURS, "SORA_JAX_NUM_PROCESSES": "4.0"}, "SORA_JAX_NUM_PROCESSES must be an integer"),
    ({}, {**OURS, "SORA_JAX_LOCAL_DEVICE_IDS": "0,,1"}, "SORA_JAX_LOCAL_DEVICE_IDS must be a comma"),
    ({}, {**OURS, "SORA_JAX_LOCAL_DEVICE_IDS": "0,a"}, "SORA_JAX_LOCAL_DEVICE_IDS must be an integer"),
    ({}, {**OURS, "SORA_JAX_LOCAL_DEVICE_IDS": "1,1"}, "repeats"),
    ({}, {"SORA_JAX_LOCAL_DEVICE_IDS": "0"}, "SORA_JAX_LOCAL_DEVICE_IDS is set but no multi-process"),
    ({}, {"SORA_JAX_DISTRIBUTED": "yes"}, "SORA_JAX_DISTRIBUTED must be 'auto' or 'off'"),
    ({}, {**OURS, "SORA_JAX_DISTRIBUTED": "auto"}, "SORA_JAX_DISTRIBUTED=auto contradicts"),
    ({}, {"SORA_JAX_DISTRIBUTED": "off", "SORA_JAX_LOCAL_DEVICE_IDS": "1"}, "SORA_JAX_DISTRIBUTED=off"),
    ({}, {"SLURM_PROCID": "0"}, "SLURM_NTASKS is missing"),
    ({}, {**SLURM, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 must be < SLURM_NTASKS=4"),
    ({}, {**SLURM, "SLURM_NTASKS": "four"}, "SLURM_NTASKS must be an integer"),
    ({}, {k: v for k, v in SLURM.items() if "NODELIST" not in k}, "SLURM_STEP_NODELIST and SLURM_JOB_NODELIST"),
    ({}, {**SLURM, "SLURM_STEP_NODELIST": "gpu[07-10"}, "SLURM_STEP_NODELIST: .*unbalanced"),
    ({}, {**SLURM, "SORA_JAX_COORDINATOR_PORT": "0"}, "SORA_JAX_COORDINATOR_PORT must be >= 1"),
    ({}, {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SORA_JAX_LOCAL_DEVICE_IDS": "0"},
     "SLURM_NTASKS=1"),
])
def test_contradictory_or_malformed_settings_name_the_culprit(flags, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(flags, env)


# ----------------------------------------------------------------------------- SLURM node lists

@pytest.mark.parametrize("nodelist,first", [
    ("node01", "node01"),
    ("node[01-04,07],gpu5", "node01"),
    ("gpu5,node[01-04,07]", "gpu5"),
    ("node[007,010-015]", "node007"),
    ("node[10-12]", "node10"),
    ("node[9]", "node9"),
    ("rack[1-2]-node[03-04],x", "rack1-node03"),
    ("a-b-c,d", "a-b-c"),
    ("gpu-[3-5]-ib", "gpu-3-ib"),
    ("  node1 ", "node1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", ",node1", "node[01-04", "node01]", "node[]", "node[,3]"])
def test_malformed_slurm_node_lists_raise(nodelist):
    with pytest.raises(ValueError):
        first_slurm_host(nodelist)


# ----------------------------------------------------------------------------- initialize

@pytest.fixture
def fresh(monkeypatch):
    """No spec in force, and jax.distributed.initialize replaced by a recorder."""
    import jax

    calls = []
    monkeypatch.setattr(distributed, "_active", None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_initialize_single_process_is_a_no_op(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="sora_jax.parallel.distributed"):
        assert distributed.initialize(SINGLE) == SINGLE
        assert distributed.initialize(SINGLE) == SINGLE
    assert fresh == [] and distributed.active_spec() == SINGLE and distributed.is_main_process()
    import jax

    assert [r.getMessage() for r in caplog.records if "distributed:" in r.getMessage()] == [
        ("distributed: single process source=single coordinator=None local_device_ids=None processes=1 "
         f"devices={jax.device_count()} local_devices={jax.local_device_count()}")]


def test_initialize_passes_our_spec_to_jax_once(fresh, caplog):
    spec = DistributedSpec("h:1", 2, 1, (0, 1), "slurm")
    with caplog.at_level(logging.WARNING, logger="sora_jax.parallel.distributed"):
        assert distributed.initialize(spec) == spec
        assert distributed.initialize(spec) == spec  # idempotent
        assert distributed.initialize(SINGLE) == spec  # a later, different spec is ignored ...
    assert fresh == [((), {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
                           "local_device_ids": [0, 1], "cluster_detection_method": "deactivate"})]
    assert "ignoring" in caplog.text  # ... and said so


def test_initialize_on_tpu_lets_jax_detect_and_fills_in_the_counts(fresh):
    spec = distributed.initialize(resolve({}, {"TPU_WORKER_ID": "0"}))
    assert fresh == [((), {})]
    assert spec == DistributedSpec(None, 1, 0, None, "tpu")  # this test process: 1 process


def test_initialize_after_jax_started_says_what_to_do(fresh, monkeypatch):
    import jax

    def fail(**kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(RuntimeError, match="initialise before any other JAX call"):
        distributed.initialize(DistributedSpec("h:1", 2, 0, None, "flags"))
    assert distributed.active_spec() is None


# ----------------------------------------------------------------------------- CLI flags

def test_cli_has_distributed_flags_on_jax_subcommands_only():
    from sora_jax import cli

    p = cli._parser(cli._tools())
    for cmd in ("train-vae", "train-dit", "evaluate-vae", "evaluate", "quickstart"):
        a = p.parse_args([cmd, "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "1"])
        assert (a.coordinator_address, a.num_processes, a.process_id) == ("h:1", 2, 1)
    a = p.parse_args(["generate", "--prompt", "x", "--num-processes", "2"])
    assert a.num_processes == 2 and a.process_id is None
    with pytest.raises(SystemExit):
        p.parse_args(["prepare-data", "--num-processes", "2"])


def test_cli_rejects_partial_flags_before_any_work(capsys):
    from sora_jax.cli import run

    assert run(["evaluate", "--num-processes", "2", "--process-id", "0", "--config", "/nonexistent.py"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator-address missing" in err and "config file" not in err


def test_cli_initialises_first_and_quietens_other_processes(monkeypatch, capsys):
    from sora_jax.cli import run

    seen = []
    monkeypatch.setattr(distributed, "initialize", lambda spec: seen.append(spec) or spec)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    root = logging.getLogger()
    level = root.level
    try:
        code = run(["train-dit", "--coordinator-address", "h:7", "--num-processes", "2",
                    "--process-id", "1", "--config", "/nonexistent.py"])
        assert root.level == logging.WARNING
    finally:
        root.setLevel(level)
    assert code == 2 and "config file not found" in capsys.readouterr().err  # ran after initialize
    assert seen == [DistributedSpec("h:7", 2, 1, None, "flags")]


# ----------------------------------------------------------------------------- launchers: dry runs

def _no_cloud_path(tmp_path) -> str:
    """A PATH with the few tools the launchers use, and no gcloud, xpk, srun or sbatch."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        for tool in ("basename", "dirname", "sed", "tr", "date", "cat", "git", "mktemp"):
            found = shutil.which(tool)
            if found:
                (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _bash(script, args, env, tmp_path):
    env = {"PATH": _no_cloud_path(tmp_path), "HOME": str(tmp_path), **env}
    return subprocess.run(["/bin/bash", str(LAUNCH / script), *args], env=env, cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    lines = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line) for line in lines]


def _option(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


SORA_ARGS = ["train-dit", "--config", "configs/quickstart.py", "--workdir", "/mnt/my runs",
             "--config.name=it's"]


def test_tpu_pod_dry_run_prints_setup_and_run_on_every_worker(tmp_path):
    env = {"TPU_NAME": "my-v5p", "ZONE": "us-east5-a", "PROJECT": "proj"}
    r = _bash("tpu_pod.sh", ["--dry-run", *SORA_ARGS], env, tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert [c[:5] for c in cmds] == [["git", "-C", str(REPO), "archive", "--format=tar.gz"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    for c in cmds[1:]:
        assert "--worker=all" in c and "--zone=us-east5-a" in c and "--project=proj" in c
    assert "pip install" in _option(cmds[2], "--command")
    remote = _option(cmds[3], "--command")
    assert "export SORA_JAX_DISTRIBUTED=auto" in remote
    tail = shlex.split(remote.split("python3 -m sora_jax.cli", 1)[1])
    assert tail == SORA_ARGS  # every argument survives the two shells


def test_tpu_pod_dry_run_with_a_git_repository_and_no_setup(tmp_path):
    env = {"TPU_NAME": "t", "ZONE": "z", "REPO_URL": "https://example.com/sora-jax.git", "REPO_REF": "v1"}
    cmds = _commands(_bash("tpu_pod.sh", ["--dry-run", "--setup-only"], env, tmp_path).stdout)
    assert len(cmds) == 1 and "git clone https://example.com/sora-jax.git" in _option(cmds[0], "--command")
    assert "checkout v1" in _option(cmds[0], "--command") and "--project" not in " ".join(cmds[0])
    cmds = _commands(_bash("tpu_pod.sh", ["--dry-run", "--no-setup", "evaluate"], env, tmp_path).stdout)
    assert len(cmds) == 1 and _option(cmds[0], "--command").endswith("python3 -m sora_jax.cli evaluate")


def test_tpu_pod_needs_its_variables_and_gcloud_outside_dry_run(tmp_path):
    r = _bash("tpu_pod.sh", ["--dry-run", "evaluate"], {"ZONE": "z"}, tmp_path)
    assert r.returncode == 2 and "TPU_NAME" in r.stderr
    r = _bash("tpu_pod.sh", ["evaluate"], {"TPU_NAME": "t", "ZONE": "z"}, tmp_path)
    assert r.returncode == 2 and "'gcloud' not found" in r.stderr and r.stdout == ""
    r = _bash("tpu_pod.sh", ["--help"], {}, tmp_path)
    assert r.returncode == 0 and "TPU_NAME" in r.stdout and "--dry-run" in r.stdout


def test_xpk_dry_run_prints_the_workload(tmp_path):
    env = {"CLUSTER": "gke1", "TPU_TYPE": "v5p-128", "NUM_SLICES": "2", "WORKLOAD": "sora-1",
           "ZONE": "us-east5-a", "XPK_ARGS": "--priority=high"}
    r = _bash("xpk.sh", ["--dry-run", *SORA_ARGS], env, tmp_path)
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    assert cmd[:3] == ["xpk", "workload", "create"]
    for flag in ("--cluster=gke1", "--workload=sora-1", "--tpu-type=v5p-128", "--num-slices=2",
                 "--zone=us-east5-a", "--priority=high", f"--script-dir={REPO}",
                 "--base-docker-image=python:3.11"):
        assert flag in cmd
    command = _option(cmd, "--command")
    assert "export SORA_JAX_DISTRIBUTED=auto" in command and "pip install" in command
    assert shlex.split(command.split("python3 -m sora_jax.cli", 1)[1]) == SORA_ARGS
    (cmd,) = _commands(_bash("xpk.sh", ["--dry-run", "evaluate"],
                             {**env, "DOCKER_IMAGE": "gcr.io/p/sora:1"}, tmp_path).stdout)
    assert "--docker-image=gcr.io/p/sora:1" in cmd and "pip install" not in _option(cmd, "--command")


def test_xpk_checks_its_variables(tmp_path):
    r = _bash("xpk.sh", ["--dry-run", "evaluate"], {"TPU_TYPE": "v5p-8"}, tmp_path)
    assert r.returncode == 2 and "CLUSTER" in r.stderr
    r = _bash("xpk.sh", ["--dry-run", "evaluate"], {"CLUSTER": "c", "TPU_TYPE": "t", "WORKLOAD": "Bad_Name"},
              tmp_path)
    assert r.returncode == 2 and "WORKLOAD" in r.stderr
    r = _bash("xpk.sh", ["evaluate"], {"CLUSTER": "c", "TPU_TYPE": "t"}, tmp_path)
    assert r.returncode == 2 and "'xpk' not found" in r.stderr


def test_slurm_dry_run_prints_srun(tmp_path):
    env = {"SLURM_JOB_ID": "12345", "SRUN_ARGS": "--cpu-bind=none"}
    r = _bash("slurm.sbatch", ["--dry-run", *SORA_ARGS], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "SORA_JAX_COORDINATOR_PORT=32345" in r.stdout  # 20000 + 12345 % 40000
    (cmd,) = _commands(r.stdout)
    assert cmd == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "sora-jax", *SORA_ARGS]
    header = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=" in header
    r = _bash("slurm.sbatch", ["--help"], {}, tmp_path)
    assert r.returncode == 0 and "SLURM_PROCID" in r.stdout and "#SBATCH --nodes" not in r.stdout


# ----------------------------------------------------------------------------- real processes

def _local(n, args, tmp_path, devices=None, timeout=120):
    env = dict(os.environ, LOGDIR=str(tmp_path / "logs"), PYTHON=sys.executable,
               SORA_JAX=f"{sys.executable} -m sora_jax.cli", GRACE_SECONDS="2")
    env.pop("XLA_FLAGS", None)  # the children set their own device count
    if devices:
        env["DEVICES_PER_PROCESS"] = str(devices)
    return subprocess.run(["/bin/bash", str(LAUNCH / "local_multiprocess.sh"), str(n), *args], env=env,
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=timeout)


def test_two_local_processes_run_collectives(tmp_path):
    out = tmp_path / "result.json"
    r = _local(2, ["--", sys.executable, "tests/distributed_worker.py", str(out)], tmp_path, devices=2)
    assert r.returncode == 0, r.stderr + "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    res = json.loads(out.read_text())
    assert res["ids"] == [0, 1]  # allgather of each process's id
    assert res["total"] == [6.0, 6.0]  # rows 1, 1 (process 0) + 2, 2 (process 1), summed by a jitted psum
    assert (res["process_count"], res["device_count"], res["local_device_count"]) == (2, 4, 2)
    assert res["source"] == "env:SORA_JAX" and res["same_spec"] and res["main_is_0"]
    logs = [(tmp_path / "logs" / f"proc_{i}.log").read_text() for i in range(2)]
    assert logs[0].count("distributed: multi-process source=env:SORA_JAX") == 1  # one logger
    assert "processes=2 devices=4 local_devices=2" in logs[0]
    assert "distributed: multi-process" not in logs[1]


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    out = tmp_path / "result.json"
    r = _local(2, ["--", sys.executable, "tests/distributed_worker.py", str(out), "fail-1"], tmp_path,
               timeout=60)  # process 0 would sleep 600 s unless stopped
    assert r.returncode == 3 and "process 1 failed (exit 3)" in r.stderr
    assert not out.exists()


def test_local_launcher_runs_the_cli_in_every_process(tmp_path):
    """Both processes join through the CLI's initialisation (process 0's needs process 1), then
    fail on a missing config. A failed process exits at once, so the launcher may stop process 1
    before it reports its own error."""
    r = _local(2, ["evaluate", "--config", "/nonexistent.py", "--no-progress"], tmp_path)
    assert r.returncode == 2, r.stderr
    logs = [(tmp_path / "logs" / f"proc_{i}.log").read_text() for i in range(2)]
    assert "processes=2" in logs[0] and "distributed:" not in logs[1]
    assert "config file not found: /nonexistent.py" in logs[0]


def test_local_launcher_checks_its_arguments(tmp_path):
    for args, message in ([["0", "evaluate"], "positive integer"], [["2"], "no sora-jax arguments"],
                          [["2", "--"], "no command after --"]):
        r = subprocess.run(["/bin/bash", str(LAUNCH / "local_multiprocess.sh"), *args], cwd=REPO,
                           check=False, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = subprocess.run(["/bin/bash", str(LAUNCH / "local_multiprocess.sh"), "--help"], cwd=REPO,
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "DEVICES_PER_PROCESS" in r.stdout


# ----------------------------------------------------------------------------- script hygiene

SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "xpk.sh", "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launchers_parse_and_are_strict(script):
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text and "--help" in text
    r = subprocess.run(["/bin/bash", "-n", str(LAUNCH / script)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launchers_pass_shellcheck():
    r = subprocess.run(["shellcheck", "-x", "-s", "bash", *(str(LAUNCH / s) for s in SCRIPTS)], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
