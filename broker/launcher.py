"""Start mosquitto with a fedmq config, wait until it accepts connections, stop it cleanly."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    out = None if foreground_log else open(log_path, "ab")  # noqa: SIM115 (owned by the child)
    try:
        proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf_path)],
            stdout=out if out else None,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
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
