#!/usr/bin/env python3
"""What idle replicated tenants cost a running cluster (docs/BENCHMARKS.md, "Idle tenants with
three copies").

Starts a 3-node `sq-cloud dev` (R = 3, so every node holds a copy of every tenant), adds TENANTS
tenants through a tenants file, writes one scroll to each (so each has a primary that prepared
and backups that hold a record), then leaves them idle. It prints, per node:

- CPU time each node used per second in the window;
- requests answered over QUIC per second by kind (`sq_node_requests_total`), in a window after
  the idle period: per-tenant kinds (replicate, prepare, fetch records, catch up, snapshot,
  enter, handoff, sq) must be 0, and per-node kinds (lease, gossip, raft) must not grow with
  the tenants;
- the live heap (`sq_node_heap_bytes`, what the allocator has handed out and not had back) and
  resident memory (VmRSS) with no tenant, with the tenants registered, and after the writes and
  the idle period, and the difference per tenant copy; resident memory once more just after
  the window's closing metrics scrape, which renders every tenant's series.

    cargo build --release --locked --bin sq-cloud
    python3 benches/idle-replicas/measure.py [--tenants 100000] [--idle-s 80] [--window-s 30]
        [--first 20000]

With `--first N`, the first N tenants are written and left idle, their memory is read, then
the rest are written: what the later copies cost per copy is then free of what the peak of
loaded tenants left behind (room in the allocator's pages that the next loads reuse), which
both parts share.

It makes its own directory under /tmp and removes it at the end (several GB at 100,000
tenants); `--keep` leaves it, with the cluster's logs.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PER_TENANT_KINDS = {"sq", "replicate", "prepare", "fetch records", "catch up", "snapshot", "enter",
                    "handoff"}
METRIC = re.compile(r'^sq_node_requests_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def cpu_s(pid):
    """User plus system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Gateway:
    def __init__(self, url):
        host, port = url.split("//", 1)[1].split(":")
        self.host, self.port = host, int(port)

    def get(self, path, key, timeout=30):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


def scrape(gw, admin_key):
    """The gateway's /api/v2/metrics, every node's included. One scrape renders every tenant's
    series, so each measure takes one."""
    status, body = gw.get("/api/v2/metrics", admin_key)
    assert status == 200, body[:200]
    return body.decode()


def node_requests(text):
    """{(node, kind): count} from a scrape."""
    out = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if "node" in labels:
            out[(labels["node"], labels["kind"])] = float(m.group("value"))
    return out


HEAP = re.compile(r'^sq_node_heap_bytes\{[^}]*node="(?P<node>[^"]+)"[^}]*\} (?P<value>[0-9.e+]+)$')
ALLOCATOR = re.compile(r'^sq_node_allocator_bytes\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def heap_bytes(text):
    """{node: live heap bytes} from each node's `sq_node_heap_bytes` in a scrape."""
    return {m.group("node"): float(m.group("value"))
            for m in map(HEAP.match, text.splitlines()) if m}


def allocator_bytes(text):
    """{node: {state: bytes}} from each node's `sq_node_allocator_bytes` in a scrape
    (allocated, active, metadata, resident, ...: node::memory::allocator_bytes)."""
    out = {}
    for m in map(ALLOCATOR.match, text.splitlines()):
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            out.setdefault(labels["node"], {})[labels["state"]] = float(m.group("value"))
    return out


def rss_parts_kib(pid):
    """{RssAnon, RssFile, RssShmem} of the process: the heap and stacks, the mapped binary."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    return out


def write_all(gw, keys, threads):
    """One update per key, each retried (for up to 300 s) until it is answered 200."""

    def one(key):
        conn = None
        # Patient: a loaded machine answers 503 while a lease or a registry round is lost.
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=30)
                conn.request("GET", "/api/v2/update?p=idle&c=1.1.1/1.1.1/1.1.1&s=x",
                             headers={"Authorization": f"Bearer {key}"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    conn.close()
                    return True
            except (OSError, http.client.HTTPException):
                conn = None
            time.sleep(0.05)
        return False

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(one, keys, chunksize=64))
    return sum(done)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--idle-s", type=float, default=80.0,
                    help="idle time before the window: past the 60 s after which a primary "
                         "forgets a tenant's replication state and the store unloads it")
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--first", type=int, default=0,
                    help="write this many tenants first, then idle, then the rest: reports what "
                         "the later copies cost after the same peak of loaded tenants")
    ap.add_argument("--bin", default="./target/release/sq-cloud")
    ap.add_argument("--port", type=int, default=28640)
    ap.add_argument("--keep", action="store_true",
                    help="keep the cluster's data directory (several GB at 100,000 tenants)")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="sq-idle-replicas.")
    tenants_file = os.path.join(root, "tenants.json")
    with open(tenants_file, "w") as f:
        json.dump({"tenants": []}, f)
    dev_dir = os.path.join(root, "dev")
    out = open(os.path.join(root, "dev.out"), "w")
    dev = subprocess.Popen([args.bin, "dev", "--data", dev_dir, "--listen",
                            f"127.0.0.1:{args.port}", "--tenants-file", tenants_file],
                           stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        # `sq-cloud dev` prints its banner once the cluster is up and dev.json is written.
        while "Ctrl-C stops the cluster" not in open(out.name).read():
            assert dev.poll() is None and time.time() < deadline, f"dev did not start: {root}"
            time.sleep(0.2)
        info = json.load(open(os.path.join(dev_dir, "dev.json")))
        gw = Gateway(info["gateway_url"])
        pids = {str(n["id"]): n["pid"] for n in info["nodes"]}
        admin = info["admin_key"]
        rss = {"empty": {n: rss_kib(p) for n, p in pids.items()}}
        heap = {"empty": heap_bytes(scrape(gw, admin))}

        keys = ["pmb-v1-" + secrets.token_hex(16) for _ in range(args.tenants)]
        started = time.time()
        with open(tenants_file + ".tmp", "w") as f:
            json.dump({"tenants": [{"id": f"idle{i:06}", "api_key": k, "quota_mb": 1}
                                   for i, k in enumerate(keys)]}, f)
        os.rename(tenants_file + ".tmp", tenants_file)
        while gw.get("/api/v2/select?p=idle&c=1.1.1/1.1.1/1.1.1", keys[-1])[0] != 200:
            assert time.time() - started < 600, "the tenants file was not applied in 600 s"
            time.sleep(0.5)
        print(f"{args.tenants} tenants registered in {time.time() - started:.1f} s", flush=True)
        time.sleep(5)
        rss["registered"] = {n: rss_kib(p) for n, p in pids.items()}
        text = scrape(gw, admin)
        heap["registered"] = heap_bytes(text)
        parts = {"registered": {n: rss_parts_kib(p) for n, p in pids.items()}}
        alloc = {"registered": allocator_bytes(text)}

        started = time.time()
        written = 0
        if args.first:
            # The same writes in two parts, each followed by an idle period, so the second
            # part's copies are measured after the same peak of loaded tenants as the first's.
            assert 0 < args.first < args.tenants, "--first must be between 0 and --tenants"
            written = write_all(gw, keys[:args.first], args.threads)
            assert written == args.first, "some tenants were never written"
            print(f"first {written} written in {time.time() - started:.1f} s; "
                  f"idle for {args.idle_s:.0f} s", flush=True)
            time.sleep(args.idle_s)
            rss["first_idle"] = {n: rss_kib(p) for n, p in pids.items()}
            text = scrape(gw, admin)
            heap["first_idle"] = heap_bytes(text)
            alloc["first_idle"] = allocator_bytes(text)
            # Let the allocator settle after the scrape above, as before the closing one.
            time.sleep(15)
            rss["first_idle_settled"] = {n: rss_kib(p) for n, p in pids.items()}
        written += write_all(gw, keys[args.first:], args.threads)
        took = time.time() - started
        print(f"{written} of {args.tenants} tenants written once in {took:.1f} s "
              f"({written / took:.0f}/s)", flush=True)
        assert written == args.tenants, "some tenants were never written"

        print(f"idle for {args.idle_s:.0f} s", flush=True)
        time.sleep(args.idle_s)
        before = node_requests(scrape(gw, admin))
        cpu_before = {n: cpu_s(p) for n, p in pids.items()}
        time.sleep(args.window_s)
        cpu_after = {n: cpu_s(p) for n, p in pids.items()}
        # Read before the window's closing scrape: a scrape renders every tenant's series, and
        # the allocator keeps the pages that rendering freed for up to its decay time (10 s).
        rss["idle"] = {n: rss_kib(p) for n, p in pids.items()}
        parts["idle"] = {n: rss_parts_kib(p) for n, p in pids.items()}
        text = scrape(gw, admin)
        after = node_requests(text)
        rss["just_scraped"] = {n: rss_kib(p) for n, p in pids.items()}
        heap["idle"] = heap_bytes(text)
        alloc["idle"] = allocator_bytes(text)

        rates = {}
        for (node, kind), v in sorted(after.items()):
            rate = (v - before.get((node, kind), 0.0)) / args.window_s
            # The two metrics reads themselves are answered as per-node "metrics" requests.
            rates.setdefault(node, {})[kind] = round(rate, 2)
        per_tenant = {n: sum(r for k, r in kinds.items() if k in PER_TENANT_KINDS)
                      for n, kinds in rates.items()}
        report = {
            "tenants": args.tenants,
            "copies_per_node": args.tenants,
            "window_s": args.window_s,
            "requests_per_s_by_node_and_kind": rates,
            "per_tenant_requests_per_s": per_tenant,
            "cpu_ms_per_s_in_window": {
                n: round((cpu_after[n] - cpu_before[n]) * 1000 / args.window_s, 1) for n in pids},
            "rss_kib": rss,
            "rss_bytes_per_copy_registered_to_idle": {
                n: round((rss["idle"][n] - rss["registered"][n]) * 1024 / args.tenants, 1)
                for n in pids},
            "rss_bytes_per_copy_registered_to_just_scraped": {
                n: round((rss["just_scraped"][n] - rss["registered"][n]) * 1024 / args.tenants, 1)
                for n in pids},
            "heap_bytes_per_copy_registered_to_idle": {
                n: round((heap["idle"][n] - heap["registered"][n]) / args.tenants, 1)
                for n in heap["idle"]},
            # Where the resident growth went: the process's anonymous and file-backed pages,
            # and the allocator's own states (as the window's closing scrape reports them).
            "rss_parts_bytes_per_copy_registered_to_idle": {
                n: {k: round((parts["idle"][n][k] - parts["registered"][n][k]) * 1024
                             / args.tenants, 1) for k in parts["idle"][n]}
                for n in pids},
            "allocator_bytes_per_copy_registered_to_idle": {
                n: {k: round((alloc["idle"][n][k] - alloc["registered"][n][k]) / args.tenants, 1)
                    for k in alloc["idle"][n]}
                for n in alloc["idle"]},
            "allocator_mib_idle": {
                n: {k: round(v / 2**20, 1) for k, v in alloc["idle"][n].items()}
                for n in alloc["idle"]},
            # With --first: what the copies written after the first idle period cost, both
            # parts having gone through the same peak of loaded tenants (the store's cap).
            "marginal_per_copy_first_idle_to_idle": None if not args.first else {
                "copies": args.tenants - args.first,
                "rss": {n: round((rss["idle"][n] - rss["first_idle_settled"][n]) * 1024
                                 / (args.tenants - args.first), 1) for n in pids},
                "heap": {n: round((heap["idle"][n] - heap["first_idle"][n])
                                  / (args.tenants - args.first), 1) for n in heap["idle"]},
                "allocator": {
                    n: {k: round((alloc["idle"][n][k] - alloc["first_idle"][n][k])
                                 / (args.tenants - args.first), 1) for k in alloc["idle"][n]}
                    for n in alloc["idle"]},
            },
            "heap_bytes_per_tenant_empty_to_registered": {
                n: round((heap["registered"][n] - heap["empty"][n]) / args.tenants, 1)
                for n in heap["registered"]},
            "rss_bytes_per_tenant_empty_to_registered": {
                n: round((rss["registered"][n] - rss["empty"][n]) * 1024 / args.tenants, 1)
                for n in pids},
            "dir": root if args.keep else None,
        }
        print(json.dumps(report, indent=2))
        return 0 if all(v == 0 for v in per_tenant.values()) else 1
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
