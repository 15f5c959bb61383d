"""The hub's owner drives the local AWS APIs with boto3 and the hub's own
profile files (DATA_DIR/aws-credentials, DATA_DIR/aws-config), exactly as
any SDK user would: no endpoint or key in the code.

Usage: owner.py DATA_DIR. Exits non-zero at the first surprise."""
import base64
import json
import os
import sys

data_dir = sys.argv[1]
os.environ.update(
    AWS_SHARED_CREDENTIALS_FILE=os.path.join(data_dir, "aws-credentials"),
    AWS_CONFIG_FILE=os.path.join(data_dir, "aws-config"),
    AWS_PROFILE="roost",
)
for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"):
    os.environ.pop(k, None)

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402

session = boto3.Session()
iot = session.client("iot-data")
lam = session.client("lambda")
sm = session.client("secretsmanager")


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e}"
        return e
    raise AssertionError(f"expected {code}, the call succeeded")


def doc(resp):
    return json.loads(resp["payload"].read())


# Shadows: create, delta, metadata, version, clientToken.
r = doc(iot.update_thing_shadow(
    thingName="lamp",
    payload=json.dumps({"state": {"desired": {"on": True, "level": 3}}, "clientToken": "t-1"}),
))
assert r["version"] == 1 and r["clientToken"] == "t-1", r
assert r["metadata"]["desired"]["on"]["timestamp"] > 0, r
g = doc(iot.get_thing_shadow(thingName="lamp"))
assert g["state"]["delta"] == {"on": True, "level": 3}, g
r = doc(iot.update_thing_shadow(
    thingName="lamp", payload=json.dumps({"state": {"reported": {"on": True, "level": 3}}, "version": 1})
))
assert r["version"] == 2, r
g = doc(iot.get_thing_shadow(thingName="lamp"))
assert "delta" not in g["state"], g
# A stale version is a conflict and changes nothing.
expect_error("ConflictException", iot.update_thing_shadow, thingName="lamp",
             payload=json.dumps({"state": {"desired": {"on": False}}, "version": 1}))
assert doc(iot.get_thing_shadow(thingName="lamp"))["version"] == 2
# null deletes a key.
r = doc(iot.update_thing_shadow(thingName="lamp", payload=json.dumps({"state": {"desired": {"level": None}}})))
g = doc(iot.get_thing_shadow(thingName="lamp"))
assert g["state"]["desired"] == {"on": True}, g

# Named shadows, listed with pages.
for n in ("cfg", "net", "power"):
    iot.update_thing_shadow(thingName="lamp", shadowName=n, payload=b'{"state":{"reported":{"x":1}}}')
page = iot.list_named_shadows_for_thing(thingName="lamp", pageSize=2)
assert page["results"] == ["cfg", "net"] and page["nextToken"], page
rest = iot.list_named_shadows_for_thing(thingName="lamp", pageSize=2, nextToken=page["nextToken"])
assert rest["results"] == ["power"] and "nextToken" not in rest, rest
d = doc(iot.delete_thing_shadow(thingName="lamp", shadowName="net"))
assert d["version"] == 1, d
expect_error("ResourceNotFoundException", iot.get_thing_shadow, thingName="lamp", shadowName="net")
assert iot.list_named_shadows_for_thing(thingName="lamp")["results"] == ["cfg", "power"]
# A deleted shadow's version goes on from where it was.
r = doc(iot.update_thing_shadow(thingName="lamp", shadowName="net", payload=b'{"state":{"reported":{"x":2}}}'))
assert r["version"] == 2, r

# Bad documents: AWS's errors, nothing changed.
expect_error("InvalidRequestException", iot.update_thing_shadow, thingName="lamp", payload=b"{not json")
# A nesting bomb is refused, not recursed into.
expect_error("InvalidRequestException", iot.update_thing_shadow, thingName="lamp",
             payload=b'{"state":{"desired":' + b"[" * 100_000)
expect_error("RequestEntityTooLargeException", iot.update_thing_shadow, thingName="lamp",
             payload=b'{"state":{"desired":{"a":"' + b"x" * 200_000 + b'"}}}')
deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
expect_error("InvalidRequestException", iot.update_thing_shadow, thingName="lamp",
             payload=json.dumps({"state": {"desired": deep}}))
expect_error("RequestEntityTooLargeException", iot.update_thing_shadow, thingName="lamp",
             payload=json.dumps({"state": {"desired": {"big": "x" * 9000}}}))
expect_error("InvalidRequestException", iot.get_thing_shadow, thingName="lamp", shadowName="bad name")
expect_error("InvalidRequestException", iot.get_thing_shadow, thingName="../etc")
expect_error("InvalidRequestException", iot.get_thing_shadow, thingName="a/b")
assert doc(iot.get_thing_shadow(thingName="lamp"))["version"] == 3

# Publish reaches the local broker (the test's subscriber checks it).
iot.publish(topic="alerts/owner", qos=1, payload=b"from-boto3",
            userProperties=json.dumps([{"site": "plant-7"}]), contentType="text/plain",
            payloadFormatIndicator="UTF8_DATA", messageExpiry=600)
expect_error("InvalidRequestException", iot.publish, topic="alerts/x", payload=b"x",
             userProperties=json.dumps({"not": "a list"}))
expect_error("InvalidRequestException", iot.publish, topic="alerts/x", payload=b"\xff",
             payloadFormatIndicator="UTF8_DATA")
expect_error("InvalidRequestException", iot.publish, topic="alerts/+", payload=b"x")
# The shadow service's answers are reserved for the hub, even for the owner.
expect_error("ForbiddenException", iot.publish, topic="$aws/things/lamp/shadow/update/accepted", payload=b"{}")
expect_error("ForbiddenException", iot.publish, topic="$aws/things/lamp/shadow/update/delta", payload=b"{}")

# Retained messages: kept by the broker, read back through the data plane.
import time  # noqa: E402
before_ms = int(time.time() * 1000)
for i in range(5):
    iot.publish(topic=f"state/room-{i}", qos=1, retain=True, payload=f"t{i}".encode(),
                userProperties=json.dumps([{"unit": "C"}, {"room": str(i)}]) if i == 0 else None)
r = iot.get_retained_message(topic="state/room-0")
assert r["topic"] == "state/room-0" and r["payload"] == b"t0" and r["qos"] == 1, r
assert before_ms - 5000 <= r["lastModifiedTime"] <= int(time.time() * 1000) + 5000, r
assert json.loads(r["userProperties"]) == [{"unit": "C"}, {"room": "0"}], r
assert "userProperties" not in iot.get_retained_message(topic="state/room-1"), "none given"
expect_error("ResourceNotFoundException", iot.get_retained_message, topic="state/none")
expect_error("InvalidRequestException", iot.get_retained_message, topic="state/+")
seen, token = [], None
while True:
    kw = {"maxResults": 2}
    if token:
        kw["nextToken"] = token
    page = iot.list_retained_messages(**kw)
    assert len(page["retainedTopics"]) <= 2, page
    seen += [(t["topic"], t["payloadSize"], t["qos"]) for t in page["retainedTopics"]]
    token = page.get("nextToken")
    if not token:
        break
assert seen == [(f"state/room-{i}", 2, 1) for i in range(5)], seen
expect_error("InvalidRequestException", iot.list_retained_messages, maxResults=500)
expect_error("InvalidRequestException", iot.list_retained_messages, nextToken="not a token!")
# An expired retained message is gone for every reader.
iot.publish(topic="state/brief", qos=1, retain=True, payload=b"soon gone", messageExpiry=1)
assert iot.get_retained_message(topic="state/brief")["payload"] == b"soon gone"
time.sleep(1.5)
expect_error("ResourceNotFoundException", iot.get_retained_message, topic="state/brief")
assert "state/brief" not in [t["topic"] for t in iot.list_retained_messages()["retainedTopics"]]
# An empty retained publish clears the topic.
iot.publish(topic="state/room-4", qos=1, retain=True, payload=b"")
expect_error("ResourceNotFoundException", iot.get_retained_message, topic="state/room-4")

# Lambda Invoke: by name, ARN, qualifier; Event; DryRun; errors; Tail.
r = lam.invoke(FunctionName="echo", Payload=b'{"n": 1}')
assert r["StatusCode"] == 200 and r["Payload"].read() == b'{"n": 1}', r
assert "FunctionError" not in r, r
arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
assert lam.invoke(FunctionName=arn, Payload=b"{}")["Payload"].read() == b"{}"
assert lam.invoke(FunctionName="echo", Qualifier="$LATEST", Payload=b"[]")["Payload"].read() == b"[]"
assert lam.invoke(FunctionName=arn + ":$LATEST", Payload=b"1")["Payload"].read() == b"1"
expect_error("ResourceNotFoundException", lam.invoke, FunctionName="echo", Qualifier="7")
expect_error("ResourceNotFoundException", lam.invoke, FunctionName="nope")
expect_error("InvalidRequestContentException", lam.invoke, FunctionName="echo", Payload=b"{oops")
assert lam.invoke(FunctionName="echo", InvocationType="Event", Payload=b"{}")["StatusCode"] == 202
assert lam.invoke(FunctionName="echo", InvocationType="DryRun")["StatusCode"] == 204
r = lam.invoke(FunctionName="fail", Payload=b"{}")
assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled", r
err = json.loads(r["Payload"].read())
assert err["errorType"] and err["errorMessage"], err
r = lam.invoke(FunctionName="logger", Payload=b"{}", LogType="Tail")
log = base64.b64decode(r["LogResult"]).decode()
assert "line two" in log, log

# Secrets Manager: the deployed secret, by name and by ARN.
s = sm.get_secret_value(SecretId="db-password")
assert s["SecretString"] == os.environ["EXPECT_SECRET"], s
assert s["Name"] == "db-password" and s["VersionStages"] == ["AWSCURRENT"], s
assert sm.get_secret_value(SecretId=s["ARN"])["SecretString"] == s["SecretString"]
assert sm.get_secret_value(SecretId="db-password", VersionStage="AWSCURRENT")["VersionId"] == s["VersionId"]
expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId="nope")
expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId="db-password", VersionStage="AWSPREVIOUS")
expect_error("UnknownOperationException", sm.list_secrets)
print("owner: all checks passed")
