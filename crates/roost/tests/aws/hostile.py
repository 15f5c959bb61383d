"""Requests no SDK would send on its own: wrong keys, skewed clocks,
unsigned and tampered requests, signatures scoped to another service.
Each must get AWS's error for it and change nothing.

Usage: hostile.py DATA_DIR URL."""
import configparser
import datetime
import json
import os
import sys
import urllib.error
import urllib.request

import botocore.auth
import botocore.awsrequest
import botocore.credentials

data_dir, url = sys.argv[1], sys.argv[2]
creds = configparser.ConfigParser()
creds.read(os.path.join(data_dir, "aws-credentials"))
KEY = creds["roost"]["aws_access_key_id"]
SECRET = creds["roost"]["aws_secret_access_key"]


def send(method, path, body=b"", headers=None, key=KEY, secret=SECRET, service="iotdata",
         region="us-east-1", skew_s=0, sign=True, tamper=None, added=None):
    req = botocore.awsrequest.AWSRequest(method=method, url=url + path, data=body, headers=headers or {})
    if sign:
        real = botocore.auth.get_current_datetime
        botocore.auth.get_current_datetime = lambda: real() + datetime.timedelta(seconds=skew_s)
        try:
            botocore.auth.SigV4Auth(botocore.credentials.Credentials(key, secret), service, region).add_auth(req)
        finally:
            botocore.auth.get_current_datetime = real
    prepared = req.prepare()
    data = prepared.body if tamper is None else tamper
    # Headers added after signing: a captured request someone changed.
    r = urllib.request.Request(prepared.url, data=data, method=method,
                               headers={**dict(prepared.headers), **(added or {})})
    try:
        with urllib.request.urlopen(r) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def expect(status, code, *args, **kwargs):
    got_status, headers, body = send(*args, **kwargs)
    got_code = headers.get("x-amzn-ErrorType") or json.loads(body or b"{}").get("__type")
    assert (got_status, got_code) == (status, code), f"{args} {kwargs}: {got_status} {got_code} {body!r}"


ok = send("POST", "/things/door/shadow", b'{"state":{"reported":{"open":false}}}')
assert ok[0] == 200, ok
doc = b'{"state":{"reported":{"open":true}}}'
expect(403, "MissingAuthenticationTokenException", "POST", "/things/door/shadow", doc, sign=False)
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc, secret="x" * 40)
expect(403, "UnrecognizedClientException", "POST", "/things/door/shadow", doc, key="AKIDNOTAKEY")
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc, skew_s=-301)
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc, skew_s=301)
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc,
       tamper=b'{"state":{"reported":{"open":"tampered"}}}')
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc, service="lambda")
expect(403, "InvalidSignatureException", "POST", "/things/door/shadow", doc, region="eu-west-1")
expect(400, "IncompleteSignatureException", "POST", "/things/door/shadow", doc,
       headers={"Authorization": "AWS4-HMAC-SHA256 garbage"}, sign=False)
expect(400, "IncompleteSignatureException", "POST", "/things/door/shadow", doc,
       headers={"Authorization": "AWS4-HMAC-SHA256 " + "A" * 10000}, sign=False)
# Path tricks in names are refused, never resolved.
expect(400, "InvalidRequestException", "GET", "/things/..%2F..%2Fetc/shadow")
expect(400, "InvalidRequestException", "GET", "/things/door/shadow?name=..%2Fx")
expect(400, "InvalidRequestException", "GET", "/things/door/../door/shadow")
expect(400, "InvalidRequestException", "POST", "/topics//alerts", b"x")
# A skewed clock 299 s off is still inside AWS's window.
assert send("GET", "/things/door/shadow", skew_s=299)[0] == 200
status, _, body = send("GET", "/things/door/shadow")
assert status == 200 and json.loads(body)["state"]["reported"] == {"open": False}, body
# Secrets Manager writes its errors in its own protocol.
status, headers, body = send("POST", "/", b"{", service="secretsmanager",
                             headers={"X-Amz-Target": "secretsmanager.GetSecretValue",
                                      "Content-Type": "application/x-amz-json-1.1"})
assert status == 400 and json.loads(body)["__type"] == "SerializationException", body
status, headers, body = send("POST", "/", b"{}", service="secretsmanager", secret="y" * 40,
                             headers={"X-Amz-Target": "secretsmanager.GetSecretValue"})
assert status == 403 and json.loads(body)["__type"] == "InvalidSignatureException", body
# A captured Invoke of a deployed task, replayed with a header the signature
# does not cover, would become an Event call (run again), a DryRun, or a
# call returning the log: refused, whatever the header.
invoke = "/2015-03-31/functions/echo/invocations"
assert send("POST", invoke, b'"x"', service="lambda")[0] == 200
for name, value in [("X-Amz-Invocation-Type", "Event"), ("X-Amz-Invocation-Type", "DryRun"),
                    ("X-Amz-Log-Type", "Tail"), ("X-Amz-Client-Context", "e30=")]:
    expect(403, "InvalidSignatureException", "POST", invoke, b'"x"', service="lambda",
           added={name: value})
# Signed, they are served.
assert send("POST", invoke, b'"x"', service="lambda",
            headers={"X-Amz-Invocation-Type": "DryRun"})[0] == 204
# A parameter the API takes once, given twice (signed: AWS sorts repeats).
expect(400, "ValidationException", "GET", "/things/door/shadow?name=a&name=b")
expect(400, "ValidationException", "POST", invoke + "?Qualifier=%24LATEST&Qualifier=x", b'"x"',
       service="lambda")
print("hostile: all checks passed")
