#!/usr/bin/env bash
# The control plane at scale, in one run (docs/BENCHMARKS.md, "The control plane at 100,000
# tenants"):
#   1. a 3-node `sq-cloud dev` and a second gateway on the same nodes;
#   2. `sq-cloud bench --mode admin-add`: TENANTS tenants added through the first gateway by 16
#      clients, then 200 one at a time, each new key probed through both gateways;
#   3. a full stop and start of the dev cluster: the time from the start until a tenant key
#      added before the stop is served again (an authenticated select answered 200).
#
#     cargo build --release -p sq-cloud
#     benches/control-plane/run.sh [TENANTS]      # default 100000
#
# It makes its own data directory under /tmp and leaves it (and its logs) there.
set -euo pipefail
TENANTS=${1:-100000}
BIN=${BIN:-./target/release/sq-cloud}
DIR=$(mktemp -d /tmp/sq-control-plane.XXXXXX)
PORT=${PORT:-28540}
PORT2=$((PORT + 1))

start_dev() {
  "$BIN" dev --data "$DIR/dev" --listen "127.0.0.1:$PORT" >>"$DIR/dev.out" 2>&1 &
  DEV_PID=$!
}
wait_serving() { # key: waits until a select with it answers 200
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" \
      "http://127.0.0.1:$PORT/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1")" = 200 ]; do sleep 0.02; done
}
stop_all() {
  [ -n "${GW2_PID:-}" ] && kill "$GW2_PID" 2>/dev/null || true
  [ -n "${DEV_PID:-}" ] && kill -INT "$DEV_PID" 2>/dev/null && wait "$DEV_PID" 2>/dev/null || true
}
trap stop_all EXIT

start_dev
until [ -f "$DIR/dev/dev.json" ]; do sleep 0.1; done
DEMO=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['demo_key'])" "$DIR/dev/dev.json")
wait_serving "$DEMO"
sed "s/^listen = .*/listen = \"127.0.0.1:$PORT2\"/" "$DIR/dev/gateway.toml" >"$DIR/gateway2.toml"
"$BIN" gateway --config "$DIR/gateway2.toml" >>"$DIR/gateway2.log" 2>&1 &
GW2_PID=$!

"$BIN" bench --mode admin-add --dev "$DIR/dev" --tenants "$TENANTS" --concurrency 16 \
  --band 10000 --single-adds 200 --probe-gateway "http://127.0.0.1:$PORT2" --json \
  | tee "$DIR/admin-add.json"

kill "$GW2_PID"; GW2_PID=
kill -INT "$DEV_PID"; wait "$DEV_PID" || true
started=$(date +%s.%N)
start_dev
wait_serving "$DEMO"
echo "stop and start with $(( TENANTS + 200 )) added tenants: serving again $(python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.2f}')" "$started") s after the start"
echo "data and logs: $DIR"
