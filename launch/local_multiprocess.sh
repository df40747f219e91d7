#!/usr/bin/env bash
# launch/local_multiprocess.sh: N processes of one JAX job on this machine, on CPU.
#
# Usage:
#   launch/local_multiprocess.sh N [sora-jax arguments...]
#   launch/local_multiprocess.sh N -- COMMAND [ARGS...]      (any program, e.g. python worker.py)
#
# Examples:
#   launch/local_multiprocess.sh 2 train-dit --config configs/tiny.py --workdir runs/tiny2
#   DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh 2 quickstart --config configs/tiny.py
#   launch/local_multiprocess.sh 2 -- python tests/distributed_worker.py /tmp/out.json
#
# Process i gets JAX_PLATFORMS=cpu, SORA_JAX_COORDINATOR=127.0.0.1:PORT,
# SORA_JAX_NUM_PROCESSES=N and SORA_JAX_PROCESS_ID=i; sora_jax.parallel.distributed.resolve()
# reads them, so the processes find each other through jax.distributed (gloo collectives).
# stdout and stderr of process i go to $LOGDIR/proc_i.log. The script waits for all of them and
# exits with the first failure's status, after stopping the others; 0 when all succeed.
#
# Environment:
#   LOGDIR               folder for proc_i.log (default: a new folder under ${TMPDIR:-/tmp})
#   PORT                 coordinator port (default: a free port on 127.0.0.1)
#   DEVICES_PER_PROCESS  CPU devices per process: sets
#                        XLA_FLAGS=--xla_force_host_platform_device_count=K in each process,
#                        replacing any device count already in XLA_FLAGS (default: unchanged)
#   SORA_JAX             the sora-jax program (default: sora-jax on PATH, else
#                        "$PYTHON -m sora_jax.cli")
#   PYTHON               python interpreter (default: python3)
#   GRACE_SECONDS        how long stopped processes get before SIGKILL (default: 5)
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # prog, usage, die, q, sq

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help)
    usage
    exit 0
    ;;
esac

n=$1
shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"

python=${PYTHON:-python3}
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
  [[ $# -gt 0 ]] || die "no command after --"
  cmd=("$@")
else
  [[ $# -gt 0 ]] || die "no sora-jax arguments (try: $prog $n quickstart --config configs/tiny.py)"
  if [[ -n "${SORA_JAX:-}" ]]; then
    read -r -a cmd <<<"$SORA_JAX"
  elif command -v sora-jax >/dev/null 2>&1; then
    cmd=(sora-jax)
  else
    cmd=("$python" -m sora_jax.cli)
  fi
  cmd+=("$@")
fi

devices=${DEVICES_PER_PROCESS:-}
xla_flags=${XLA_FLAGS:-}
if [[ -n "$devices" ]]; then
  [[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive integer, got '$devices'"
  # drop an inherited device count: the children set their own
  xla_flags=$(printf '%s\n' "$xla_flags" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')
  xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"
  xla_flags=$(printf '%s\n' "$xla_flags" | sed -E 's/^ +//; s/ +/ /g')
fi

port=${PORT:-}
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"

logdir=${LOGDIR:-}
if [[ -z "$logdir" ]]; then
  logdir=$(mktemp -d "${TMPDIR:-/tmp}/sora-jax-local.XXXXXX")
fi
mkdir -p "$logdir"
grace=${GRACE_SECONDS:-5}

echo "$prog: $n processes, coordinator 127.0.0.1:$port, logs in $logdir/proc_<i>.log" >&2
echo "$prog: command: ${cmd[*]}" >&2

pids=()
stop_all() {  # stop the processes (and their children) that still run
  local pid alive=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      alive+=("$pid")
    fi
  done
  [[ ${#alive[@]} -gt 0 ]] || return 0
  local waited=0
  while [[ $waited -lt $((grace * 10)) ]]; do
    local any=0
    for pid in "${alive[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then any=1; fi
    done
    [[ $any -eq 1 ]] || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${alive[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set -m  # each process in its own process group, so stopping it reaches its subprocesses too
for ((i = 0; i < n; i++)); do
  env -u SORA_JAX_DISTRIBUTED -u SORA_JAX_LOCAL_DEVICE_IDS \
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="$xla_flags" \
    SORA_JAX_COORDINATOR="127.0.0.1:$port" \
    SORA_JAX_NUM_PROCESSES="$n" \
    SORA_JAX_PROCESS_ID="$i" \
    "${cmd[@]}" >"$logdir/proc_$i.log" 2>&1 </dev/null &
  pids+=("$!")
done
set +m

# wait for all; on the first failure stop the others
finished=()
remaining=$n
status=0
while [[ $remaining -gt 0 ]]; do
  progressed=0
  for i in "${!pids[@]}"; do
    [[ -z "${finished[$i]:-}" ]] || continue
    pid=${pids[$i]}
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      finished[i]=1
      remaining=$((remaining - 1))
      progressed=1
      if [[ $rc -ne 0 ]]; then
        echo "$prog: process $i failed (exit $rc); stopping the others. Last lines of $logdir/proc_$i.log:" >&2
        tail -n 30 "$logdir/proc_$i.log" >&2 || true
        status=$rc
        stop_all
        for j in "${!pids[@]}"; do
          [[ -n "${finished[$j]:-}" ]] || wait "${pids[$j]}" 2>/dev/null || true
        done
        remaining=0
        break
      fi
    fi
  done
  [[ $progressed -eq 1 ]] || sleep 0.2
done

if [[ $status -eq 0 ]]; then
  echo "$prog: all $n processes finished OK; logs in $logdir" >&2
fi
exit "$status"
