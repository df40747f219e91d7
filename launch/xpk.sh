#!/usr/bin/env bash
# launch/xpk.sh: submit one sora-jax command as an XPK workload on a GKE TPU cluster.
#
# Usage:
#   CLUSTER=NAME TPU_TYPE=TYPE launch/xpk.sh [--dry-run] [--] SORA_JAX_ARGS...
#
# Example (2 slices of v5p-128, 16 hosts each):
#   CLUSTER=my-gke ZONE=us-east5-a PROJECT=my-project TPU_TYPE=v5p-128 NUM_SLICES=2 \
#     launch/xpk.sh train-dit --config configs/quickstart.py --workdir /gcs/bucket/runs/sora
#
# Runs `xpk workload create --cluster ... --workload ... --tpu-type ... --num-slices ...
# --command "..."`: XPK builds a JobSet with one pod per TPU host and runs the command in each.
# The image is either DOCKER_IMAGE (prebuilt, with sora-jax and jax[tpu] installed), or
# BASE_DOCKER_IMAGE plus this checkout, which XPK copies into the image (--script-dir) and
# the command pip-installs first. The command exports SORA_JAX_DISTRIBUTED=auto: GKE sets
# TPU_WORKER_HOSTNAMES / TPU_WORKER_ID (and MEGASCALE_* across slices) in every pod, and
# jax.distributed.initialize() finds the coordinator, process count and id from them
# (sora_jax/parallel/distributed.py). --workdir must be storage every pod sees (a GCS bucket
# through the GCS FUSE CSI driver, Filestore): every host writes its part of each Orbax
# checkpoint.
#
# Options:
#   --dry-run   print the xpk command instead of running it (needs no xpk)
#   -h, --help  this text
#
# Environment:
#   CLUSTER            GKE cluster made with `xpk cluster create` (required)
#   TPU_TYPE           TPU slice type, e.g. v5p-128, v6e-256 (required)
#   NUM_SLICES         number of slices (default: 1)
#   WORKLOAD           workload name, lower case (default: sora-jax-<user>-<MMDD-HHMM>)
#   PROJECT, ZONE      GCP project and zone (default: gcloud's configured ones)
#   DOCKER_IMAGE       a prebuilt image to run (no install step)
#   BASE_DOCKER_IMAGE  base image for XPK to add this checkout to (default: python:3.11)
#   SCRIPT_DIR         folder XPK copies into the image (default: the repository root)
#   JAX_TPU_SPEC       pip requirement for JAX with libtpu (default: jax[tpu])
#   REMOTE_ENV         extra NAME=VALUE words exported before the command
#   XPK_ARGS           extra xpk flags, split on spaces (e.g. "--priority=high")
#   XPK                the xpk program (default: xpk)
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # prog, usage, die, q, sq
repo_root=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no sora-jax arguments (e.g. train-dit --config configs/quickstart.py)"
[[ -n "${CLUSTER:-}" ]] || die "set CLUSTER (the GKE cluster)"
[[ -n "${TPU_TYPE:-}" ]] || die "set TPU_TYPE (e.g. v5p-128)"
num_slices=${NUM_SLICES:-1}
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$num_slices'"
user=$(printf '%s' "${USER:-user}" | tr -c 'a-z0-9\n' '-' | tr -s '-')
workload=${WORKLOAD:-sora-jax-${user}-$(date +%m%d-%H%M)}
[[ "$workload" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "WORKLOAD must be lower-case letters, digits and '-', starting with a letter: '$workload'"
xpk_bin=${XPK:-xpk}
jax_tpu_spec=${JAX_TPU_SPEC:-jax[tpu]}

if [[ $dry_run -eq 0 ]] && ! command -v "$xpk_bin" >/dev/null 2>&1; then
  die "'$xpk_bin' not found: pip install xpk (or use --dry-run)"
fi

# the command every pod runs
remote_words "$@"  # sets args, exports
command="set -euo pipefail; $exports; "
if [[ -z "${DOCKER_IMAGE:-}" ]]; then
  command+="python3 -m pip install --quiet $(q "$jax_tpu_spec") -e .; "
fi
command+="python3 -m sora_jax.cli$args"

cmd=("$xpk_bin" workload create --cluster="$CLUSTER" --workload="$workload" --tpu-type="$TPU_TYPE"
  --num-slices="$num_slices")
if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project="$PROJECT"); fi
if [[ -n "${ZONE:-}" ]]; then cmd+=(--zone="$ZONE"); fi
if [[ -n "${DOCKER_IMAGE:-}" ]]; then
  cmd+=(--docker-image="$DOCKER_IMAGE")
else
  cmd+=(--base-docker-image="${BASE_DOCKER_IMAGE:-python:3.11}" --script-dir="${SCRIPT_DIR:-$repo_root}")
fi
if [[ -n "${XPK_ARGS:-}" ]]; then
  read -r -a extra_args <<<"$XPK_ARGS"
  cmd+=("${extra_args[@]}")
fi
cmd+=(--command="$command")

if [[ $dry_run -eq 1 ]]; then
  printf '+'
  for a in "${cmd[@]}"; do
    printf ' %s' "$(sq "$a")"
  done
  printf '\n'
else
  "${cmd[@]}"
fi
