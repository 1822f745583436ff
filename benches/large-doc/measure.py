#!/usr/bin/env python3
"""Large documents through a running `sq-cloud dev`: a document of SCROLLS x SCROLL_BYTES (default
300 x 1,000,000 B = 300 MB) in a team tenant, then `get`, `toc`, `query` and `json-export` of
the whole of it, each streamed end to end.

    python3 measure.py DIR [--scrolls 300] [--scroll-bytes 1000000] [--tenant large]

DIR is the dev cluster's directory (`sq-cloud dev --nodes 1 --data DIR`); the script reads
DIR/dev.json for the gateway's URL, the admin key and the pids. It makes the tenant (team tier)
and raises its quota to 2 GiB through the admin API, writes the document one scroll per
request, then for each read:
- reads the answer in 1 MiB pieces, hashing it (xxh3-128) as it arrives, and checks its length
  against Content-Length and its hash against the answer expected (for `get`: the `checksum`
  route's answer; the others are computed here from the document's known scrolls);
- reports MB/s, and the peak RSS growth of the node and the gateway during it (each peak reset
  with /proc/PID/clear_refs just before the read, growth = VmHWM after - VmRSS before).
Last, the same hashing read of the document's file on the node's disk, for MB/s locally.
Needs `pip install xxhash`. Exits non-zero if an answer is wrong.
"""
import argparse, http.client, json, os, sys, time, urllib.parse
import xxhash

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--scrolls", type=int, default=300)
ap.add_argument("--scroll-bytes", type=int, default=1_000_000)
ap.add_argument("--tenant", default="large")
a = ap.parse_args()
dev = json.load(open(os.path.join(a.dir, "dev.json")))
url = urllib.parse.urlparse(dev["gateway_url"])
node_pid, gateway_pid = dev["nodes"][0]["pid"], dev["gateway_pid"]
PIECE = 1 << 20


def call(method, path, key, body=None, headers=None):
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return r.status, r.read()


def kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


admin = dev["admin_key"]
status, body = call("POST", "/api/v2/admin/tenants/add", admin,
                    json.dumps({"tenant_id": a.tenant, "tier": "team"}),
                    {"Content-Type": "application/json"})
if status not in (200, 201):
    sys.exit(f"adding the tenant: {status} {body[:200]!r}")
key = json.loads(body)["api_key"]
status, body = call("PATCH", f"/api/v2/admin/tenants/{a.tenant}", admin,
                    json.dumps({"quota_mb": 2048}), {"Content-Type": "application/json"})
if status != 200:
    sys.exit(f"raising the quota: {status} {body[:200]!r}")


def coord(k):
    return f"1.1.1/1.1.1/1.1.{k}"


def text(k):
    return (chr(ord("a") + k % 26).encode()) * a.scroll_bytes


started = time.time()
retried = 0
for k in range(1, a.scrolls + 1):
    # An update is idempotent, so one answered 503 (the node was still working on it, e.g. on a
    # checkpoint that rewrites the whole document) is sent again; each such retry is counted.
    for attempt in range(10):
        status, body = call("POST", f"/api/v2/update?p=big&c={coord(k)}", key, text(k))
        if status != 503:
            break
        retried += 1
        time.sleep(1)
    if status != 200:
        sys.exit(f"writing scroll {k}: {status} {body[:200]!r}")
doc_bytes = a.scrolls * a.scroll_bytes + (a.scrolls - 1)
print(f"wrote {doc_bytes / 1e6:.1f} MB in {a.scrolls} scrolls in {time.time() - started:.1f} s "
      f"({retried} writes answered 503 and sent again)")


# The answers expected, piece by piece, from the scrolls written (plain letters: nothing to
# escape, one line each).
def expected(read):
    if read == "get":
        for k in range(1, a.scrolls + 1):
            yield (b"\x17" if k > 1 else b"") + text(k)
    elif read == "toc":
        for k in range(1, a.scrolls + 1):
            yield f"* {coord(k)}: ".encode() + text(k) + b"\n"
    elif read == "query":
        yield b"["
        for k in range(1, a.scrolls + 1):
            yield (b"," if k > 1 else b"") + f'{{"coordinate":"{coord(k)}","scroll":"'.encode() + text(k) + b'"}'
        yield b"]"
    elif read == "json-export":
        yield b"[\n"
        for k in range(1, a.scrolls + 1):
            yield (b"," if k > 1 else b"") + f'   {{ "coord": "{coord(k)}", "scroll": "'.encode() + text(k) + b'" }\n'
        yield b"]\n"


def digest(pieces):
    h, n = xxhash.xxh3_128(), 0
    for p in pieces:
        h.update(p)
        n += len(p)
    return h.hexdigest(), n


paths = {
    "get": "/api/v2/get?p=big",
    "toc": "/api/v2/toc?p=big",
    "query": f"/api/v2/query?p=big&from={coord(1)}&to={coord(a.scrolls)}",
    "json-export": "/api/v2/json-export?p=big",
}
# `checksum` hashes the whole document on the node before it answers; its node's peak RSS
# growth is reported like a read's. A 503 (older builds: the node's work outlasted the gateway's
# wait for its answer) is reported and tried again.
for attempt in range(5):
    open(f"/proc/{node_pid}/clear_refs", "w").write("5")
    before = kib(node_pid, "VmRSS:")
    t0 = time.time()
    status, checksum = call("GET", "/api/v2/checksum?p=big", key)
    growth = (kib(node_pid, "VmHWM:") - before) / 1024
    print(f"checksum: {status} in {time.time() - t0:.2f} s; peak RSS growth node {growth:.1f} MiB")
    if status == 200:
        break
    time.sleep(2)
checksum = checksum.decode()
# One read first, so the node has written the document's file (a later read opens it at once).
t0 = time.time()
status, _ = call("GET", paths["get"], key)
print(f"first get after the writes (the node writes the document's file first): {status} "
      f"in {time.time() - t0:.2f} s")
if status != 200:
    time.sleep(2)
    status, _ = call("GET", paths["get"], key)
    print(f"get again: {status}")
failed = False
rates = {}
print(f"node RSS with the document loaded: {kib(node_pid, 'VmRSS:') / 1024:.0f} MiB")
for read, path in paths.items():
    want = checksum if read == "get" else digest(expected(read))[0]
    for pid in (node_pid, gateway_pid):
        open(f"/proc/{pid}/clear_refs", "w").write("5")
    before = {pid: kib(pid, "VmRSS:") for pid in (node_pid, gateway_pid)}
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    t0 = time.time()
    c.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    r = c.getresponse()
    length = int(r.getheader("content-length", "-1"))
    got, n = digest(iter(lambda: r.read(PIECE), b""))
    took = time.time() - t0
    growth = {pid: (kib(pid, "VmHWM:") - before[pid]) / 1024 for pid in (node_pid, gateway_pid)}
    ok = r.status == 200 and n == length and got == want
    failed |= not ok
    rates[read] = n / took / 1e6
    print(f"{read:12} {r.status} {n / 1e6:7.1f} MB in {took:5.2f} s = {rates[read]:6.1f} MB/s; "
          f"peak RSS growth node {growth[node_pid]:5.1f} MiB, gateway {growth[gateway_pid]:5.1f} MiB; "
          f"{'answer as expected' if ok else f'WRONG: length {n} of {length}, hash {got} != {want}'}")

phext = os.path.join(dev["nodes"][0]["data_dir"], "store", "tenants", a.tenant, "phexts", "big.phext")
t0 = time.time()
with open(phext, "rb") as f:
    local, n = digest(iter(lambda: f.read(PIECE), b""))
took = time.time() - t0
print(f"{'local file':12}     {n / 1e6:7.1f} MB in {took:5.2f} s = {n / took / 1e6:6.1f} MB/s "
      f"(hash {'equals' if local == checksum else 'DIFFERS from'} checksum); "
      f"get runs at {rates['get'] / (n / took / 1e6):.2f} of it")
# The amplifying delta of issue 13: 200 lines, each a scroll a million breaks from the origin,
# against an absent document (the answer would be about 200 MB). Refused before it is built.
manifest = "".join(f"1.1.{k}/1.1.1/1.1.1000000: 00\n" for k in range(1, 201)).encode()
open(f"/proc/{node_pid}/clear_refs", "w").write("5")
before = kib(node_pid, "VmRSS:")
t0 = time.time()
status, body = call("POST", "/api/v2/delta?p=absent", key, manifest)
took = time.time() - t0
growth = (kib(node_pid, "VmHWM:") - before) / 1024
print(f"{'delta':12} {status} in {took * 1000:.1f} ms, {len(manifest)} B manifest; peak RSS growth "
      f"node {growth:.1f} MiB; {body[:90].decode(errors='replace')}")
failed |= status != 422
sys.exit(1 if failed else 0)
