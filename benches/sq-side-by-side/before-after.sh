#!/usr/bin/env bash
# Two sq-cloud binaries side by side in one run, keep-alive select (or SCRIPT) at 16 connections
# with wrk.
#
#   benches/sq-side-by-side/before-after.sh BEFORE_BIN AFTER_BIN
#   NODES=3 REPLICAS=3 SCRIPT=update.lua benches/sq-side-by-side/before-after.sh BEFORE_BIN AFTER_BIN
#
# Each binary runs `sq-cloud dev --nodes NODES --replicas REPLICAS` (1 and 1 unless set) with
# TENANTS tenants holding the 1 MB document of run.sh (load.py); rounds alternate the two,
# DURATION seconds each, and print req/s, p50, p99.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BEFORE="$1"; AFTER="$2"
TENANTS="${TENANTS:-32}"; ROUNDS="${ROUNDS:-3}"; DURATION="${DURATION:-8}"
NODES="${NODES:-1}"; REPLICAS="${REPLICAS:-1}"; SCRIPT="${SCRIPT:-select.lua}"
work="$(mktemp -d)"; pids=()
cleanup() { for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
python3 - "$work/bench.phext" <<'PY'
import random, sys
rng = random.Random(1)
letters = "abcdefghijklmnopqrstuvwxyz "
open(sys.argv[1], "w").write("\x17".join("".join(rng.choice(letters) for _ in range(1000)) for _ in range(999)))
PY
port=28500
for side in before after; do
  bin="$BEFORE"; [ "$side" = after ] && bin="$AFTER"
  port=$((port + 1)); echo "$port" >"$work/$side.port"
  "$bin" dev --nodes "$NODES" --replicas "$REPLICAS" --data "$work/$side" --listen "127.0.0.1:$port" >"$work/$side.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do grep -q details "$work/$side.log" && break; sleep 0.2; done
  python3 "$here/load.py" "$work/$side" "$TENANTS" "$work/bench.phext" "$work/$side.keys"
done
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    KEYS="$work/$side.keys" wrk -t2 -c16 -d"${DURATION}s" --latency -s "$here/$SCRIPT" "http://127.0.0.1:$(cat "$work/$side.port")" >"$work/wrk.out" 2>&1
    awk -v side="$side" -v round="$round" -v script="${SCRIPT%.lua}" '
      /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Requests\/sec/ {rps=$2} /Non-2xx/ {bad=$NF}
      END {printf "%s, 16 connections  round %s  %-6s %10s req/s  p50 %8s  p99 %8s%s\n", script, round, side, rps, p50, p99, (bad ? "  NON-2XX: " bad : "")}' "$work/wrk.out"
  done
done
