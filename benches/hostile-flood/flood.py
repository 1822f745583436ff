#!/usr/bin/env python3
"""Connection floods from one address against a running gateway, and a fresh client beside them.

    python3 flood.py HOST:PORT KEY [--tls CA.pem] [--idle 5000] [--trickle 500]

Opens TRICKLE connections from 127.0.0.2 that send part of a request head and then one byte a
second (inside TLS with --tls), then IDLE TCP connections from 127.0.0.2 that send nothing. From
the moment the trickling connections are open until 3 s after the idle ones are, a prober makes a
normal request from 127.0.0.1 every 0.5 s, each on a fresh connection (TLS handshake included),
and the script prints their median and maximum latency and how many flood connections the
gateway holds and has closed. Exits non-zero if a normal request fails or takes 1 s or more.
Raises its own open-file
limit to the hard limit. Start the gateway with e.g.
`sq-cloud dev --nodes 1 --data DIR --listen 127.0.0.1:18700 [--tls]`; KEY is dev.json's
demo_key, CA.pem is DIR/certs/ca.pem.
"""
import argparse, resource, socket, ssl, sys, threading, time

FLOOD_SRC = "127.0.0.2"
NORMAL_SRC = "127.0.0.1"

ap = argparse.ArgumentParser()
ap.add_argument("addr"); ap.add_argument("key")
ap.add_argument("--tls"); ap.add_argument("--idle", type=int, default=5000)
ap.add_argument("--trickle", type=int, default=500)
a = ap.parse_args()
host, port = a.addr.rsplit(":", 1); port = int(port)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = None
if a.tls:
    ctx = ssl.create_default_context(cafile=a.tls)

def connect(src, tls):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0)); s.settimeout(5); s.connect((host, port))
    if tls and ctx:
        s = ctx.wrap_socket(s, server_hostname=host)
    return s

t0 = time.time()
trickle = []
for _ in range(a.trickle):
    try:
        s = connect(FLOOD_SRC, True)
        s.sendall(b"GET /api/v2/select?p=flood&c=1.1.1/1.1.1/1.1.1")
        trickle.append(s)
    except OSError:
        pass  # refused by the cap per address: counted below as closed
results = []
def normal():
    s = connect(NORMAL_SRC, True)
    s.sendall(f"GET /api/v2/select?p=flood&c=1.1.1/1.1.1/1.1.1 HTTP/1.1\r\nHost: {a.addr}\r\nAuthorization: Bearer {a.key}\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    while True:
        try: d = s.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError): break
        if not d: break
        buf += d
    return buf.split(b"\r\n", 1)[0].decode(errors="replace")
stop = False
def prober():
    # A normal request from another address every 0.5 s while the flood is opened and held.
    while not stop:
        t = time.perf_counter()
        try: status = normal()
        except OSError as e: status = f"error {e}"
        results.append((status, (time.perf_counter() - t) * 1000))
        time.sleep(0.5)
def trickler():
    while not stop:
        for s in trickle:
            try: s.send(b"1")
            except (OSError, ValueError): pass
        time.sleep(1)
threading.Thread(target=trickler, daemon=True).start()
probe = threading.Thread(target=prober); probe.start()
idle = []
for _ in range(a.idle):
    try:
        idle.append(connect(FLOOD_SRC, False))
    except OSError:
        pass
print(f"opened {len(trickle)} trickling and {len(idle)} idle connections from {FLOOD_SRC} in {time.time()-t0:.1f} s")

def closed(s):
    try:
        s.setblocking(False)
        return s.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        try: s.setblocking(True)
        except OSError: pass

n_closed = sum(closed(s) for s in idle + trickle) + (a.trickle - len(trickle)) + (a.idle - len(idle))
print(f"just after: gateway closed {n_closed} of {a.idle + a.trickle} flood connections; holds {a.idle + a.trickle - n_closed}")
time.sleep(3)
stop = True
probe.join()
lat = sorted(ms for _, ms in results)
bad = [r for r in results if not r[0].startswith("HTTP/1.1 200") or r[1] >= 1000]
print(f"{len(results)} normal requests from {NORMAL_SRC} during the flood: median {lat[len(lat)//2]:.1f} ms, max {lat[-1]:.1f} ms, {len(bad)} failed or over 1 s")
for r in bad[:5]: print("  ", r)
ok = not bad
sys.exit(0 if ok else 1)
