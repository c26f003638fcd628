"""A process that has imported torch once and forks ``fedmq`` commands from there.

A federation on one machine (``fedmq demo``, the tests, the benchmarks: ``fedmq/local.py``)
runs an aggregator and several agents as processes, and each of them spends about 1.8 s
of CPU importing torch before it does anything; ten agents on two cores took 8-16 s to
start. A real device pays that once, on its own CPU, at boot. Here the zygote pays it
once for all of them: started with the federation, it imports what the commands need,
then forks one child per request, and each child runs ``fedmq ARGS`` as
``python -m fedmq.cli ARGS`` would (its own environment, working directory, log file,
signal handlers, exit code), sharing the imported modules' memory until it writes it.

Protocol, one line of JSON each way: the parent writes ``{"argv", "env", "cwd", "log"}``
on the zygote's stdin; the zygote answers ``{"pid"}`` for each request in order, and
``{"exited": pid, "code": c}`` when a child ends (``-N``: killed by signal N, as
``subprocess`` says it). The parent's side is :class:`Zygote`, whose children are
:class:`ForkedProcess` objects that wait, poll and signal like ``subprocess.Popen``.
The zygote leaves when its stdin closes and its last child has ended.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

# what every command's first import would load anyway: torch above all
PRELOAD = ("torch", "fedmq.cli", "device_agent.agent", "aggregator.service")
READY = "ready"
# torch's own default pool size (one thread per core it may run on), which the zygote's
# OMP_NUM_THREADS=1 hides from the children
THREADS = len(os.sched_getaffinity(0))


# -- the zygote process ----------------------------------------------------------------------


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve(requests: IO[bytes], report_fd: int) -> dict[str, Any] | None:
    """Fork a child per request. Returns the request in each child, None in the zygote
    once its stdin has closed and every child has ended."""
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pidfd -> pid
    pending = b""
    stdin_open = True

    def report(obj: dict) -> None:
        os.write(report_fd, json.dumps(obj).encode() + b"\n")

    while stdin_open or children:
        for key, _ in selector.select():
            if key.data is not None:  # a child's pidfd: it ended
                pid = key.data
                selector.unregister(key.fd)
                os.close(key.fd)
                del children[key.fd]
                _, status = os.waitpid(pid, 0)
                report({"exited": pid, "code": _exit_code(status)})
                continue
            chunk = os.read(requests.fileno(), 65536)
            if not chunk:
                stdin_open = False
                selector.unregister(requests)
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    for fd in children:
                        os.close(fd)
                    os.close(report_fd)
                    return request
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                selector.register(pidfd, selectors.EVENT_READ, pid)
                report({"pid": pid})
    return None


def become(request: dict[str, Any]) -> None:
    """In the child: take the request's stdio, environment, directory and signals."""
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    if request["log"] is not None:
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # the zygote imported torch with one OpenMP thread, so that it forks with no thread
    # but its main one; each child sizes its own pool, as a fresh interpreter would
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or THREADS))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the zygote ignores it
    sys.argv = ["fedmq", *request["argv"]]


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the children and the parent
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the collector leaves what is shared alone: fewer pages copied per child
    report_fd = os.dup(1)  # stdout: the parent's pipe, for reports only
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    os.write(report_fd, json.dumps({READY: os.getpid()}).encode() + b"\n")
    request = serve(sys.stdin.buffer, report_fd)
    if request is None:
        return 0
    become(request)
    from fedmq.cli import main as cli

    try:
        cli(args=request["argv"], prog_name="fedmq")
        code = 0
    except SystemExit as exc:  # click's standalone mode ends here
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    leave(code)


def leave(code: int) -> None:
    """End a child without the interpreter's teardown, as ``multiprocessing`` ends its
    own: the teardown decrements every object the zygote imported, copying each page the
    child shares with it (torch's: 0.7-0.9 s of CPU per child). A fedmq command has
    waited for its own work when it returns (its fsyncs included; what remains are idle
    pool threads), so only logging and stdio are left to flush; torch's ``atexit``
    hooks (caches, profilers) have nothing to write for these commands."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# -- the parent's side -----------------------------------------------------------------------


class ForkedProcess:
    """A child of the zygote, with the part of ``subprocess.Popen`` fedmq uses."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._ended = threading.Event()
        self._fd_lock = threading.Lock()  # the pidfd is not closed while a signal uses it
        # signals go through a pidfd: they reach this child or nobody, never a process
        # that reuses its pid after the zygote has reaped it
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already reaped: its exit report is on its way
            self._pidfd = None

    def _end(self, code: int) -> None:
        self.returncode = code
        self._ended.set()
        with self._fd_lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        with self._fd_lock, contextlib.suppress(OSError):  # ESRCH: it ended meanwhile
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The zygote process, started here and told what to fork."""

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedmq.zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                # OpenMP starts a worker thread when torch is imported, unless told to use
                # one: the zygote must not fork with threads (a child could inherit a lock
                # held by a thread it does not have)
                env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"},
            )
        finally:
            if log:
                out.close()
        self._lock = threading.Lock()
        self._started: list[dict] = []  # "pid" answers, in order
        self._answer = threading.Condition(self._lock)
        self._children: dict[int, ForkedProcess] = {}
        self._early: dict[int, int] = {}  # pid -> code of a child that ended before we knew it
        self._closed = False
        ready = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not ready:
            said = log.read_text(errors="replace")[-2000:] if log else ""
            code = self.proc.wait()
            raise RuntimeError(f"the zygote exited ({code}) before it was ready\n{said}")
        self._reader = threading.Thread(target=self._read, daemon=True, name="zygote-reports")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            report = json.loads(line)
            with self._lock:
                if "pid" in report:
                    self._started.append(report)
                    self._answer.notify_all()
                    continue
                child = self._children.pop(report["exited"], None)
                if child is None:
                    self._early[report["exited"]] = report["code"]
                else:
                    child._end(report["code"])
        with self._lock:  # the zygote is gone: nobody will report the rest
            self._closed = True
            self._answer.notify_all()

    def spawn(self, argv: list[str], *, env: dict[str, str], log: Path | None) -> ForkedProcess:
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "log": log and str(log)}
        with self._lock:
            if self._closed:
                raise RuntimeError("the zygote has exited")
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            while not self._started and not self._closed:
                self._answer.wait()
            if not self._started:
                raise RuntimeError("the zygote exited before it forked")
            pid = self._started.pop(0)["pid"]
            child = ForkedProcess(pid, ["fedmq", *argv])
            if pid in self._early:
                child._end(self._early.pop(pid))
            else:
                self._children[pid] = child
            return child

    def close(self, timeout: float = 30) -> None:
        """Let the zygote go; it leaves once its children have (kill them first)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


if __name__ == "__main__":
    raise SystemExit(main())
