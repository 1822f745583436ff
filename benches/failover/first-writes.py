#!/usr/bin/env python3
"""How often a tenant's first write, sent as soon as the tenant is added, is refused.

    python3 benches/failover/first-writes.py BIN [RUNS] [TENANTS]

Starts `BIN dev --nodes 3` (R = 3) in a fresh directory RUNS times (default 100). Each time it
adds TENANTS tenants (default 6) through the admin API and, right after each add, writes one
scroll with the new key. Every answer but 200 is printed with its body, and the run's directory
(without documents) is kept as /tmp/first-writes-RUN for its logs. Ends with the count of
refused writes. The machine should be otherwise quiet; the cluster listens on loopback.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request


def call(method, url, key, body=None):
    request = urllib.request.Request(
        url,
        method=method,
        data=body,
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def one_run(binary, run, tenants):
    """Returns how many of the run's first writes were refused."""
    data = tempfile.mkdtemp()
    port = random.randint(20000, 29000)
    dev = subprocess.Popen(
        [binary, "dev", "--nodes", "3", "--data", data, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    refused = 0
    try:
        for line in dev.stdout:
            if "details:" in line:
                break
        info = json.load(open(os.path.join(data, "dev.json")))
        base = info["gateway_url"] + "/api/v2"
        for i in range(tenants):
            body = json.dumps({"tenant_id": f"first-{i}"}).encode()
            status, text = call("POST", base + "/admin/tenants/add", info["admin_key"], body)
            if status not in (200, 201):
                sys.exit(f"run {run}: adding a tenant answered {status}: {text}")
            key = json.loads(text)["api_key"]
            status, text = call("GET", base + f"/update?p=doc&c=1.1.1/1.1.1/1.1.1&s=w{i}", key)
            if status != 200:
                refused += 1
                print(f"run {run}, tenant {i}: {status} {text}", flush=True)
                kept = f"/tmp/first-writes-{run}"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(data, kept, ignore=shutil.ignore_patterns("*.phext"))
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    return refused


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    tenants = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    refused = sum(one_run(binary, run, tenants) for run in range(runs))
    print(f"{runs} runs, {runs * tenants} first writes, {refused} refused")


if __name__ == "__main__":
    main()
