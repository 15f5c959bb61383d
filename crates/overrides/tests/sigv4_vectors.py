#!/usr/bin/env python3
"""Regenerate the botocore-signed fixtures embedded in src/sigv4.rs.

Drives real boto3 clients against http://127.0.0.1:8420 with a fixed clock and
fixed credentials, catches each request at `before-send` (after signing, before
any socket is opened) and prints it as a Rust `Fixture` literal. Nothing leaves
the process. Needs boto3: `pip install boto3`.

    python crates/overrides/tests/sigv4_vectors.py > /tmp/fixtures.rs
"""

import datetime
import sys
from unittest import mock

import boto3
import botocore
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.credentials import Credentials

ENDPOINT = "http://127.0.0.1:8420"
ACCESS_KEY = "AKIDROOSTEXAMPLE"
SECRET_KEY = "roost/Secret+Key/EXAMPLE0123456789abcdef"
REGION = "us-east-1"
NOW = datetime.datetime(2026, 11, 24, 4, 5, 0)


class Captured(Exception):
    pass


def rust_str(s):
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % ord(ch))
    return '"' + "".join(out) + '"'


def rust_bytes(b):
    out = []
    for byte in b:
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append("\\x%02x" % byte)
    return 'b"' + "".join(out) + '"'


def emit(name, service, method, url, headers, body):
    parts = botocore.compat.urlsplit(url)
    host = parts.netloc
    hdrs = [(k, v.decode() if isinstance(v, bytes) else v) for k, v in headers.items()]
    # urllib3 adds Host itself; botocore signed the same value from the URL.
    if not any(k.lower() == "host" for k, _ in hdrs):
        hdrs.insert(0, ("Host", host))
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode()
    elif hasattr(body, "read"):
        body = body.read()
    print("    Fixture {")
    print(f"        name: {rust_str(name)},")
    print(f"        service: {rust_str(service)},")
    print(f"        method: {rust_str(method)},")
    print(f"        path: {rust_str(parts.path)},")
    query = "None" if not parts.query else f"Some({rust_str(parts.query)})"
    print(f"        query: {query},")
    print("        headers: &[")
    for k, v in hdrs:
        print(f"            ({rust_str(k)}, {rust_str(v)}),")
    print("        ],")
    print(f"        body: {rust_bytes(body)},")
    print("    },")


def capture(name, service_label):
    def handler(request, **kwargs):
        emit(name, service_label, request.method, request.url, request.headers, request.body)
        raise Captured()

    return handler


def client(service):
    c = boto3.client(
        service,
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    return c


def run(service, signing_name, name, call):
    c = client(service)
    c.meta.events.register("before-send", capture(name, signing_name))
    try:
        call(c)
    except Captured:
        pass


def main():
    print(f"// botocore {botocore.__version__}, boto3 {boto3.__version__}")
    print(f"// access key {ACCESS_KEY}, secret {SECRET_KEY}, now {NOW.isoformat()}Z")
    print("const BOTOCORE: &[Fixture] = &[")
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: NOW):
        run(
            "lambda",
            "lambda",
            "lambda invoke",
            lambda c: c.invoke(
                FunctionName="arn:aws:lambda:us-east-1:123456789012:function:echo",
                Qualifier="$LATEST",
                Payload=b'{"hello": "world", "n": 1}',
            ),
        )
        run(
            "iot-data",
            "iotdata",
            "iot get shadow",
            lambda c: c.get_thing_shadow(thingName="my-thing", shadowName="cfg"),
        )
        run(
            "iot-data",
            "iotdata",
            "iot publish",
            lambda c: c.publish(topic="a/b/c", qos=1, payload=b"\x00\x01binary\xff"),
        )
        run(
            "secretsmanager",
            "secretsmanager",
            "secretsmanager get",
            lambda c: c.get_secret_value(SecretId="db/password"),
        )
        # A bare SigV4Auth on an AWSRequest, to pin path normalisation (dot
        # segments, doubled slashes) and header-value whitespace folding.
        req = AWSRequest(
            method="GET",
            url=ENDPOINT + "/a/./b//c/../d%20e/?b=2&a=%2F&a=1&flag",
            headers={
                "Content-Type": "text/plain",
                "X-Amz-Meta-Note": "  two   spaces  here ",
            },
            data=b"",
        )
        SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "lambda", REGION).add_auth(req)
        emit("raw awsrequest", "lambda", req.method, req.url, req.headers, req.body)
    print("];")


if __name__ == "__main__":
    sys.exit(main())
