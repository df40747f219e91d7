# Shared helpers of the launch/ scripts (sourced, not run): usage from the calling script's
# header comment, errors, and shell quoting.
# shellcheck shell=bash

prog=$(basename "$0")

usage() {  # the calling script's header comment, up to its `set -euo` line
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  echo "$prog: $*" >&2
  exit 2
}

q() { printf '%q' "$1"; }

# one word, quoted for a POSIX shell only where needed (readable --dry-run output)
sq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Sets $args (the arguments, each quoted, as one command-line string) and $exports (what every
# worker exports first: SORA_JAX_DISTRIBUTED=auto plus REMOTE_ENV's NAME=VALUE words).
remote_words() {
  local a kv
  local -a extra_env=()
  # shellcheck disable=SC2034  # read by the sourcing script
  args=""
  for a in "$@"; do
    args+=" $(q "$a")"
  done
  exports="export SORA_JAX_DISTRIBUTED=auto"
  if [[ -n "${REMOTE_ENV:-}" ]]; then
    read -r -a extra_env <<<"$REMOTE_ENV"
    for kv in "${extra_env[@]}"; do
      [[ "$kv" == *=* ]] || die "REMOTE_ENV words must look like NAME=VALUE, got '$kv'"
      exports+=" $(q "$kv")"
    done
  fi
}
