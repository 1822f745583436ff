#!/usr/bin/env bash
# Where a request's CPU goes: each process's CPU time and context switches per request, over
# wrk runs against one `sq-cloud dev` cluster (no SQ beside it).
#
#   benches/sq-side-by-side/cpu-per-request.sh                 # update, R = 3, three 10-s runs
#   SCRIPT=select.lua REPLICAS=1 benches/sq-side-by-side/cpu-per-request.sh
#   BIN=path/to/other/sq-cloud benches/sq-side-by-side/cpu-per-request.sh   # another build, not built here
#
# The cluster and its TENANTS tenants are those of run.sh (the 1 MB document, load.py). For each
# run it prints req/s, p50 and p99 as wrk reports them, then per request: the CPU (user + system,
# from /proc/<pid>/stat) of node 1, 2, 3 and the gateway, their context switches (voluntary and
# not, summed over every thread, from /proc/<pid>/task/*/status), wrk's own CPU, and the whole
# machine's busy CPU (from /proc/stat: it adds the kernel's threads, such as the file system's
# journal) with the share of time the cores were idle. After the last run it prints each
# process's resident memory. The machine should be otherwise quiet.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
TENANTS="${TENANTS:-32}"; RUNS="${RUNS:-3}"; DURATION="${DURATION:-10}"; REPLICAS="${REPLICAS:-3}"
SCRIPT="${SCRIPT:-update.lua}"; PORT="${PORT:-28460}"
for tool in cargo python3 wrk; do command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }; done
target="${CARGO_TARGET_DIR:-$root/target}"
work="$(mktemp -d)"; dev=""
cleanup() {
  [ -n "$dev" ] && kill -INT "$dev" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

[ -n "${BIN:-}" ] || cargo build --quiet --release --locked -p sq-cloud --manifest-path "$root/Cargo.toml"
python3 - "$work/bench.phext" <<'PY'
import random, sys
rng = random.Random(1)
letters = "abcdefghijklmnopqrstuvwxyz "
open(sys.argv[1], "w").write("\x17".join("".join(rng.choice(letters) for _ in range(1000)) for _ in range(999)))
PY
"${BIN:-$target/release/sq-cloud}" dev --data "$work/dev" --listen "127.0.0.1:$PORT" --replicas "$REPLICAS" >"$work/dev.log" 2>&1 &
dev=$!
for _ in $(seq 150); do [ -f "$work/dev/dev.json" ] && break; sleep 0.2; done
[ -f "$work/dev/dev.json" ] || { echo "the cluster did not come up; see $work/dev.log" >&2; exit 1; }
python3 "$here/load.py" "$work/dev" "$TENANTS" "$work/bench.phext" "$work/keys.txt"
pids=$(python3 -c "import json; d = json.load(open('$work/dev/dev.json')); print(' '.join(str(n['pid']) for n in d['nodes']), d['gateway_pid'])")
ticks="$(getconf CLK_TCK)"
cpu() { for p in $pids; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }
# The whole machine's busy and idle ticks (every process and kernel thread), from /proc/stat.
machine() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat; }
switches() { for p in $pids; do cat /proc/"$p"/task/*/status | awk '/ctxt_switches/ {s += $2} END {printf "%d ", s}'; done; }
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  c0=($(cpu)); s0=($(switches)); m0=($(machine))
  KEYS="$work/keys.txt" wrk -t2 -c16 -d"${DURATION}s" --latency -s "$here/$SCRIPT" "http://127.0.0.1:$PORT" >"$work/wrk.out" 2>&1 &
  wrk=$!
  # wrk's CPU, read from its /proc entry just before it exits.
  wrk_ticks=0
  while kill -0 "$wrk" 2>/dev/null; do
    t=$(awk '{print $14 + $15}' "/proc/$wrk/stat" 2>/dev/null || echo "$wrk_ticks"); wrk_ticks=$t; sleep 0.1
  done
  wait "$wrk"
  c1=($(cpu)); s1=($(switches)); m1=($(machine))
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  python3 - "$run" "$reqs" "$ticks" "$wrk_ticks" "${c0[*]}" "${c1[*]}" "${s0[*]}" "${s1[*]}" "$work/wrk.out" "${m0[*]} ${m1[*]}" <<'PY'
import re, sys
run, reqs, hz, wrk_ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c0, c1, s0, s1 = ([int(x) for x in a.split()] for a in sys.argv[5:9])
out = open(sys.argv[9]).read()
rps = re.search(r"Requests/sec:\s+(\S+)", out).group(1)
p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
busy0, idle0, busy1, idle1 = (int(x) for x in sys.argv[10].split())
machine_us = round((busy1 - busy0) * 1e6 / hz / reqs)
idle_share = round(100 * (idle1 - idle0) / max(1, busy1 - busy0 + idle1 - idle0))
bad = re.search(r"Non-2xx.*?(\d+)", out)
us = [round((b - a) * 1e6 / hz / reqs) for a, b in zip(c0, c1)]
cs = [round((b - a) / reqs, 2) for a, b in zip(s0, s1)]
print(f"run {run}: {rps} req/s, p50 {p50}, p99 {p99}; CPU per request (µs) nodes {us[0]} / {us[1]} / {us[2]}, "
      f"gateway {us[3]}, wrk {round(wrk_ticks * 1e6 / hz / reqs)}; context switches per request nodes "
      f"{cs[0]} / {cs[1]} / {cs[2]}, gateway {cs[3]}; machine {machine_us} µs busy per request, "
      f"{idle_share} % idle" + (f"; NON-2XX {bad.group(1)}" if bad else ""))
PY
done
echo "resident memory, kB: nodes and gateway $(for p in $pids; do awk '/VmRSS/ {printf "%s ", $2}' "/proc/$p/status"; done)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
