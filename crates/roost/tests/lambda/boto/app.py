"""An unmodified Lambda handler using boto3 with no configuration: the
hub's environment (AWS_ENDPOINT_URL_*, AWS_REGION, the task's own keys)
points every client at the hub's local services."""
import json

import boto3
import botocore.exceptions

iot = boto3.client("iot-data")
lam = boto3.client("lambda")
sm = boto3.client("secretsmanager")


def attempt(fn, **kwargs):
    try:
        r = fn(**kwargs)
        return "ok", r
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], None


def handler(event, context):
    out = {}
    code, r = attempt(iot.update_thing_shadow, thingName="thermostat",
                      payload=json.dumps({"state": {"reported": {"temp": event.get("temp", 20)}}}))
    out["update_own"] = code
    code, r = attempt(iot.get_thing_shadow, thingName="thermostat")
    out["get_own"] = code
    out["reported"] = json.loads(r["payload"].read())["state"]["reported"] if r else None
    out["update_other"], _ = attempt(iot.update_thing_shadow, thingName="door",
                                     payload=b'{"state":{"desired":{"open":true}}}')
    out["get_other"], _ = attempt(iot.get_thing_shadow, thingName="door")
    out["publish_allowed"], _ = attempt(iot.publish, topic="alerts/hot", qos=1, payload=b"hot")
    out["publish_denied"], _ = attempt(iot.publish, topic="commands/x", payload=b"x")
    code, r = attempt(lam.invoke, FunctionName="echo", Payload=b'{"via":"task"}')
    out["invoke_allowed"] = code
    out["invoke_output"] = r["Payload"].read().decode() if r else None
    out["invoke_denied"], _ = attempt(lam.invoke, FunctionName="secret-keeper", Payload=b"{}")
    code, r = attempt(sm.get_secret_value, SecretId="db-password")
    out["secret"] = r["SecretString"] if r else code
    code, r = attempt(iot.get_retained_message, topic="state/mode")
    out["retained"] = r["payload"].decode() if r else code
    out["retained_denied"], _ = attempt(iot.get_retained_message, topic="private/key")
    code, r = attempt(iot.list_retained_messages)
    out["retained_listed"] = [t["topic"] for t in r["retainedTopics"]] if r else code
    out["secret_denied"], _ = attempt(sm.get_secret_value, SecretId="api-key")
    return out


def context_of(event, context):
    cc = context.client_context
    return {"custom": cc.custom if cc else None}


def boom(event, context):
    raise ValueError("the sky fell: " + json.dumps(event))


def list_retained(event, context):
    """With no `allow.retained`, listing retained messages is refused."""
    code, _ = attempt(iot.list_retained_messages)
    return code
