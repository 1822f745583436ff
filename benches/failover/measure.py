#!/usr/bin/env python3
"""Failover figures against a running `sq-cloud dev` cluster (standard library only).

    python3 benches/failover/measure.py dead-node  --dev sq-cloud-dev --runs 5
    python3 benches/failover/measure.py admin-write --dev sq-cloud-dev --runs 5 --how kill --supervisor PID
    python3 benches/failover/measure.py admin-write --dev sq-cloud-dev --runs 5 --how freeze

dead-node: freezes (SIGSTOP) the owner of a tenant and sends that tenant requests back to back;
prints the time from the freeze to the first answer that is a 503 within 100 ms (the gateway
knows the node is dead), then resumes the node and waits until it serves again.

    python3 benches/failover/measure.py drain-leader --bin target/release/sq-cloud --runs 5

drain-leader: starts a fresh 3-node `sq-cloud dev` per run (in a temporary directory, on a port
of its own), waits until its registry leader has led for 3 s, drains that leader, and at once
sends one admin write; prints how long the drain took to answer, whether leadership moved and to
whom, and how long the write took; then, once no handoff is pending, removes the drained node and
sends another admin write, and prints how long the two took. Without a hand-over the removal of
the leader leaves the registry without one for an election; with it the node removed is a
follower.

    python3 benches/failover/measure.py tenant-failover --dev DIR --tenants 30 --runs 5

tenant-failover (a cluster started with `sq-cloud dev --replicas 3`): makes the tenants, writes
each once, then per run freezes (SIGSTOP) the node that is primary of the most of them and, for
each of its tenants, starts a write every 50 ms (each a fresh request, so one held by the frozen
node delays no other, and each tenant's from a loopback address of its own); prints, over those
tenants, the time from the freeze to the first acknowledgement of a write (p50, p99, max: when
the tenant took writes again), and the time from the freeze to the send of the earliest-sent
write that was acknowledged (a write sent before the tenant could take it may be held, by the
gateway's forward timeout and retry or by the new primary's prepare round, and answered later).
Then it resumes the node, waits until it is primary again, lets it serve for 2 s, and reads back
every acknowledged write at the end. With `--mib N` it first writes N MiB into each tenant (as rebuild
does), so that a new primary has that much to load before it serves. With `--freeze leader` each
run freezes the registry's leader instead, which adds an election before the node is marked down.

    python3 benches/failover/measure.py serial-reads --dev DIR --tenants 30 --runs 5

serial-reads (a cluster started with `sq-cloud dev --replicas 3`): makes the tenants, writes one
scroll of each, then per run starts a reader for each tenant of the node that is primary of the
most of them (one `select` at a time, the next sent when the last is answered, as a client
without concurrency reads), freezes that node a second later, and prints, over those readers,
the longest each waited between two answered reads around the freeze, and how many reads were
refused meanwhile. A read held by the frozen node is the one that counts: it is answered when the
gateway sends it to the new primary, or refused at the gateway's forward timeout.

    python3 benches/failover/measure.py rebuild --dev DIR --tenants 100 --mib 1

rebuild (a cluster started with `sq-cloud dev --replicas 3`): makes the tenants and writes MIB
MiB into each (in scrolls of 256 KiB), waits until every backup is in sync, then wipes one node's
tenant store (SIGSTOP, delete `store/tenants`, SIGKILL; the dev supervisor restarts it on an
empty store). Prints the time from the restart to the node's log line saying every copy it holds
is rebuilt, the bytes of snapshots it took (its `sq_rereplication_bytes_total`; the tenants it is
primary of it rebuilds by its prepare round, fetching records, which that does not count), and
MB/s; then reads back one scroll of every tenant.

admin-write: freezes or kills the registry leader (the dev supervisor is paused meanwhile, so a
killed leader stays down), then sends one admin write (add a tenant) at once, while another thread
polls health for the new leader. Prints the election time (freeze to a new leader in health) and
the routing time (new leader to the write's answer).
"""

import argparse
import http.client
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

INSTANT_503_S = 0.1
PROBE_EVERY_S = 0.05
REQUEST_TIMEOUT_S = 30
# How long a write may be held before its answer: the gateway's forward timeout (1.5 s) twice, as
# when it retries once on a new primary, with some to spare.
REQUEST_HELD_S = 3.5
# How long a returned node serves before the next run freezes it.
SETTLE_S = 2


def call(url, key, method="GET", body=None, timeout=REQUEST_TIMEOUT_S, source=None):
    """One request; `source` is the loopback address to send it from (plain HTTP only)."""
    data = None if body is None else json.dumps(body).encode()
    if source is not None and url.startswith("http://"):
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), body=data,
                         headers={"Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            return r.status, r.read().decode()
        except Exception as e:  # timeouts, refused connections
            return 0, str(e)
        finally:
            conn.close()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except Exception as e:  # timeouts, refused connections
        return 0, str(e)


class Cluster:
    def __init__(self, dev):
        self.dev = dev
        self.reload()

    def reload(self):
        with open(os.path.join(self.dev, "dev.json")) as f:
            self.json = json.load(f)
        self.api = self.json["gateway_url"] + "/api/v2"
        self.admin = self.json["admin_key"]

    def pid(self, node):
        self.reload()
        return next(n["pid"] for n in self.json["nodes"] if n["id"] == node)

    def health(self):
        status, body = call(self.api + "/admin/health", self.admin, timeout=5)
        return json.loads(body) if status == 200 else None

    def leader(self):
        h = self.health()
        return (h["raft"]["leader"], h["raft"]["term"]) if h else (None, None)


def wait(what, predicate, limit=120):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        v = predicate()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def summary(name, values):
    print(f"{name}: runs {['%.2f' % v for v in values]} median {statistics.median(values):.2f} s max {max(values):.2f} s")


def dead_node(c, runs):
    status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": f"fo{int(time.time())}"})
    assert status == 201, body
    tenant = json.loads(body)
    key = tenant["api_key"]
    call(c.api + "/update?p=x&c=1.1.1/1.1.1/1.1.1&s=y", key)
    times = []
    for run in range(runs):
        owner = json.loads(call(c.api + f"/admin/tenants/{tenant['tenant_id']}/stats", c.admin)[1])["node"]
        pid = c.pid(owner)
        os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        instant = []

        def probe():
            sent = time.monotonic()
            status, _ = call(c.api + "/select?p=x&c=1.1.1/1.1.1/1.1.1", key, timeout=10)
            if status == 503 and time.monotonic() - sent < INSTANT_503_S:
                instant.append(sent - frozen)

        # A request to a frozen owner waits the gateway's forward timeout, so one probe starts
        # every PROBE_EVERY_S rather than one after another: the figure's resolution.
        while not instant:
            threading.Thread(target=probe, daemon=True).start()
            time.sleep(PROBE_EVERY_S)
            if time.monotonic() - frozen > 60:
                raise SystemExit("no instant 503 within 60 s")
        times.append(min(instant))
        os.kill(pid, signal.SIGCONT)
        print(f"run {run + 1}: node {owner} frozen, first instant 503 after {times[-1]:.2f} s", flush=True)
        wait("the node serving again", lambda: call(c.api + "/select?p=x&c=1.1.1/1.1.1/1.1.1", key, timeout=5)[0] == 200)
        wait("every node alive", lambda: all(n["health"] == "alive" for n in (c.health() or {"nodes": [{"health": "-"}]})["nodes"]))
    summary("dead node known at the gateway (freeze to first instant 503)", times)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def team_tenants(c, tenants, prefix):
    """Adds `tenants` team tenants named PREFIX000...; returns their keys."""
    keys = {}
    for i in range(tenants):
        tid = f"{prefix}{i:03d}"
        status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": tid, "tier": "team"})
        if status == 201:
            keys[tid] = json.loads(body)["api_key"]
            # A long series of runs is not to be cut off by the daily limit.
            call(c.api + f"/admin/tenants/{tid}", c.admin, "PATCH", {"daily_limit": 100_000_000})
    if not keys:
        raise SystemExit("no tenant added (run on a fresh cluster)")
    return keys


def sources_for(keys):
    """A loopback address per tenant (127.0.1.1, 127.0.1.2, ...), as different clients' would be:
    requests held by a frozen node (up to the gateway's forward timeout each) would otherwise fill
    the gateway's cap of connections per address, and later ones be refused with them."""
    return {t: f"127.0.{1 + i // 250}.{1 + i % 250}" for i, t in enumerate(sorted(keys))}


def primaries_of(c, keys):
    """Each tenant's primary, from its stats."""
    return {t: json.loads(call(c.api + f"/admin/tenants/{t}/stats", c.admin)[1])["node"] for t in keys}


def busiest(primaries):
    """The node that is primary of the most tenants."""
    return max(set(primaries.values()), key=lambda n: list(primaries.values()).count(n))


def wait_back(c, node, moved):
    """Waits until `node` is primary of `moved` again and every node is up."""
    wait("the node primary again", lambda: all(
        json.loads(call(c.api + f"/admin/tenants/{t}/stats", c.admin, timeout=5)[1] or "{}").get("node") == node
        for t in moved))
    wait("every node up", lambda: (c.health() or {}).get("down") == [])


def tenant_failover(c, tenants, runs, mib=0, freeze="primary"):
    keys = team_tenants(c, tenants, "fo")
    if mib:
        fill(c, keys, mib)
    acked = {t: [] for t in keys}
    sources = sources_for(keys)
    counter = [0]
    lock = threading.Lock()

    def write(t, sent_at=None, firsts=None, earliest=None):
        with lock:
            counter[0] += 1
            k = counter[0]
        sent = time.monotonic()
        status, _ = call(c.api + f"/update?p=fo&c=1.1.1/1.1.{k // 1000 + 1}/1.1.{k % 1000 + 1}&s=v{k}", keys[t],
                         timeout=10, source=sources[t])
        answered = time.monotonic()
        if status == 200:
            with lock:
                acked[t].append(k)
                if firsts is not None and t not in firsts:
                    firsts[t] = answered - sent_at
                if earliest is not None:
                    earliest[t] = min(earliest.get(t, sent - sent_at), sent - sent_at)
        return status

    for t in keys:
        assert write(t) == 200
    all_times, all_sends = [], []
    for run in range(runs):
        # A node just marked up is not yet settled (its first lease rounds since); freeze one
        # that has been serving for a while.
        time.sleep(SETTLE_S)
        primaries = primaries_of(c, keys)
        if freeze == "leader":
            node = wait("a registry leader", lambda: c.leader()[0])
        else:
            node = busiest(primaries)
        moved = [t for t in keys if primaries[t] == node]
        firsts, earliest = {}, {}
        # Freezing the registry's leader adds an election before the node can be marked down.
        leads = "the registry leader" if c.leader()[0] == node else "a follower"
        pid = c.pid(node)
        os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        frozen_at = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        while len(firsts) < len(moved):
            for t in moved:
                if t not in firsts:
                    threading.Thread(target=write, args=(t, frozen, firsts, earliest), daemon=True).start()
            time.sleep(PROBE_EVERY_S)
            if time.monotonic() - frozen > 60:
                raise SystemExit(f"{len(moved) - len(firsts)} tenants took no write within 60 s")
        # Writes still held may yet be acknowledged, and sent earlier than any answered so far.
        time.sleep(REQUEST_HELD_S)
        os.kill(pid, signal.SIGCONT)
        times = [firsts[t] for t in moved]
        sends = [earliest[t] for t in moved]
        all_times += times
        all_sends += sends
        print(f"run {run + 1}: node {node} ({leads}) frozen at {frozen_at} UTC, {len(moved)} tenants: writes acknowledged again after "
              f"p50 {statistics.median(times):.2f} s, p99 {percentile(times, 99):.2f} s, max {max(times):.2f} s; "
              f"earliest acknowledged write sent after p50 {statistics.median(sends):.2f} s", flush=True)
        wait_back(c, node, moved)
    print(f"all runs, {len(all_times)} tenant failovers: writes acknowledged again after p50 "
          f"{statistics.median(all_times):.2f} s, p99 {percentile(all_times, 99):.2f} s, max {max(all_times):.2f} s; "
          f"earliest acknowledged write sent after p50 {statistics.median(all_sends):.2f} s, "
          f"p99 {percentile(all_sends, 99):.2f} s")
    time.sleep(1)
    lost = 0
    total = 0
    for t, ks in acked.items():
        for k in ks:
            total += 1
            path = f"/select?p=fo&c=1.1.1/1.1.{k // 1000 + 1}/1.1.{k % 1000 + 1}"
            for _ in range(50):
                status, body = call(c.api + path, keys[t], timeout=10)
                if status != 503:
                    break
                time.sleep(0.1)
            if (status, body) != (200, f"v{k}"):
                lost += 1
                print(f"  {t} write {k}: read {status} {body[:80]!r}")
    print(f"acknowledged writes read back: {total - lost} of {total} ({lost} lost)")
    if lost:
        raise SystemExit(1)


def serial_reads(c, tenants, runs):
    """Readers that wait for each answer before the next read, through a primary's freeze."""
    keys = team_tenants(c, tenants, "sr")
    sources = sources_for(keys)
    for t in keys:
        status, body = call(c.api + "/update?p=sr&c=1.1.1/1.1.1/1.1.1&s=v", keys[t], source=sources[t])
        assert status == 200, body
    all_stalls, all_refused = [], 0
    for run in range(runs):
        time.sleep(SETTLE_S)
        primaries = primaries_of(c, keys)
        node = busiest(primaries)
        moved = [t for t in keys if primaries[t] == node]
        stop = threading.Event()
        answers = {t: [] for t in moved}

        def reader(t):
            while not stop.is_set():
                status, body = call(c.api + "/select?p=sr&c=1.1.1/1.1.1/1.1.1", keys[t], timeout=10, source=sources[t])
                answers[t].append((time.monotonic(), status if status != 200 or body == "v" else -1))

        threads = [threading.Thread(target=reader, args=(t,), daemon=True) for t in moved]
        for th in threads:
            th.start()
        time.sleep(1)
        pid = c.pid(node)
        os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic()

        def read_sent_after(t):
            # Answered after the freeze, and sent after the read answered last before it.
            oks = [at for at, status in list(answers[t]) if status == 200]
            return len(oks) >= 2 and oks[-2] > frozen

        wait("every reader answered twice after the freeze", lambda: all(read_sent_after(t) for t in moved), limit=60)
        os.kill(pid, signal.SIGCONT)
        stop.set()
        for th in threads:
            th.join()

        def stall(t):
            # The longest a reader waited between two answered reads, around the freeze.
            oks = [at for at, status in answers[t] if status == 200]
            return max(b - a for a, b in zip(oks, oks[1:]) if b > frozen)

        stalls = [stall(t) for t in moved]
        refused = sum(1 for t in moved for at, status in answers[t] if at > frozen and status != 200)
        wrong = sum(1 for t in moved for _, status in answers[t] if status == -1)
        all_stalls += stalls
        all_refused += refused
        print(f"run {run + 1}: node {node} frozen, {len(moved)} readers: longest wait between two answered reads p50 "
              f"{statistics.median(stalls):.2f} s, max {max(stalls):.2f} s; {refused} reads refused; {wrong} wrong", flush=True)
        if wrong:
            raise SystemExit("a read answered a value never written")
        wait_back(c, node, moved)
    print(f"all runs, {len(all_stalls)} readers: longest wait between two answered reads p50 "
          f"{statistics.median(all_stalls):.2f} s, p99 {percentile(all_stalls, 99):.2f} s, max {max(all_stalls):.2f} s; "
          f"{all_refused} reads refused")


def fill(c, keys, mib):
    """Writes `mib` MiB into each tenant of `keys`: phext `data`, scrolls of 256 KiB."""
    scroll = "x" * (256 << 10)
    per_tenant = max(1, mib * 4)
    started = time.monotonic()
    for t, key in keys.items():
        for k in range(1, per_tenant + 1):
            url = c.api + f"/update?p=data&c=1.1.1/1.1.1/1.1.{k}"
            req = urllib.request.Request(url, data=scroll.encode(), method="POST")
            req.add_header("Authorization", f"Bearer {key}")
            for _ in range(50):
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        if r.status == 200:
                            break
                except Exception:
                    time.sleep(0.2)
            else:
                raise SystemExit(f"{t}: write {k} not acknowledged")
    loaded = len(keys) * per_tenant * 256 / 1024
    print(f"loaded {len(keys)} tenants, {loaded:.0f} MiB, in {time.monotonic() - started:.1f} s", flush=True)


def rebuild(c, tenants, mib):
    keys = {}
    for i in range(tenants):
        tid = f"rb{i:04d}"
        status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": tid, "tier": "team"})
        if status != 201:
            raise SystemExit(f"adding {tid}: {status} {body[:200]} (run on a fresh cluster)")
        keys[tid] = json.loads(body)["api_key"]
    fill(c, keys, mib)

    def in_sync(t):
        status, body = call(c.api + f"/admin/tenants/{t}/stats", c.admin, timeout=10)
        if status != 200:
            return False
        b = json.loads(body).get("backups", [])
        return len(b) == 2 and all(x["state"] == "in-sync" for x in b)

    wait("every backup in sync", lambda: all(in_sync(t) for t in keys), limit=600)
    stats = json.loads(call(c.api + f"/admin/tenants/{next(iter(keys))}/stats", c.admin)[1])
    victim = stats["backups"][0]["node"]
    pid = c.pid(victim)
    log = os.path.join(c.dev, f"node-{victim}.log")
    before = os.path.getsize(log)
    os.kill(pid, signal.SIGSTOP)
    import shutil
    shutil.rmtree(os.path.join(c.dev, f"node-{victim}", "store", "tenants"))
    os.kill(pid, signal.SIGKILL)
    os.kill(pid, signal.SIGCONT)
    wiped = time.monotonic()
    wait("the node restarted", lambda: c.pid(victim) != pid)
    restarted = time.monotonic()

    shown = [0.0]

    def show_progress():
        """The victim's rebuild as `admin cluster health` shows it (gathered from every node)."""
        for r in (c.health() or {}).get("rebuilds", []):
            if r["node"] == victim:
                print(f"  health {time.monotonic() - restarted:5.1f} s after the restart: "
                      f"{r['copies_left']} of {r['copies_total']} copies left, "
                      f"{r['bytes_taken'] / 1e6:.1f} MB of snapshots, done {r['done']}", flush=True)

    def rebuilt():
        if time.monotonic() - shown[0] >= 2:
            shown[0] = time.monotonic()
            show_progress()
        with open(log, errors="replace") as f:
            f.seek(before)
            return "every copy this node holds is rebuilt" in f.read()

    wait("every copy rebuilt", rebuilt, limit=3600)
    done = time.monotonic()
    time.sleep(1)
    show_progress()
    def taken_bytes():
        _, text = call(c.api + "/metrics", c.admin, timeout=10)
        for line in text.splitlines():
            if line.startswith("sq_rereplication_bytes_total") and f'node="{victim}"' in line:
                return float(line.split()[-1])
        return 0.0

    # The gateway scrapes each node when asked; the restarted node's series may lag a scrape.
    taken = wait("the node's rebuild bytes in the metrics", taken_bytes, limit=30)
    secs = done - restarted
    print(f"node {victim} wiped; restarted {restarted - wiped:.2f} s later; every copy rebuilt "
          f"{secs:.2f} s after the restart: {taken / 1e6:.1f} MB taken, {taken / 1e6 / secs:.1f} MB/s")
    bad = 0
    for t, key in keys.items():
        s, body = call(c.api + "/select?p=data&c=1.1.1/1.1.1/1.1.1", key, timeout=30)
        if (s, body) != (200, scroll):
            bad += 1
    print(f"read back: {tenants - bad} of {tenants} tenants whole")
    if bad:
        raise SystemExit(1)


def admin_write(c, runs, how, dev_pid):
    elections, routings, totals = [], [], []
    if how == "kill" and not dev_pid:
        raise SystemExit("--how kill needs --supervisor PID (the `sq-cloud dev` process)")
    for run in range(runs):
        # One health answer for both: a second call could land in an election and name no leader.
        leader, term = wait("a leader", lambda: (seen := c.leader())[0] is not None and seen)
        pid = c.pid(leader)
        if how == "kill" and dev_pid:
            os.kill(dev_pid, signal.SIGSTOP)
        elected = {}

        def watch():
            while "t" not in elected:
                h = c.health()
                if h and h["raft"]["leader"] not in (None, leader) and h["raft"]["term"] > term:
                    elected["t"] = time.monotonic()
                    return
                time.sleep(0.05)

        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        watcher = threading.Thread(target=watch)
        watcher.start()
        status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": f"w{how}{run}{int(t0)}"})
        done = time.monotonic()
        watcher.join(timeout=30)
        elected.setdefault("t", done)
        if how == "kill":
            if dev_pid:
                os.kill(dev_pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGCONT)
        assert status == 201, (status, body)
        elections.append(elected["t"] - t0)
        routings.append(max(0.0, done - elected["t"]))
        totals.append(done - t0)
        print(f"run {run + 1}: {how} leader {leader}: write answered after {totals[-1]:.2f} s (election {elections[-1]:.2f} s, routing {routings[-1]:.2f} s)", flush=True)
        wait("every node alive", lambda: (h := c.health()) and all(n["health"] == "alive" for n in h["nodes"]))
        time.sleep(3)
    summary(f"admin write after {how} of the leader, total", totals)
    summary("  of which election", elections)
    summary("  of which routing", routings)


def drain_leader(binary, runs, port):
    import shutil
    import subprocess
    import tempfile
    drains, writes, removals, moved = [], [], [], []
    for run in range(runs):
        data = tempfile.mkdtemp(prefix="sq-drain-leader.")
        dev = subprocess.Popen([binary, "dev", "--data", os.path.join(data, "dev"), "--listen", f"127.0.0.1:{port + 10 * run}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait("dev.json", lambda: os.path.exists(os.path.join(data, "dev", "dev.json")))
            c = Cluster(os.path.join(data, "dev"))
            wait("three voters and a leader", lambda: (h := c.health()) and h["raft"]["leader"] and sum(n.get("raft") == "voter" and n["health"] == "alive" for n in h["nodes"]) == 3)
            time.sleep(3)
            leader, term = c.leader()
            t0 = time.monotonic()
            status, body = call(c.api + f"/admin/nodes/{leader}/drain", c.admin, "POST", {})
            t1 = time.monotonic()
            assert status in (200, 202), (status, body)
            status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": f"after-drain{run}"})
            t2 = time.monotonic()
            assert status == 201, (status, body)
            new_leader, new_term = wait("a leader", lambda: (seen := c.leader())[0] is not None and seen)
            wait("no pending handoff", lambda: (h := c.health()) and h["handoffs"]["pending"] == 0)
            t3 = time.monotonic()
            status, body = call(c.api + f"/admin/nodes/{leader}", c.admin, "DELETE")
            assert status in (200, 202, 204), (status, body)
            status, body = call(c.api + "/admin/tenants/add", c.admin, "POST", {"tenant_id": f"after-remove{run}"})
            t4 = time.monotonic()
            assert status == 201, (status, body)
            drains.append(t1 - t0)
            writes.append(t2 - t1)
            removals.append(t4 - t3)
            moved.append(new_leader != leader)
            print(f"run {run + 1}: drained leader {leader} (term {term}): drain answered in {t1 - t0:.2f} s, "
                  f"then an admin write in {t2 - t1:.2f} s; leader now {new_leader} (term {new_term}); "
                  f"its removal and an admin write after it: {t4 - t3:.2f} s", flush=True)
        finally:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(timeout=30)
            except subprocess.TimeoutExpired:
                dev.kill()
            shutil.rmtree(data, ignore_errors=True)
    summary("drain of the leader, answered", drains)
    summary("  then an admin write", writes)
    summary("removal of the drained node, then an admin write", removals)
    print(f"leadership moved in {sum(moved)} of {len(moved)} runs")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["dead-node", "admin-write", "drain-leader", "tenant-failover", "serial-reads", "rebuild"])
    p.add_argument("--tenants", type=int, default=30)
    p.add_argument("--mib", type=int, help="MiB written into each tenant first (rebuild: default 1; tenant-failover: default 0)")
    p.add_argument("--bin", default="target/release/sq-cloud")
    p.add_argument("--port", type=int, default=28600)
    p.add_argument("--dev", default="sq-cloud-dev")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--how", choices=["kill", "freeze"], default="freeze")
    p.add_argument("--freeze", choices=["primary", "leader"], default="primary",
                   help="tenant-failover: the node frozen each run, the primary of the most tenants or the registry leader")
    p.add_argument("--supervisor", type=int, help="pid of `sq-cloud dev`, paused while a killed leader is down")
    a = p.parse_args()
    if a.what == "drain-leader":
        return drain_leader(a.bin, a.runs, a.port)
    c = Cluster(a.dev)
    if a.what == "dead-node":
        dead_node(c, a.runs)
    elif a.what == "tenant-failover":
        tenant_failover(c, a.tenants, a.runs, a.mib or 0, a.freeze)
    elif a.what == "serial-reads":
        serial_reads(c, a.tenants, a.runs)
    elif a.what == "rebuild":
        rebuild(c, a.tenants, 1 if a.mib is None else a.mib)
    else:
        admin_write(c, a.runs, a.how, a.supervisor)


if __name__ == "__main__":
    main()
