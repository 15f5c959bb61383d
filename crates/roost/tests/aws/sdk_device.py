"""A device using the AWS IoT Device SDK for Python v2 (awsiotsdk, on the
AWS Common Runtime's MQTT client) and its shadow client, unchanged except
that it connects to the hub over plain MQTT with a name and password:
the SDK parses every document the hub answers with.

Usage: sdk_device.py HOST PORT THING PASSWORD."""
import sys
import threading

from awscrt import io, mqtt
from awsiot import iotshadow

host, port, thing, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
elg = io.EventLoopGroup(1)
bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
conn = mqtt.Connection(
    client=mqtt.Client(bootstrap, None),
    host_name=host,
    port=port,
    client_id=thing,
    username=thing,
    password=password,
    clean_session=True,
    keep_alive_secs=30,
)
conn.connect().result(10)
shadow = iotshadow.IotShadowClient(conn)
QOS = mqtt.QoS.AT_LEAST_ONCE
got = {}
events = {}


def on(name):
    events[name] = threading.Event()

    def cb(response):
        got[name] = response
        events[name].set()
    return cb


def wait(name):
    assert events[name].wait(10), f"no {name} within 10 s"
    events[name].clear()
    return got.pop(name)


for sub, req, name in [
    (shadow.subscribe_to_update_shadow_accepted, iotshadow.UpdateShadowSubscriptionRequest, "update_accepted"),
    (shadow.subscribe_to_update_shadow_rejected, iotshadow.UpdateShadowSubscriptionRequest, "update_rejected"),
    (shadow.subscribe_to_shadow_delta_updated_events, iotshadow.ShadowDeltaUpdatedSubscriptionRequest, "delta"),
    (shadow.subscribe_to_shadow_updated_events, iotshadow.ShadowUpdatedSubscriptionRequest, "documents"),
    (shadow.subscribe_to_get_shadow_accepted, iotshadow.GetShadowSubscriptionRequest, "get_accepted"),
    (shadow.subscribe_to_delete_shadow_accepted, iotshadow.DeleteShadowSubscriptionRequest, "delete_accepted"),
]:
    future, _ = sub(request=req(thing_name=thing), qos=QOS, callback=on(name))
    future.result(10)
future, _ = shadow.subscribe_to_update_named_shadow_accepted(
    request=iotshadow.UpdateNamedShadowSubscriptionRequest(thing_name=thing, shadow_name="config"),
    qos=QOS, callback=on("named_accepted"))
future.result(10)

shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
    thing_name=thing, client_token="sdk-1",
    state=iotshadow.ShadowState(desired={"speed": 3}, reported={"speed": 1})), QOS).result(10)
accepted = wait("update_accepted")
assert accepted.client_token == "sdk-1" and accepted.version == 1, accepted
assert accepted.state.desired == {"speed": 3}, accepted
assert accepted.timestamp is not None, accepted
delta = wait("delta")
assert delta.state == {"speed": 3} and delta.version == 1, delta
docs = wait("documents")
assert docs.current.state.reported == {"speed": 1} and docs.current.version == 1, docs

shadow.publish_get_shadow(iotshadow.GetShadowRequest(thing_name=thing, client_token="sdk-2"), QOS).result(10)
doc = wait("get_accepted")
assert doc.client_token == "sdk-2" and doc.state.delta == {"speed": 3}, doc
assert doc.metadata.desired["speed"]["timestamp"] > 0, doc

shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
    thing_name=thing, client_token="sdk-3", version=99,
    state=iotshadow.ShadowState(reported={"speed": 3})), QOS).result(10)
rejected = wait("update_rejected")
assert rejected.code == 409 and rejected.client_token == "sdk-3", rejected

shadow.publish_update_named_shadow(iotshadow.UpdateNamedShadowRequest(
    thing_name=thing, shadow_name="config", client_token="sdk-4",
    state=iotshadow.ShadowState(reported={"mode": "eco"})), QOS).result(10)
named = wait("named_accepted")
assert named.client_token == "sdk-4" and named.state.reported == {"mode": "eco"}, named

shadow.publish_delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing, client_token="sdk-5"), QOS).result(10)
deleted = wait("delete_accepted")
assert deleted.client_token == "sdk-5" and deleted.version == 1, deleted
conn.disconnect().result(10)
print("sdk device: all checks passed")
