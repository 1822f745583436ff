#!/usr/bin/env bash
# sq-cloud against SQ 0.6.0 on this machine, in one run, with wrk (PRODUCT.md §9).
#
#   benches/sq-side-by-side/run.sh            # about 3 minutes once built
#
# Both serve a 1 MB document (999 scrolls of 1,000 bytes; coordinates stop at 999) over loopback HTTP/1.1 keep-alive.
# SQ runs as `sq host` with one key and the document in its data directory. sq-cloud runs as
# `sq-cloud dev` (3 nodes and a gateway, every request gateway -> QUIC -> node) with TENANTS
# tenants holding the same document, each request as a random one of them, because a node limits
# each tenant to 1,000 requests per second. Each measure alternates the two servers, ROUNDS
# times, DURATION seconds each, and prints req/s, p50 and p99 as wrk reports them.
#
# Needs cargo, python3 and wrk (Debian package `wrk`). SQ is installed from crates.io into
# target/sq-0.6.0. VERSION=1 adds `/api/v2/version` at one connection, which sq-cloud's gateway
# answers alone: beside select it shows what the hop to the node costs. ONLY_C1=1 runs only the
# one-connection measures. REPLICAS (default 3, the cluster's default) is R: with 3 every tenant
# is on three nodes and each update is answered once two of them hold it durably; REPLICAS=1
# runs one copy of each tenant.
# Note: `sq host` listens on 0.0.0.0, not only loopback.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
TENANTS="${TENANTS:-32}"; ROUNDS="${ROUNDS:-2}"; DURATION="${DURATION:-8}"; REPLICAS="${REPLICAS:-3}"
PORT="${PORT:-28438}"; SQ_PORT="${SQ_PORT:-18080}"
SQ_KEY="pmb-v1-sidebyside0000000000000000"
for tool in cargo python3 wrk curl; do command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }; done

target="${CARGO_TARGET_DIR:-$root/target}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  # `sq host` does not always stop on SIGINT: whatever is still running after 10 s is killed.
  for _ in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "building sq-cloud (release) and installing SQ 0.6.0 ..." >&2
cargo build --quiet --release --locked -p sq-cloud --manifest-path "$root/Cargo.toml"
[ -x "$target/sq-0.6.0/bin/sq" ] || cargo install --quiet --locked sq --version 0.6.0 --root "$target/sq-0.6.0"

python3 - "$work/bench.phext" <<'PY'
import random, sys
rng = random.Random(1)
letters = "abcdefghijklmnopqrstuvwxyz "
scrolls = ("".join(rng.choice(letters) for _ in range(1000)) for _ in range(999))
open(sys.argv[1], "w").write("\x17".join(scrolls))
PY

mkdir -p "$work/sq/data" && cp "$work/bench.phext" "$work/sq/data/bench.phext"
(cd "$work/sq" && exec "$target/sq-0.6.0/bin/sq" host "$SQ_PORT" --key "$SQ_KEY" --data-dir "$work/sq/data" >"$work/sq.log" 2>&1) &
pids+=($!)
"$target/release/sq-cloud" dev --data "$work/dev" --listen "127.0.0.1:$PORT" --replicas "$REPLICAS" >"$work/dev.log" 2>&1 &
pids+=($!)

wait_for() { # url key
  for _ in $(seq 100); do
    curl -fs -o /dev/null -H "Authorization: Bearer $2" "$1" && return 0
    sleep 0.2
  done
  echo "no answer from $1" >&2; exit 1
}
wait_for "http://127.0.0.1:$SQ_PORT/api/v2/version" "$SQ_KEY"
for _ in $(seq 100); do [ -f "$work/dev/dev.json" ] && break; sleep 0.2; done
wait_for "http://127.0.0.1:$PORT/api/v2/version" "$(python3 -c "import json;print(json.load(open('$work/dev/dev.json'))['demo_key'])")"
python3 "$here/load.py" "$work/dev" "$TENANTS" "$work/bench.phext" "$work/keys.txt"
echo "$SQ_KEY" >"$work/sq-key.txt"

measure() { # label script connections threads
  local label="$1" script="$2" conns="$3" threads="$4"
  for round in $(seq "$ROUNDS"); do
    for side in sq-cloud SQ; do
      if [ "$side" = sq-cloud ]; then url="http://127.0.0.1:$PORT"; keys="$work/keys.txt"; else url="http://127.0.0.1:$SQ_PORT"; keys="$work/sq-key.txt"; fi
      KEYS="$keys" wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency -s "$here/$script" "$url" >"$work/wrk.out" 2>&1
      awk -v label="$label" -v side="$side" -v round="$round" '
        /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Requests\/sec/ {rps=$2} /Non-2xx/ {bad=$NF}
        END {printf "%-22s round %s  %-8s %10s req/s  p50 %8s  p99 %8s%s\n", label, round, side, rps, p50, p99, (bad ? "  NON-2XX: " bad : "")}' "$work/wrk.out"
    done
  done
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "${ONLY_C1:-}" ] || measure "select, 16 connections" select.lua 16 2
measure "select, 1 connection" select.lua 1 1
[ "${VERSION:-0}" = 1 ] && measure "version, 1 connection" version.lua 1 1
[ -n "${ONLY_C1:-}" ] || measure "update, 16 connections" update.lua 16 2
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
