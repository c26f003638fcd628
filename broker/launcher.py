"""Start mosquitto with a fedmq config, wait until it accepts connections, stop it cleanly."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerError


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` free ports, different from each other: all held at once while chosen
    (one after another, the same port may come back twice)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept connections on {host}:{port}"
                ) from None
            time.sleep(0.05)


# file descriptors mosquitto needs beyond one per client: listeners, persistence, log,
# epoll, the password and ACL files on reload (a generous round number)
FD_OVERHEAD = 64
FD_WANTED = 1 << 20  # what the broker asks for when it may: far past any one-box fleet


def nofile_target(
    soft: int, hard: int, *, privileged: bool, ceiling: int, wanted: int = FD_WANTED
) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE to give mosquitto: soft up to hard, and hard up
    to ``wanted`` (bounded by the kernel's ``ceiling``, fs.nr_open) when ``privileged``.
    mosquitto has no option for it and keeps the limit it inherits (often 1,024), so
    each client over it is refused at accept()."""
    infinity = resource.RLIM_INFINITY
    if privileged and hard != infinity and hard < wanted:
        hard = max(hard, min(wanted, ceiling))
    return (hard if soft != infinity else soft), hard


def _kernel_nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def _may_raise_hard_limits() -> bool:
    """CAP_SYS_RESOURCE in the effective set: root usually, but not in every container."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _nofile_choices() -> list[tuple[int, int]]:
    """The limits to try in the child, best first (computed in the parent: the child
    makes only system calls before exec). The second is soft up to hard, for a root
    without CAP_SYS_RESOURCE (a container) that may not raise hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    best = nofile_target(soft, hard, privileged=_may_raise_hard_limits(), ceiling=_kernel_nr_open())
    return [best, nofile_target(soft, hard, privileged=False, ceiling=hard)]


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of process ``pid`` from /proc/<pid>/limits (None if unknown;
    a very large number for "unlimited")."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return sys.maxsize if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        pass
    return None


def clients_for(fd_limit: int) -> int:
    """How many clients a mosquitto with this many file descriptors can hold."""
    return max(0, fd_limit - FD_OVERHEAD)


@dataclass
class RunningBroker:
    """A mosquitto process that this process started and will stop."""

    proc: subprocess.Popen
    host: str
    port: int | None
    tls_port: int | None
    conf_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def fd_limit(self) -> int | None:
        """mosquitto's open-files limit as the kernel holds it (/proc/<pid>/limits)."""
        return open_files_limit(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def reload(self) -> None:
        """Re-read password and ACL files (SIGHUP), without dropping connections."""
        if self.alive():
            self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence database), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_mosquitto(
    conf_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None,
    tls_port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 10.0,
    foreground_log: bool = False,
) -> RunningBroker:
    """Launch ``mosquitto -c conf_path`` and return once a listener accepts TCP connections."""
    log_path = log_path or conf_path.with_suffix(".log")
    choices = _nofile_choices()

    def raise_fd_limit() -> None:  # in the child, before exec
        for limits in choices:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
                return
            except (ValueError, OSError):
                continue  # the inherited limit stays; RunningBroker.fd_limit tells what it got

    out = None if foreground_log else open(log_path, "ab")  # noqa: SIM115 (owned by the child)
    try:
        proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf_path)],
            stdout=out if out else None,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_fd_limit,
        )
    finally:
        if out:
            out.close()
    broker = RunningBroker(proc, host, port, tls_port, conf_path, log_path)
    try:
        for p in (port, tls_port):
            if p is not None:
                wait_for_port(host, p, timeout, proc)
    except BrokerError as exc:
        broker.stop()
        raise BrokerError(f"{exc}\n{broker.log_tail()}") from None
    return broker
