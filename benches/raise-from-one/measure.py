#!/usr/bin/env python3
"""Raising R from 1 to 2 under writes (docs/BENCHMARKS.md, "Raising R from 1 with a large tenant").

Starts a 3-node `sq-cloud dev --replicas 1`, fills one tenant with MB megabytes (scrolls of
8 MiB), starts a client writing small scrolls to it one after another, then runs
`sq-cloud admin --dev DIR cluster replicas 2` (which returns once every new copy has caught up)
and keeps writing 3 s more. It prints:

- how long the raise took, and the writes sent while it ran: how many, how many were not
  answered 200 (each printed with its answer), and their latency p50 and max;
- the node liveness changes the registry leader committed meanwhile (`node liveness changed`
  in the nodes' logs): a raise should mark no node down.

    cargo build --release --locked --bin sq-cloud
    python3 benches/raise-from-one/measure.py [--mb 64] [--bin target/release/sq-cloud]

It makes its own directory under /tmp and removes it at the end (`--keep` leaves it).
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64, help="megabytes the written tenant holds")
    ap.add_argument("--bin", default="target/release/sq-cloud")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    port = free_port()
    top = tempfile.mkdtemp(prefix="raise-from-one-")
    data = os.path.join(top, "dev")
    dev = subprocess.Popen(
        [args.bin, "dev", "--nodes", "3", "--data", data, "--listen", f"127.0.0.1:{port}",
         "--replicas", "1"],
        stdout=open(os.path.join(top, "dev.log"), "w"), stderr=subprocess.STDOUT)
    try:
        run(args, port, data)
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(60)
        if not args.keep:
            shutil.rmtree(top)
        else:
            print(f"kept {top}")


def run(args, port, data):
    for _ in range(600):
        if os.path.exists(os.path.join(data, "dev.json")):
            break
        time.sleep(0.2)
    cfg = json.load(open(os.path.join(data, "dev.json")))

    def call(method, path, body, key, ctype="application/json"):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request(method, "/api/v2" + path, body,
                  {"Authorization": "Bearer " + key, "Content-Type": ctype})
        r = c.getresponse()
        answer = r.read()
        c.close()
        return r.status, answer

    status, made = call("POST", "/admin/tenants/add",
                        json.dumps({"tenant_id": "big", "tier": "team"}), cfg["admin_key"])
    assert status in (200, 201), made
    key = json.loads(made)["api_key"]
    call("PATCH", "/admin/tenants/big", json.dumps({"daily_limit": 100_000_000}), cfg["admin_key"])
    chunk = 8 << 20
    for k in range(max(1, args.mb * (1 << 20) // chunk)):
        status, answer = call("POST", f"/update?p=big&c=1.1.1/1.1.1/1.1.{k + 1}", b"x" * chunk,
                              key, "text/plain")
        assert status == 200, answer
    print(f"tenant big holds {args.mb} MB", flush=True)

    stop = threading.Event()
    log = []

    def writer():
        i = 0
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            i += 1
            sent = time.time()
            try:
                c.request("GET", f"/api/v2/update?p=w&c=1.1.1/1.1.1/1.1.{i % 999 + 1}&s=w{i}",
                          headers={"Authorization": "Bearer " + key})
                r = c.getresponse()
                body = r.read()
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                status, body = 0, str(e).encode()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            log.append((sent, time.time() - sent, status, body[:200]))
            if status != 200:
                time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(2)
    began = time.time()
    cli = subprocess.run([args.bin, "admin", "--dev", data, "cluster", "replicas", "2"],
                         capture_output=True, text=True)
    ended = time.time()
    time.sleep(3)
    stop.set()
    thread.join()
    last = (cli.stderr.strip().splitlines() or [cli.stdout.strip()])[-1]
    print(f"admin cluster replicas 2: exit {cli.returncode}; {last}")
    during = [(lat, status, body) for sent, lat, status, body in log if began <= sent <= ended]
    for lat, status, body in during:
        if status != 200:
            print(f"  answered {status} after {lat * 1000:.0f} ms: {body.decode(errors='replace')}")
    lats = sorted(lat for lat, _, _ in during)
    refused = sum(1 for _, status, _ in during if status != 200)
    if lats:
        print(f"raise took {ended - began:.2f} s; writes sent meanwhile {len(during)}, not 200: "
              f"{refused}; latency p50 {lats[len(lats) // 2] * 1000:.1f} ms, "
              f"max {lats[-1] * 1000:.0f} ms")
    marks = []
    for path in sorted(glob.glob(os.path.join(data, "node-*.log"))):
        with open(path, errors="replace") as f:
            marks += [line.strip() for line in f if "liveness changed" in line]
    print(f"node liveness changes committed: {len(marks)}")
    for line in marks:
        print(f"  {line}")


if __name__ == "__main__":
    main()
