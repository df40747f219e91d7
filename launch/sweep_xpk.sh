#!/usr/bin/env bash
# launch/sweep_xpk.sh: submit the points of a planned scaling-law sweep as XPK workloads, one per point.
#
# Usage:
#   CLUSTER=NAME TPU_TYPE=TYPE launch/sweep_xpk.sh [--dry-run] [--] --config CFG --workdir W [SWEEP_ARGS...]
#
# Example (after `sora-jax sweep plan --config configs/sweep_cpu.py --workdir /gcs/bucket/sweeps/s1`):
#   CLUSTER=my-gke ZONE=us-east5-a PROJECT=my-project TPU_TYPE=v5p-8 POINTS=kind:isoflop \
#     launch/sweep_xpk.sh --config configs/sweep_cpu.py --workdir /gcs/bucket/sweeps/s1
#
# Reads W/plan.json (python3, standard library only; set PLAN to a local copy when W is only
# mounted in the pods) and runs launch/xpk.sh once per point, with WORKLOAD=PREFIX-POINT and
# the command `sweep run --point NAME SWEEP_ARGS...`; xpk.sh's variables (CLUSTER, TPU_TYPE,
# NUM_SLICES, DOCKER_IMAGE, XPK_ARGS, ...) apply to every point. POINT is the point's name in
# lower case with '.' and '+' made '-'. A name that would be longer than 40 characters (XPK's
# limit) or shared by two points of the plan is cut to 33 characters and ends in '-' and 6 hex
# digits of the sha256 of the point's name: the same plan and prefix give the same names, so
# xpk refuses a second workload for a point that still has one. `sweep run` skips finished
# points and resumes interrupted ones from their checkpoints. A failed submission does not stop
# the others (the exit status is then 1), except an xpk.sh usage error (status 2).
#
# Options:
#   --dry-run   print the xpk commands instead of running them (passed to xpk.sh; needs no xpk)
#   -h, --help  this text
#
# Environment:
#   POINTS           which points (default: all): a comma list of point names and kind:KIND
#                    items, e.g. "kind:isoflop" or "C1e12-N63K,LR-mup-w64-lr1.6e-2"
#   WORKLOAD_PREFIX  start of every workload name: lower-case letters, digits and '-', at most
#                    24 characters (default: the plan's folder name, made so, cut to 20)
#   PLAN             the plan file (default: W/plan.json)
#   PYTHON           python interpreter that reads the plan (default: python3)
#   CLUSTER, TPU_TYPE (required), NUM_SLICES, PROJECT, ZONE, DOCKER_IMAGE, ...: see launch/xpk.sh
#                    (WORKLOAD is set per point)
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

# "#plan<tab>PATH<tab>SHA256", then "INDEX<tab>NAME" per selected point (exit 2 and a message
# when there is no plan, POINTS names an unknown point or kind, ...)
table=$(SWEEP_LAUNCHER=$prog "$BASH" "$here/sweep_point.sbatch" --list -- "$@")

# "INDEX<tab>WORKLOAD<tab>NAME" per selected point
workloads=$("${PYTHON:-python3}" - "$prog" "${WORKLOAD_PREFIX:-}" "$table" <<'EOF'
import hashlib, json, os, re, sys

prog, prefix, table = sys.argv[1:4]
VALID = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def fail(msg):
    print(f"{prog}: {msg}", file=sys.stderr)
    sys.exit(2)


lines = table.splitlines()
path = lines[0].split("\t")[1]
rows = [line.split("\t", 1) for line in lines[1:]]
if prefix:
    if not VALID.match(prefix) or len(prefix) > 24:
        fail(f"WORKLOAD_PREFIX must be lower-case letters, digits and '-', start with a letter and "
             f"have at most 24 characters: {prefix!r}")
else:
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    prefix = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
    if not prefix[:1].isalpha():
        prefix = ("sweep-" + prefix).strip("-")
    prefix = prefix[:20].rstrip("-")


def base(name):
    return name.lower().replace(".", "-").replace("+", "-")


with open(path) as f:
    every = [p["name"] for p in json.load(f)["points"]]
shared = {b for b in map(base, every) if [base(n) for n in every].count(b) > 1}
seen = {}
for idx, name in rows:
    w = f"{prefix}-{base(name)}"
    if len(w) > 40 or base(name) in shared or not VALID.match(w):
        w = f"{w[:33].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    if w in seen:
        fail(f"points {seen[w]!r} and {name!r} get the same workload name {w!r}")
    seen[w] = name
    print(f"{idx}\t{w}\t{name}")
EOF
)

indices=()
names=()
workload_names=()
while IFS=$'\t' read -r idx workload name; do
  indices+=("$idx")
  workload_names+=("$workload")
  names+=("$name")
done <<<"$workloads"
n=${#indices[@]}
echo "$prog: $n point(s), index, workload, point:"
for ((i = 0; i < n; i++)); do
  printf '%6s  %-40s  %s\n' "${indices[i]}" "${workload_names[i]}" "${names[i]}"
done

xpk_flags=()
if [[ $dry_run -eq 1 ]]; then xpk_flags+=(--dry-run); fi
failed=()
for ((i = 0; i < n; i++)); do
  rc=0
  WORKLOAD=${workload_names[i]} "$BASH" "$here/xpk.sh" "${xpk_flags[@]}" -- sweep run --point "${names[i]}" "$@" ||
    rc=$?
  if [[ $rc -eq 2 ]]; then
    exit 2  # xpk.sh's usage error (CLUSTER unset, no xpk, ...): the same for every point
  elif [[ $rc -ne 0 ]]; then
    echo "$prog: point ${names[i]} (workload ${workload_names[i]}) failed with status $rc" >&2
    failed+=("${names[i]}")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "$prog: ${#failed[@]} submission(s) failed: ${failed[*]}" >&2
  exit 1
fi
