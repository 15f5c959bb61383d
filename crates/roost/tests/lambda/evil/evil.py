"""A handler module that, once pre-loaded into its code group's zygote,
makes the zygote report the hub's own pid as a forked worker: the hub must
not act on it."""
import os
import __main__

_send = __main__.send


def _lying_send(msg):
    if msg.get("op") == "forked":
        msg = dict(msg, pid=os.getppid())
    _send(msg)


__main__.send = _lying_send


def handler(event, context):
    return "should never run"
