#!/usr/bin/env bash
# Breaks sq-cloud on purpose, one patch at a time, and shows that the simulator catches each break.
#
#   sim/mutations/run.sh [SEEDS]      # default 200 seeds per mutation
#   MUTATIONS='replicated-*' sim/mutations/run.sh 100     # only the patches matching the glob
#   FIRST=13778 MUTATIONS=replicated-prepare-majority-only sim/mutations/run.sh 1   # from seed 13778
#
# Each patch in this directory is applied to a scratch worktree of HEAD (the checkout itself is
# never touched), the simulator is built there, and SEEDS seeds are run. The script prints, per
# patch, the first failing seed, how many seeds failed, and which invariants they broke; it exits
# non-zero if any patch goes uncaught.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(git -C "$here" rev-parse --show-toplevel)"
seeds="${1:-200}"; first_seed="${FIRST:-0}"
scratch="$(mktemp -d)"
target="${CARGO_TARGET_DIR:-$root/target}/mutations"
trap 'git -C "$root" worktree remove --force "$scratch/tree" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT

git -C "$root" worktree add --quiet --detach "$scratch/tree" HEAD
uncaught=0
for patch in "$here"/${MUTATIONS:-*}.diff; do
  name="$(basename "$patch" .diff)"
  git -C "$scratch/tree" checkout --quiet -- .
  git -C "$scratch/tree" apply "$patch"
  CARGO_TARGET_DIR="$target" cargo build --quiet --locked --release -p sim --manifest-path "$scratch/tree/Cargo.toml"
  # The replication patches break what only a replicated cluster does.
  args=()
  case "$name" in replicated-*) args=(--replicas 3) ;; esac
  "$target/release/sim" --seeds "$seeds" --first "$first_seed" "${args[@]}" >"$scratch/$name.out" 2>&1 || true
  failed="$(grep -c ': FAILED ' "$scratch/$name.out" || true)"
  if [ "$failed" -eq 0 ]; then
    echo "$name: NOT caught in $seeds seeds"
    uncaught=1
    continue
  fi
  first="$(grep ': FAILED ' "$scratch/$name.out" | sed 's/^seed \([0-9]*\):.*/\1/' | sort -n | head -1)"
  echo "$name: caught; first failing seed $first (found within $((first - first_seed + 1)) seeds), $failed of $seeds seeds failed"
  grep ': FAILED ' "$scratch/$name.out" | sed 's/^seed [0-9]*: FAILED \([^:]*\):.*/    \1/' | sort | uniq -c
  grep "^seed $first: FAILED" "$scratch/$name.out" | sed 's/^/    e.g. /'
done
exit "$uncaught"
