#!/bin/bash
# The first read of a large document by a node that has just started, on a loaded machine:
#
#     benches/large-doc/cold.sh BINARY DIR PORT BUSY
#
# DIR is a `sq-cloud dev --nodes 1` directory in which measure.py wrote its document (tenant
# `large`, phext `big`), with the cluster stopped. This starts `BINARY dev` on DIR and PORT, gives
# the tenant a fresh key (rotate-key through the admin API), starts BUSY shell loops that each
# keep a core busy, then times the first `get` (the node loads the whole document from disk before
# it can answer) and a `checksum`, prints their statuses, sizes and Retry-After, and stops all.
set -eu
BIN=$1 DIR=$2 PORT=$3 BUSY=$4
URL=http://127.0.0.1:$PORT/api/v2
"$BIN" dev --nodes 1 --data "$DIR" --listen "127.0.0.1:$PORT" > "$DIR.log" 2>&1 &
DEV=$!
for _ in $(seq 240); do grep -q details "$DIR.log" && break; sleep 0.5; done
ADMIN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin_key"])' "$DIR/dev.json")
KEY=$(curl -s -X POST -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' -d '{}' \
  "$URL/admin/tenants/large/rotate-key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
LOOPS=()
for _ in $(seq "$BUSY"); do (while :; do :; done) & LOOPS+=($!); done
curl -s -o "$DIR.body" -H "Authorization: Bearer $KEY" "$URL/get?p=big" -w \
  "first get: %{http_code}, %{size_download} B in %{time_total} s, Retry-After '%header{retry-after}'\n"
curl -s -o "$DIR.body" -H "Authorization: Bearer $KEY" "$URL/checksum?p=big" -w \
  "checksum: %{http_code}, %{size_download} B in %{time_total} s\n"
for pid in "${LOOPS[@]}"; do kill "$pid"; done
kill -TERM "$DEV"
wait "$DEV" || true
rm -f "$DIR.body"
