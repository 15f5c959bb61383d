# Roost's Python zygote: a pre-initialised parent that workers of one code
# group fork from, so they share the interpreter, the runtime client and the
# handlers' modules copy-on-write.
#
# Protocol: newline-delimited JSON on fd 3 (a socket to the hub).
#   hub -> zygote: {"op": "preload", "id", "dir", "module"}
#                  {"op": "fork", "id", "cwd", "handler", "env",
#                   "rlimit_data", "stdout", "stderr"}
#                  {"op": "release", "pid"}  (the hub has put the child in
#                   its cgroup: it may go on)
#   zygote -> hub: {"op": "ready"}, {"op": "preloaded", "id", "error"?},
#                  {"op": "forked", "id", "pid"} or {"op": "error", "id", "message"},
#                  {"op": "exit", "pid", "status"}   (raw wait status)
# The zygote is single-threaded (forking a threaded process is unsafe) and
# reaps its children itself, reporting each exit.
import ctypes
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1

libc = ctypes.CDLL(None, use_errno=True)
ctl = socket.socket(fileno=3)
zygote_pid = os.getpid()
# (module name, folder) of modules imported from task folders
from_task_dirs = []
# Write ends of the pipes forked children wait on until released, by pid.
holds = {}


def send(msg):
    ctl.sendall((json.dumps(msg) + "\n").encode())


def preload(req):
    d = req["dir"]
    before = set(sys.modules)
    sys.path.insert(0, d)
    try:
        importlib.import_module(req["module"])
        err = None
    except BaseException as e:  # a broken handler fails its own workers later
        err = "%s: %s" % (type(e).__name__, e)
    finally:
        sys.path.remove(d)
    prefix = d.rstrip("/") + "/"
    for name in set(sys.modules) - before:
        f = getattr(sys.modules.get(name), "__file__", None) or ""
        if f.startswith(prefix):
            from_task_dirs.append((name, d))
    # Objects created so far are never collected in the children, so the
    # collector does not write to (and un-share) their pages.
    gc.collect()
    gc.freeze()
    msg = {"op": "preloaded", "id": req["id"]}
    if err:
        msg["error"] = err
    send(msg)


def child(req, wake_r, wake_w, hold_r):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ctl.close()
    os.close(wake_r)
    os.close(wake_w)
    for w in holds.values():
        os.close(w)
    os.setpgid(0, 0)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != zygote_pid:
        os._exit(70)
    # Wait until the hub has put this process in its cgroup.
    if os.read(hold_r, 1) != b"1":
        os._exit(71)
    os.close(hold_r)
    if req.get("rlimit_data"):
        n = int(req["rlimit_data"])
        resource.setrlimit(resource.RLIMIT_DATA, (n, n))
    out = os.open(req["stdout"], os.O_WRONLY)
    err = os.open(req["stderr"], os.O_WRONLY)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (out, err, null):
        os.close(fd)
    cwd = req["cwd"]
    for name, d in from_task_dirs:
        if d != cwd:
            sys.modules.pop(name, None)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = ["awslambdaric", req["handler"]]
    import awslambdaric.__main__ as ric
    from awslambdaric import lambda_runtime_client as lrc

    # The native client fixes its endpoint from AWS_LAMBDA_RUNTIME_API when
    # it is loaded, so the zygote kept it out; each worker loads its own.
    sys.modules.pop("runtime_client", None)
    import runtime_client

    lrc.runtime_client = runtime_client
    runtime_client.initialize_client(lrc._user_agent())

    ric.main(sys.argv)


def fork(req, wake_r, wake_w):
    sys.stdout.flush()
    sys.stderr.flush()
    hold_r, hold_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(hold_r)
        os.close(hold_w)
        send({"op": "error", "id": req["id"], "message": str(e)})
        return
    if pid == 0:
        code = 0
        os.close(hold_w)
        try:
            child(req, wake_r, wake_w, hold_r)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            print("roost zygote child: %s: %s" % (type(e).__name__, e), file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    os.close(hold_r)
    holds[pid] = hold_w
    send({"op": "forked", "id": req["id"], "pid": pid})


def release(req):
    w = holds.pop(req["pid"], None)
    if w is not None:
        try:
            os.write(w, b"1")
        except OSError:
            pass  # the child is gone (killed, or it failed): its exit is reported
        finally:
            os.close(w)


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        w = holds.pop(pid, None)
        if w is not None:
            os.close(w)
        send({"op": "exit", "pid": pid, "status": status})


def main():
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        sys.exit(70)
    # The runtime client's Python part; its native part reads the endpoint
    # when loaded, so it is blocked here and loaded by each worker.
    sys.modules["runtime_client"] = None
    import awslambdaric.__main__  # noqa: F401
    import awslambdaric.bootstrap  # noqa: F401
    import pkgutil

    # Everything the runtime client may import lazily, imported once here
    # rather than privately in every worker.
    for m in pkgutil.iter_modules(awslambdaric.__path__, "awslambdaric."):
        if m.name != "awslambdaric.lambda_multi_concurrent_utils":
            try:
                importlib.import_module(m.name)
            except Exception:
                pass

    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    send({"op": "ready"})
    buf = b""
    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap()
        if ctl in ready:
            data = ctl.recv(1 << 16)
            if not data:
                os._exit(0)  # the hub is gone
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                if req["op"] == "preload":
                    preload(req)
                elif req["op"] == "fork":
                    fork(req, wake_r, wake_w)
                elif req["op"] == "release":
                    release(req)


main()
