"""Before/after figures for the broker's bounded client state (issue 10,
items 2 and 3): SUBSCRIBE + UNSUBSCRIBE round trips per second with none
vs N retained messages, and the hub's RSS under a flood of QoS 1 messages
to a persistent subscriber that never sends PUBACK. Raw MQTT 3.1.1 over
loopback, standard library only.

Usage: python3 scripts/bench_mqtt_bounds.py ROOST_BINARY RETAINED FLOOD [old|new]
("new" passes --mqtt-retained-per-device so one client may retain RETAINED;
an older hub has no such flag and no such limit). For example, the figures
in BENCHMARKS.md: RETAINED=20000 FLOOD=30000, run once with the binary
built before the change and once after."""
import json, os, socket, struct, subprocess, sys, tempfile, threading, time, urllib.request

def varint(n):
    out = bytearray()
    while True:
        b = n % 128; n //= 128
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)

def pkt(first, body): return bytes([first]) + varint(len(body)) + body
def s16(s): b = s.encode(); return struct.pack("!H", len(b)) + b

class Conn:
    def __init__(self, addr, cid, clean=True):
        h, p = addr.rsplit(":", 1)
        self.s = socket.create_connection((h, int(p)))
        self.buf = b""
        self.s.sendall(pkt(0x10, b"\x00\x04MQTT\x04" + bytes([2 if clean else 0]) + b"\x00\x3c" + s16(cid)))
        first, body = self.next()
        assert first == 0x20 and body[1] == 0, (first, body)
    def next(self):
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]; n += (b & 0x7f) * mult; mult *= 128; i += 1
                    if not b & 0x80: break
                else:
                    i = None
                if i and len(self.buf) >= i + n and not (self.buf[i-1] & 0x80):
                    first, body = self.buf[0], self.buf[i:i+n]
                    self.buf = self.buf[i+n:]
                    return first, body
            d = self.s.recv(1 << 16)
            if not d: return None, None
            self.buf += d

def start(binary, args):
    d = tempfile.mkdtemp()
    log = open(os.path.join(d, "hub.log"), "w")
    p = subprocess.Popen([binary, "hub", "--data-dir", os.path.join(d, "data"), "--http", "127.0.0.1:0",
                          "--mqtt", "127.0.0.1:0", "--task-identities", "off", "--allow-anonymous"] + args,
                         stdout=subprocess.DEVNULL, stderr=log)
    ep = os.path.join(d, "data", "endpoints.json")
    for _ in range(600):
        try:
            e = json.load(open(ep)); urllib.request.urlopen(e["url"] + "/healthz"); return p, e
        except Exception: time.sleep(0.05)
    raise SystemExit("hub did not start")

def rss_mib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1]) / 1024

def metrics(e):
    return urllib.request.urlopen(e["url"] + "/metrics").read().decode()

def metric(e, name):
    for l in metrics(e).splitlines():
        if l.startswith(name + " "): return float(l.split()[1])
    return None

def sub_rate(addr, secs=2.0):
    c = Conn(addr, "rate")
    n, t0 = 0, time.time()
    while time.time() - t0 < secs:
        pid = n % 60000 + 1
        c.s.sendall(pkt(0x82, struct.pack("!H", pid) + s16("elsewhere/+/x") + b"\x00"))
        assert c.next()[0] == 0x90
        c.s.sendall(pkt(0xA2, struct.pack("!H", pid) + s16("elsewhere/+/x")))
        assert c.next()[0] == 0xB0
        n += 1
    return n / (time.time() - t0)

def retained_bench(binary, n):
    p, e = start(binary, ["--mqtt-retained-per-device", "1000000"] if sys.argv[4:] == ["new"] else [])
    try:
        addr = e["mqtt"]
        none = sub_rate(addr)
        c = Conn(addr, "filler")
        burst = bytearray()
        for i in range(n):
            burst += pkt(0x31, s16(f"many/{i}") + b"retained")
            if len(burst) > 65536: c.s.sendall(burst); burst = bytearray()
        c.s.sendall(burst)
        while (metric(e, "roost_mqtt_retained") or 0) < n: time.sleep(0.1)
        many = sub_rate(addr)
        print(f"subscribe+unsubscribe/s: none retained {none:.0f}, {n} retained {many:.0f}, ratio {many/none:.3f}")
    finally:
        p.kill(); p.wait()

def flood_bench(binary, n):
    p, e = start(binary, ["--mqtt-outgoing-buffer", "1000", "--mqtt-slow-client-grace-s", "1", "--mqtt-session-queue", "2000"])
    try:
        addr = e["mqtt"]
        h = Conn(addr, "hoarder", clean=False)
        h.s.sendall(pkt(0x82, b"\x00\x01" + s16("flood/#") + b"\x01"))
        assert h.next()[0] == 0x90
        got = [0]
        def hoard():
            while True:
                f, _ = h.next()
                if f is None: return
                if f >> 4 == 3: got[0] += 1
        threading.Thread(target=hoard, daemon=True).start()
        before = rss_mib(p.pid)
        pub = Conn(addr, "flooder")
        sem = threading.Semaphore(500)
        def acks():
            for _ in range(n):
                f, _ = pub.next(); sem.release()
        t = threading.Thread(target=acks); t.start()
        payload = b"y" * 2000
        t0 = time.time()
        for i in range(n):
            sem.acquire()
            pub.s.sendall(pkt(0x32, s16("flood/bulk") + struct.pack("!H", i % 60000 + 1) + payload))
        t.join()
        took = time.time() - t0
        time.sleep(0.5)
        after = rss_mib(p.pid)
        m = metrics(e)
        def val(name):
            for l in m.splitlines():
                if l.startswith(name + " "): return l.split()[1]
        print(f"never-PUBACK flood {n} x 2 kB QoS 1 in {took:.1f} s: RSS {before:.1f} -> {after:.1f} MiB (+{after-before:.1f}); "
              f"subscriber got {got[0]}; dropped_slow_client {val('roost_mqtt_dropped_slow_client_total')}, slow_clients_dropped {val('roost_mqtt_slow_clients_dropped_total')}")
    finally:
        p.kill(); p.wait()

if __name__ == "__main__":
    binary = sys.argv[1]
    retained_bench(binary, int(sys.argv[2]))
    flood_bench(binary, int(sys.argv[3]))
