#!/usr/bin/env bash
# launch/tpu_pod.sh: run one sora-jax command on every worker of a Cloud TPU VM pod slice.
#
# Usage:
#   TPU_NAME=NAME ZONE=ZONE launch/tpu_pod.sh [--dry-run] [--no-setup|--setup-only] \
#       [--] SORA_JAX_ARGS...
#
# Example:
#   TPU_NAME=sora-v5p-64 ZONE=us-east5-a PROJECT=my-project \
#     launch/tpu_pod.sh train-dit --config configs/quickstart.py --workdir /mnt/runs/sora
#
# Steps, each a `gcloud compute tpus tpu-vm ... --worker=all` call:
#   1. setup (skipped with --no-setup): copy this checkout to every worker (git archive of HEAD
#      plus uncommitted changes to tracked files; untracked files stay behind), or clone
#      REPO_URL there, and pip-install it with JAX for TPU;
#   2. run `python3 -m sora_jax.cli SORA_JAX_ARGS...` on every worker at once, with
#      SORA_JAX_DISTRIBUTED=auto: jax.distributed.initialize() then reads the worker count,
#      worker id and coordinator from the TPU VM metadata (sora_jax/parallel/distributed.py).
# The command runs in the foreground of the ssh sessions: run this script inside tmux/screen
# for long jobs. --workdir must be storage every worker sees (a GCS bucket mounted with
# gcsfuse, Filestore/NFS): every host writes its part of each Orbax checkpoint.
#
# Options:
#   --dry-run     print the commands instead of running them (needs no gcloud)
#   --no-setup    skip step 1 (the code is already installed on the workers)
#   --setup-only  do step 1 only
#   -h, --help    this text
#
# Environment:
#   TPU_NAME      name of the TPU VM (required)
#   ZONE          its zone (required)
#   PROJECT       GCP project (default: gcloud's configured project)
#   REMOTE_DIR    where the code lives on each worker: a path relative to the home folder,
#                 or absolute (default: sora-jax)
#   REPO_URL      clone this git URL on the workers instead of copying the local checkout
#   REPO_REF      branch, tag or commit of REPO_URL to check out (default: main)
#   JAX_TPU_SPEC  pip requirement for JAX with libtpu (default: jax[tpu])
#   REMOTE_ENV    extra NAME=VALUE words exported before the command, e.g.
#                 "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"
#   GCLOUD        the gcloud program (default: gcloud)
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"  # prog, usage, die, q, sq
repo_root=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
setup=1
run=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --no-setup) setup=0; shift ;;
    --setup-only) run=0; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $setup -eq 1 || $run -eq 1 ]] || die "--no-setup and --setup-only leave nothing to do"
[[ $run -eq 0 || $# -gt 0 ]] || die "no sora-jax arguments (e.g. train-dit --config configs/quickstart.py)"

[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM's name)"
[[ -n "${ZONE:-}" ]] || die "set ZONE (the TPU VM's zone)"
gcloud_bin=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-sora-jax}
jax_tpu_spec=${JAX_TPU_SPEC:-jax[tpu]}

common=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  common+=(--project="$PROJECT")
fi

if [[ $dry_run -eq 0 ]] && ! command -v "$gcloud_bin" >/dev/null 2>&1; then
  die "'$gcloud_bin' not found: install the Google Cloud SDK (or use --dry-run)"
fi


# runs (or, with --dry-run, prints) one command
do_cmd() {
  if [[ $dry_run -eq 1 ]]; then
    printf '+'
    local a
    for a in "$@"; do
      printf ' %s' "$(sq "$a")"
    done
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # a bash command line on every worker
  do_cmd "$gcloud_bin" compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker=all \
    --command="$1"
}


if [[ "$remote_dir" == /* ]]; then
  rdir=$(q "$remote_dir")
else
  # shellcheck disable=SC2088  # expanded by the worker's shell, in its home folder
  rdir="~/$(q "$remote_dir")"
fi

if [[ $setup -eq 1 ]]; then
  install="python3 -m pip install --upgrade $(q "$jax_tpu_spec") -e $rdir"
  if [[ -n "${REPO_URL:-}" ]]; then
    ref=${REPO_REF:-main}
    on_all_workers "set -euo pipefail; d=$rdir; \
if [ -d \"\$d/.git\" ]; then git -C \"\$d\" fetch --all --tags; else git clone $(q "$REPO_URL") \"\$d\"; fi; \
git -C \"\$d\" checkout $(q "$ref"); $install"
  else
    tarball="${TMPDIR:-/tmp}/sora-jax-$$.tar.gz"
    if [[ $dry_run -eq 1 ]]; then
      echo "+ git -C $(q "$repo_root") archive --format=tar.gz -o $(q "$tarball") \"\$(git stash create || echo HEAD)\""
    else
      tree=$(git -C "$repo_root" stash create)
      git -C "$repo_root" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}"
      trap 'rm -f "$tarball"' EXIT
    fi
    do_cmd "$gcloud_bin" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:sora-jax.tar.gz" "${common[@]}" \
      --worker=all
    # extracted over the folder (not wiped first: runs/ under it may hold earlier runs)
    on_all_workers "set -euo pipefail; mkdir -p $rdir; tar -xzf ~/sora-jax.tar.gz -C $rdir; $install"
  fi
fi

if [[ $run -eq 1 ]]; then
  remote_words "$@"  # sets args, exports
  on_all_workers "set -euo pipefail; cd $rdir; $exports; python3 -m sora_jax.cli$args"
fi
