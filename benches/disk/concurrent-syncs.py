#!/usr/bin/env python3
"""How many log syncs a second this machine's disk takes when many threads sync many files at
once, as a node's blocking threads do under replicated updates (one log per tenant copy).

    python3 benches/disk/concurrent-syncs.py [DIR] [THREADS] [SECONDS]

Makes 96 files of 1 MB in DIR (default: a temporary directory beside this machine's data, under
/tmp), then THREADS threads (default 45) each pick a random file, write a 1,100-byte record at its
end and `fdatasync` it, for SECONDS (default 5), in two modes in turn:

- append: every record grows the file, as the store's log segments do;
- zeros-ahead: the file is extended by 64 KiB of zeros whenever a record would pass its end, so
  most syncs change no file length.

Prints the syncs a second and the process's CPU per sync for each mode.
"""
import os
import random
import shutil
import sys
import tempfile
import threading
import time

FILES = 96
RECORD = b"r" * 1100
AHEAD = 65536


def run(root, mode, threads, seconds):
    d = os.path.join(root, mode)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    fds, ends, allocated = [], [], []
    locks = [threading.Lock() for _ in range(FILES)]
    for i in range(FILES):
        fd = os.open(os.path.join(d, f"{i}.log"), os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 1_000_000)
        os.fsync(fd)
        fds.append(fd)
        ends.append(1_000_000)
        allocated.append(1_000_000)
    counts = []
    stop = time.time() + seconds

    def work(seed):
        rng = random.Random(seed)
        n = 0
        while time.time() < stop:
            i = rng.randrange(FILES)
            with locks[i]:
                data = RECORD
                if mode == "zeros-ahead" and ends[i] + len(RECORD) > allocated[i]:
                    data = RECORD + bytes(AHEAD)
                    allocated[i] = ends[i] + len(data)
                os.pwrite(fds[i], data, ends[i])
                ends[i] += len(RECORD)
                os.fdatasync(fds[i])
            n += 1
        counts.append(n)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    before = os.times()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    after = os.times()
    for fd in fds:
        os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
    syncs = sum(counts)
    cpu = after.user - before.user + after.system - before.system
    print(f"{mode:12} {threads} threads: {syncs / seconds:8.0f} syncs/s, {cpu * 1e6 / syncs:4.0f} µs of CPU per sync")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="concurrent-syncs-", dir="/tmp")
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 45
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 5
    for mode in ("append", "zeros-ahead", "append", "zeros-ahead"):
        run(root, mode, threads, seconds)
    if len(sys.argv) <= 1:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
