#!/usr/bin/env bash
# launch/sweep_slurm.sh: submit the points of a planned scaling-law sweep as one SLURM job array.
#
# Usage (from the repository root, e.g. on a login node):
#   launch/sweep_slurm.sh [--dry-run] [--] --config CFG --workdir W [SWEEP_ARGS...]
#
# Example (after `sora-jax sweep plan --config configs/sweep_cpu.py --workdir /shared/sweeps/s1`):
#   VENV=$PWD/.venv MAX_PARALLEL=4 SBATCH_ARGS="--partition=gpu --gpus-per-node=1" \
#     launch/sweep_slurm.sh --config configs/sweep_cpu.py --workdir /shared/sweeps/s1
#
# Reads W/plan.json (python3, standard library only: nothing to install here) and runs one
# `sbatch --array=INDICES%MAX_PARALLEL ... launch/sweep_point.sbatch ARGS...`, one array task
# per point: task i runs point i of the plan, `sora-jax sweep run --point NAME ARGS...`, on one
# node (launch/sweep_point.sbatch; its #SBATCH lines are the defaults, SBATCH_ARGS overrides
# them). INDICES are the points' indices in plan.json (0-(N-1) for all of them); each task's log
# is slurm-<job name>-<array job id>_<index>.out in the folder sbatch was run from. Submitting
# again is safe: `sweep run` skips finished points and resumes interrupted ones from their
# checkpoints. The tasks inherit this environment (VENV, SORA_JAX, SRUN_ARGS: see
# sweep_point.sbatch) and check that plan.json has not changed since submission. W must be a
# file system the compute nodes see. SLURM's MaxArraySize (often 1001) caps the largest index.
#
# Options:
#   --dry-run   print the point table and the sbatch command instead of submitting (needs no SLURM)
#   -h, --help  this text
#
# Environment:
#   POINTS        which points (default: all): a comma list of point names and kind:KIND items,
#                 e.g. "kind:isoflop" or "C1e12-N63K,LR-mup-w64-lr1.6e-2"
#   MAX_PARALLEL  at most this many tasks running at once (default: all of them)
#   SBATCH_ARGS   extra sbatch flags, split on spaces (e.g. "--partition=gpu --account=proj")
#   PLAN          the plan file (default: W/plan.json)
#   PYTHON        python interpreter that reads the plan (default: python3)
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # prog, usage, die, q, sq
here=$(cd "$(dirname "$0")" && pwd)

dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $dry_run -eq 0 ]] && ! command -v sbatch >/dev/null 2>&1; then
  die "'sbatch' not found: run this on a SLURM login node (or use --dry-run)"
fi

# "#plan<tab>PATH<tab>SHA256", then "INDEX<tab>NAME" per selected point (exit 2 and a message
# when there is no plan, POINTS names an unknown point or kind, ...)
table=$(SWEEP_LAUNCHER=$prog "$BASH" "$here/sweep_point.sbatch" --list -- "$@")
indices=()
names=()
sha=""
while IFS=$'\t' read -r idx rest sum; do
  if [[ "$idx" == "#plan" ]]; then
    sha=$sum
  else
    indices+=("$idx")
    names+=("$rest")
  fi
done <<<"$table"
n=${#indices[@]}
[[ $n -gt 0 && -n "$sha" ]] || die "no points selected"  # sweep_point.sbatch --list said why
max_parallel=${MAX_PARALLEL:-$n}
[[ "$max_parallel" =~ ^[1-9][0-9]*$ ]] || die "MAX_PARALLEL must be a positive integer, got '$max_parallel'"

# 0 1 2 5 7 8 -> 0-2,5,7-8
array=""
start=${indices[0]}
end=$start
for idx in "${indices[@]:1}" ""; do
  if [[ -n "$idx" && $idx -eq $((end + 1)) ]]; then
    end=$idx
    continue
  fi
  if [[ $start -eq $end ]]; then array+=",$start"; else array+=",$start-$end"; fi
  start=$idx
  end=$idx
done
array=${array#,}

cmd=(sbatch --array="$array%$max_parallel" --export="ALL,SWEEP_PLAN_SHA256=$sha")
if [[ -n "${SBATCH_ARGS:-}" ]]; then
  read -r -a extra_args <<<"$SBATCH_ARGS"
  cmd+=("${extra_args[@]}")
fi
cmd+=("$here/sweep_point.sbatch" "$@")

echo "$prog: $n point(s), array index -> point:"
for ((i = 0; i < n; i++)); do
  printf '%6s  %s\n' "${indices[i]}" "${names[i]}"
done
if [[ $dry_run -eq 1 ]]; then
  printf '+'
  for a in "${cmd[@]}"; do
    printf ' %s' "$(sq "$a")"
  done
  printf '\n'
  exit 0
fi
"${cmd[@]}"
