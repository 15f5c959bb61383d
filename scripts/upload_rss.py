"""RSS of a roost hub while N clients (curl) upload a SIZE_MIB body to
POST /v1/deployments at once (random bytes: each is received whole, then
refused as not a package). Prints the hub's VmRSS at rest, at its peak and
after, with the status each client got.

Usage: upload_rss.py ROOST_BIN SIZE_MIB N [extra hub args...]
e.g.   upload_rss.py target/release/roost 250 6"""
import json, os, subprocess, sys, tempfile, threading, time
binary, size_mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
extra = sys.argv[4:]
d = tempfile.mkdtemp()
path = d + "/upload.bin"
with open(path, "wb") as f:
    for _ in range(size_mib):
        f.write(os.urandom(1 << 20))
hub = subprocess.Popen([binary, "hub", "--data-dir", d + "/data", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--task-identities", "off", *extra],
                       stderr=open(d + "/log", "w"))
ep = d + "/data/endpoints.json"
while not os.path.exists(ep):
    time.sleep(0.05)
time.sleep(0.5)
url = json.load(open(ep))["url"]
def rss():
    for l in open(f"/proc/{hub.pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) // 1024
base = rss()
peak = [base]
done = False
def sample():
    while not done:
        peak[0] = max(peak[0], rss()); time.sleep(0.01)
t = threading.Thread(target=sample); t.start()
started = time.time()
procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@" + path, url + "/v1/deployments"],
                          stdout=subprocess.PIPE) for _ in range(n)]
codes = [p.communicate()[0].decode() for p in procs]
elapsed = time.time() - started
time.sleep(0.3)
done = True; t.join()
after = rss()
hub.kill(); hub.wait()
os.remove(path)
print(json.dumps({"n": n, "size_mib": size_mib, "rss_base_mib": base, "rss_peak_mib": peak[0], "rss_after_mib": after, "codes": codes, "elapsed_s": round(elapsed, 1)}))
