"""Plain AWS Lambda handlers, run unmodified by awslambdaric on the hub."""
import os
import sys
import time


def handler(event, context):
    return {
        "echo": event,
        "request_id": context.aws_request_id,
        "function": context.function_name,
        "memory": context.memory_limit_in_mb,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "arn": context.invoked_function_arn,
        "region": os.environ.get("AWS_REGION"),
        "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
        "greeting": os.environ.get("GREETING"),
        "pid": os.getpid(),
        "ppid": os.getppid(),
    }


def fail(event, context):
    raise ValueError("bad input: " + str(event))


def slow(event, context):
    time.sleep(float(event.get("seconds", 30)))
    return "woke"


def die(event, context):
    os._exit(3)


def hog(event, context):
    chunks = []
    while True:
        chunk = bytearray(16 << 20)
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1
        chunks.append(chunk)


def noisy(event, context):
    line = "x" * 1023
    for _ in range(5 * 1024):
        print(line)
    print("noisy done", file=sys.stderr)
    return "quiet now"


def huge(event, context):
    return "y" * (7 << 20)


def topic(event, context):
    custom = getattr(context.client_context, "custom", None) or {}
    return {"topic": custom.get("topic"), "event": event}


def whoami(event, context):
    def can_read(path):
        try:
            with open(path, "rb"):
                return "yes"
        except OSError:
            return "no"

    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "ppid": os.getppid(),
        "key": can_read(os.path.join(os.environ.get("DATA", "/nonexistent"), "hub.key")),
    }


def sneak(event, context):
    """Sends an owner-only request to the hub's /v1 and closes at once, so
    the hub finds the socket already let go of when it asks who held it."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ["AWS_ENDPOINT_URL_LAMBDA"])
    s = socket.create_connection((url.hostname, url.port))
    s.sendall(
        b"POST /v1/deployments/rollback HTTP/1.1\r\nHost: hub\r\nContent-Length: 0\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\n"
    )
    s.close()
    return "sent"
