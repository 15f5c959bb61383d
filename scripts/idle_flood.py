"""A hub under RLIMIT_NOFILE 1024 (systemd's default) with 1,100 idle HTTP
connections: does an MQTT publish (mosquitto_pub, QoS 1) still get through,
does /healthz answer, and how many warnings the hub logged. Needs prlimit,
mosquitto_pub and curl.

Usage: idle_flood.py ROOST_BIN"""
import json, os, resource, socket, subprocess, sys, tempfile, time
binary = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
d = tempfile.mkdtemp()
hub = subprocess.Popen(["prlimit", "--nofile=1024:1024", binary, "hub", "--data-dir", d + "/data", "--http", "127.0.0.1:0",
                        "--mqtt", "127.0.0.1:0", "--task-identities", "off", "--allow-anonymous"], stderr=open(d + "/log", "w"))
ep = d + "/data/endpoints.json"
while not os.path.exists(ep):
    time.sleep(0.05)
time.sleep(0.5)
e = json.load(open(ep))
host, port = e["http"].rsplit(":", 1)
mhost, mport = e["mqtt"].rsplit(":", 1)
held = []
for _ in range(1100):
    s = socket.create_connection((host, int(port)))
    held.append(s)
time.sleep(1)
t = time.time()
mq = subprocess.run(["timeout", "10", "mosquitto_pub", "-h", mhost, "-p", mport, "-t", "x", "-m", "y", "-q", "1"], capture_output=True)
mq_s = time.time() - t
t = time.time()
hz = subprocess.run(["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", f"http://{e['http']}/healthz"], capture_output=True)
hz_s = time.time() - t
time.sleep(0.5)
hub.kill(); hub.wait()
log = open(d + "/log").read()
print(json.dumps({"mqtt_ok": mq.returncode == 0, "mqtt_s": round(mq_s, 2), "healthz": hz.stdout.decode(), "healthz_s": round(hz_s, 2),
                  "warn_lines": sum(1 for l in log.splitlines() if "WARN" in l), "accept_failed_lines": log.count("accept failed")}))
