"""Makes the side-by-side bench's tenants on a dev cluster and writes each one's 1 MB document.

    python3 load.py DEV_DIR TENANTS DOC_FILE KEYS_OUT

Each tenant (tier team, daily limit raised so a long bench is not cut off) gets the 999 scrolls
of DOC_FILE (split on the scroll break) as phext `bench`. Its key goes to KEYS_OUT, one a line.
"""
import http.client
import json
import sys

dev_dir, count, doc_file, keys_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dev = json.load(open(f"{dev_dir}/dev.json"))
conn = http.client.HTTPConnection(dev["gateway_url"].split("//", 1)[1])
admin = {"Authorization": "Bearer " + dev["admin_key"], "Content-Type": "application/json"}
scrolls = open(doc_file, encoding="utf-8").read().split("\x17")


def call(method, path, body, headers):
    conn.request(method, path, body, headers)
    answer = conn.getresponse()
    data = answer.read()
    if answer.status not in (200, 201):
        sys.exit(f"{method} {path}: {answer.status} {data[:200]!r}")
    return data


keys = []
for i in range(count):
    tenant = f"side{i:02d}"
    made = json.loads(call("POST", "/api/v2/admin/tenants/add", json.dumps({"tenant_id": tenant, "tier": "team"}), admin))
    call("PATCH", f"/api/v2/admin/tenants/{tenant}", json.dumps({"daily_limit": 100_000_000}), admin)
    key = {"Authorization": "Bearer " + made["api_key"]}
    for j, text in enumerate(scrolls):
        call("POST", f"/api/v2/update?p=bench&c=1.1.1/1.1.1/1.1.{j + 1}", text.encode(), key)
    keys.append(made["api_key"])
    if sys.stderr.isatty():
        print(f"\r{i + 1}/{count} tenants loaded", end="", file=sys.stderr, flush=True)
print(f"\r{count}/{count} tenants loaded", file=sys.stderr)
open(keys_out, "w").write("\n".join(keys) + "\n")
