"""A device speaks to its shadow over MQTT the way the AWS IoT Device SDK
does: subscribe to the response topics, publish requests, match replies by
clientToken. Uses paho-mqtt (MQTT 3.1.1), a client we did not write.

Usage: device.py HOST PORT PASSWORD."""
import json
import queue
import sys

import paho.mqtt.client as mqtt

host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
thing = "lamp-1"
prefix = f"$aws/things/{thing}/shadow"
inbox = queue.Queue()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing, protocol=mqtt.MQTTv311)
c.username_pw_set(thing, password)
c.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload))
c.connect(host, port)
c.loop_start()
subs = [f"{prefix}/{op}/{r}" for op in ("get", "update", "delete") for r in ("accepted", "rejected")]
subs += [f"{prefix}/update/delta", f"{prefix}/update/documents", "lamp/deltas"]
for t in subs:
    c.subscribe(t, qos=1)[1]
import time  # noqa: E402
time.sleep(0.5)


def request(op, body, want):
    """Publishes a request and returns {topic suffix: document} of the
    replies until every topic in `want` has answered."""
    c.publish(f"{prefix}/{op}", json.dumps(body) if isinstance(body, dict) else body, qos=1).wait_for_publish(5)
    got = {}
    deadline = time.time() + 10
    while not set(want) <= set(got):
        left = deadline - time.time()
        assert left > 0, f"waited for {want}, got {sorted(got)}"
        topic, payload = inbox.get(timeout=left)
        if topic.startswith(prefix):
            got[topic[len(prefix) + 1:]] = json.loads(payload)
        else:
            got[topic] = json.loads(payload)
    return got


r = request("update", {"state": {"desired": {"color": "red"}, "reported": {"color": "blue"}}, "clientToken": "c1"},
            ["update/accepted", "update/delta", "update/documents"])
assert r["update/accepted"]["clientToken"] == "c1" and r["update/accepted"]["version"] == 1, r
assert r["update/delta"]["state"] == {"color": "red"}, r
assert r["update/documents"]["current"]["state"]["reported"] == {"color": "blue"}, r
r = request("get", {"clientToken": "c2"}, ["get/accepted"])
assert r["get/accepted"]["state"]["delta"] == {"color": "red"} and r["get/accepted"]["clientToken"] == "c2", r
r = request("update", {"state": {"reported": {"color": "red"}}, "version": 5, "clientToken": "c3"}, ["update/rejected"])
assert r["update/rejected"]["code"] == 409 and r["update/rejected"]["clientToken"] == "c3", r
r = request("update", "{not json", ["update/rejected"])
assert r["update/rejected"]["code"] == 400, r
# The route shadow:lamp-1 -> task:echo -> device:lamp/deltas carries the delta.
r = request("update", {"state": {"desired": {"level": 7}}}, ["update/accepted", "lamp/deltas"])
assert r["lamp/deltas"]["state"]["level"] == 7, r
r = request("delete", {"clientToken": "c4"}, ["delete/accepted"])
assert r["delete/accepted"]["version"] == 2 and r["delete/accepted"]["clientToken"] == "c4", r
r = request("get", "", ["get/rejected"])
assert r["get/rejected"]["code"] == 404, r
# Another thing's shadow is outside this device's policy: no reply comes.
c.publish("$aws/things/other/shadow/update", '{"state":{"desired":{"x":1}}}', qos=1).wait_for_publish(5)
# Answers are the hub's alone: a forged /accepted never reaches anyone.
c.publish(f"{prefix}/update/accepted", '{"forged":true}', qos=1).wait_for_publish(5)
r = request("update", {"state": {"reported": {"color": "green"}}, "clientToken": "c5"}, ["update/accepted"])
assert r["update/accepted"].get("clientToken") == "c5" and r["update/accepted"]["version"] == 3, r
c.loop_stop()
print("device: all checks passed")
