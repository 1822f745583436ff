#!/usr/bin/env bash
# A full stop and start of a 3-node `sq-cloud dev` holding TENANTS tenants (docs/BENCHMARKS.md,
# "The control plane at 100,000 tenants"): the time from `sq-cloud dev` being started again until
# a tenant key registered before the stop is served (an authenticated select answered 200),
# RUNS times, and their median.
#
#     cargo build --release -p sq-cloud
#     benches/control-plane/restart.sh [TENANTS] [RUNS]      # default 100000 3
#
# The tenants come from a tenants file (key hashes only, applied by the leader in batches) given
# to the first start only; the restarts run without it, as benches/control-plane/run.sh does.
# It makes its own data directory under /tmp and leaves it (and its logs) there.
set -euo pipefail
TENANTS=${1:-100000}
RUNS=${2:-3}
BIN=${BIN:-./target/release/sq-cloud}
DIR=$(mktemp -d /tmp/sq-restart.XXXXXX)
PORT=${PORT:-28640}

start_dev() { # [extra args]
  "$BIN" dev --data "$DIR/dev" --listen "127.0.0.1:$PORT" "$@" >>"$DIR/dev.out" 2>&1 &
  DEV_PID=$!
}
serving() { # key: whether a select with it answers 200
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" \
      "http://127.0.0.1:$PORT/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1")" = 200 ]
}
stop_dev() {
  [ -n "${DEV_PID:-}" ] && kill -INT "$DEV_PID" 2>/dev/null && wait "$DEV_PID" 2>/dev/null || true
  DEV_PID=
}
trap stop_dev EXIT

# The file: tenant i has the key "restart-key-i"; the last one is probed.
python3 - "$TENANTS" "$DIR/tenants.json" <<'EOF'
import hashlib, json, sys
n, path = int(sys.argv[1]), sys.argv[2]
tenants = [{"id": f"rs-{i:07}", "tier": "free",
            "api_key_hash": hashlib.sha256(f"restart-key-{i}".encode()).hexdigest()}
           for i in range(n)]
json.dump({"tenants": tenants}, open(path, "w"))
EOF
PROBE="restart-key-$((TENANTS - 1))"

# The cluster is formed first (dev joins nodes 2 and 3), then started again with the file.
start_dev
until grep -q "are up" "$DIR/dev.out"; do sleep 0.1; done
stop_dev
start_dev --tenants-file "$DIR/tenants.json"
loaded=$(date +%s)
until serving "$PROBE"; do sleep 0.5; done
echo "$TENANTS tenants registered from the file in $(( $(date +%s) - loaded )) s"
until [ "$(grep -c "are up" "$DIR/dev.out")" -ge 2 ]; do sleep 0.1; done
stop_dev

times=()
for run in $(seq "$RUNS"); do
  ups=$(grep -c "are up" "$DIR/dev.out" || true)
  started=$(date +%s.%N)
  start_dev
  until serving "$PROBE"; do sleep 0.02; done
  t=$(python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.2f}')" "$started")
  echo "restart $run: serving again $t s after the start"
  times+=("$t")
  # Let dev finish its own start (it prints its banner once the cluster answers admin
  # requests) before the next stop.
  until [ "$(grep -c "are up" "$DIR/dev.out" || true)" -gt "$ups" ]; do sleep 0.1; done
  stop_dev
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "stop and start with $TENANTS tenants: median $median s over $RUNS restarts (${times[*]})"
echo "data and logs: $DIR"
