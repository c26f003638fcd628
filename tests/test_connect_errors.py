"""A client that cannot reach or use the broker says why, within 10 s, at the default log level.

Each case runs the real CLI (`python -m fedmq.cli ...`, no -v) against a real
mosquitto (or a port where nothing listens) and checks the one specific line
and the exit code: 1 for a problem retrying cannot fix, 2 for an agent's
--timeout, and a WARNING while a patient process keeps retrying.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker import diagnose
from broker.connection import ConnectionSettings, ConnectionWatch, make_client
from broker.errors import ConfigError
from broker.home import BrokerHome, load_credentials
from broker.launcher import free_port
from fedmq.local import AGGREGATOR, OPERATOR
from tests.helpers import blobs_task, write_blobs

WITHIN = 10.0  # seconds a user may wait for the reason


def fedmq(*args: str, timeout: float = 30, env: dict | None = None) -> tuple[int, str, float]:
    """Run ``fedmq ARGS`` to its end: (exit code, stdout + stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


class Running:
    """``fedmq ARGS`` in the background; ``wait_for_line`` reads its output as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.started = time.monotonic()
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout: float) -> str:
        deadline = self.started + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line with {needle!r} within {timeout}s; output:\n" + "".join(self.seen)
                ) from None
            self.seen.append(line)
            if needle in line:
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def running():
    started: list[Running] = []

    def start(*args: str) -> Running:
        started.append(Running(*args))
        return started[-1]

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_blobs(tmp_path / "data", ["bob"])["bob"]


def one_error_line(output: str, *needles: str) -> str:
    """The output's ``Error:`` line; it holds every needle and there is no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


# --------------------------------------------------------------------------- nothing listening


def test_agent_warns_that_nothing_listens_and_keeps_trying(federation, data):
    fed = federation(devices=["bob"])
    address = f"127.0.0.1:{free_port()}"
    code, out, took = fedmq(
        "agent", "run", "--config", fed.credentials("bob"), "--broker", address,
        "--data", data, "--timeout", 3,
    )  # fmt: skip
    warnings = [line for line in out.splitlines() if " WARNING " in line]
    assert warnings and "connection refused" in warnings[0] and address in warnings[0], out
    # retried for 3 s (refused at 0 s and again after the 1 s backoff), said so once (at most
    # every 30 s)
    assert len(warnings) == 1
    assert code == 2  # --timeout's own exit code, as its help says
    one_error_line(out, "gave up after 3s", "connection refused", address)
    assert took < WITHIN


def test_aggregator_start_warns_that_nothing_listens(federation, running, tmp_path):
    fed = federation(devices=["bob"])
    address = f"127.0.0.1:{free_port()}"
    proc = running(
        "aggregator", "start", "--config", fed.credentials(AGGREGATOR), "--broker", address,
        "--task", blobs_task(tmp_path), "--run-dir", tmp_path / "run",
    )  # fmt: skip
    line = proc.wait_for_line(" WARNING ", WITHIN)
    assert "connection refused" in line and address in line
    proc.proc.terminate()  # as systemd stops it: at once, not after the 30 s connect timeout
    assert proc.proc.wait(WITHIN) == 0


@pytest.mark.parametrize("command", ["status", "pause"])
def test_operator_commands_exit_at_once_when_nothing_listens(federation, command):
    fed = federation(devices=["bob"])
    address = f"127.0.0.1:{free_port()}"
    code, out, took = fedmq(
        "aggregator", command, "--config", fed.credentials(OPERATOR), "--broker", address
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, f"cannot connect to the broker at {address}: connection refused")


def test_an_unresolvable_host_name_is_named(federation):
    fed = federation(devices=["bob"])
    code, out, _ = fedmq(
        "aggregator", "status", "--config", fed.credentials(OPERATOR),
        "--broker", "no-such-broker.invalid:8883",
    )  # fmt: skip
    assert code == 1
    one_error_line(out, "'no-such-broker.invalid' does not resolve")


# --------------------------------------------------------------------------- TLS


def test_tls_and_plaintext_ports_mixed_up_are_named(federation):
    fed = federation(devices=["bob"])
    operator = fed.credentials(OPERATOR)
    code, out, took = fedmq(
        "aggregator", "status", "--config", operator, "--broker", f"127.0.0.1:{fed.port}"
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, f"is {fed.port} the broker's plaintext port?")
    password = load_credentials(operator)["password"]
    code, out, took = fedmq(
        "aggregator", "status", "--broker", f"127.0.0.1:{fed.tls_port}", "--federation", "test",
        "--username", OPERATOR, env={"FEDMQ_PASSWORD": password},
    )  # fmt: skip
    assert code == 1 and took < WITHIN
    one_error_line(out, "closed the connection without answering", "is this its TLS port?")


def test_tls_host_name_mismatch_names_the_certificates_names(federation, data, tmp_path):
    fed = federation(devices=["bob"], hostnames=["localhost"])  # no 127.0.0.1 in the cert
    address = f"127.0.0.1:{fed.tls_port}"
    expected = ("certificate names localhost, not the IP address '127.0.0.1'", address)
    code, out, took = fedmq(
        "agent", "run", "--config", fed.credentials("bob"), "--broker", address, "--data", data
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, "TLS verification", *expected)
    code, out, took = fedmq(
        "aggregator", "status", "--config", fed.credentials(OPERATOR), "--broker", address
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, *expected)
    code, out, took = fedmq(
        "aggregator", "start", "--config", fed.credentials(AGGREGATOR), "--broker", address,
        "--task", blobs_task(tmp_path), "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert code == 1 and took < WITHIN
    one_error_line(out, *expected)


def test_a_certificate_from_another_ca_names_the_ca_file(federation, data, tmp_path):
    fed = federation(devices=["bob"])
    other_ca = BrokerHome.create(tmp_path / "other-home", "other").ca_path
    code, out, took = fedmq(
        "agent", "run", "--config", fed.credentials("bob"), "--ca-file", other_ca, "--data", data
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, f"not signed by the CA in {other_ca}")


# --------------------------------------------------------------------------- credentials


def test_wrong_password_is_refused_by_name(federation, data, tmp_path):
    fed = federation(devices=["bob"])
    for args in (
        ["agent", "run", "--config", fed.credentials("bob"), "--data", data],
        ["aggregator", "status", "--config", fed.credentials(OPERATOR)],
        [
            "aggregator", "start", "--config", fed.credentials(AGGREGATOR),
            "--task", blobs_task(tmp_path), "--run-dir", tmp_path / "run",
        ],
    ):  # fmt: skip
        code, out, took = fedmq(*args, "--password", "not-the-password")
        assert code == 1 and took < WITHIN, (args, out)
        # mosquitto 2.0 answers a wrong password with CONNACK 135 (not authorized)
        one_error_line(out, "refused account", "not authorized", str(fed.tls_port))


# --------------------------------------------------------------------------- the ACL


def test_a_device_publishing_as_another_device_is_told(federation, data):
    """The broker drops bob's status as 'alice' (PUBACK 135): the agent stops and says so."""
    fed = federation(devices=["bob", "alice"])
    code, out, took = fedmq(
        "agent", "run", "--config", fed.credentials("bob"), "--device-id", "alice", "--data", data
    )
    assert code == 1 and took < WITHIN
    one_error_line(out, "refused account 'bob' publishing to fedmq/test/status/alice")


def test_a_device_account_cannot_run_the_aggregator(federation, tmp_path):
    fed = federation(devices=["bob"])
    code, out, took = fedmq(
        "aggregator", "start", "--config", fed.credentials("bob"),
        "--signing-key", fed.home.aggregator_key_path, "--device-keys", fed.home.device_keys_dir,
        "--task", blobs_task(tmp_path), "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert code == 1 and took < WITHIN
    one_error_line(out, "refused account 'bob' publishing to fedmq/test/", "not authorized")


# --------------------------------------------------------------------------- waiting


def test_an_agent_says_once_that_it_waits_for_the_first_model(federation, data):
    fed = federation(devices=["bob"])
    code, out, _ = fedmq(
        "agent", "run", "--config", fed.credentials("bob"), "--data", data, "--timeout", 3
    )
    expected = (
        f"connected to 127.0.0.1:{fed.tls_port}; waiting for the aggregator's first model on "
        "fedmq/test/model"
    )
    assert out.count(expected) == 1, out
    assert " WARNING " not in out, out
    assert code == 2
    one_error_line(out, "gave up after 3s without a finished run")


# --------------------------------------------------------------------------- the pieces


def test_certificate_names_reads_the_brokers_sans(federation):
    fed = federation(devices=[], hostnames=["broker.lan", "10.1.2.3"])
    assert diagnose.certificate_names("127.0.0.1", fed.tls_port) == ["broker.lan", "10.1.2.3"]
    assert diagnose.certificate_names("127.0.0.1", free_port()) is None


def test_the_reconnect_backoff_cap_can_be_shortened(monkeypatch):
    from broker.connection import RECONNECT_MAX, RECONNECT_MIN

    s = ConnectionSettings("127.0.0.1", 1)
    monkeypatch.delenv("FEDMQ_RECONNECT_MAX", raising=False)
    assert make_client(s, "r1")._reconnect_max_delay == RECONNECT_MAX == 30
    monkeypatch.setenv("FEDMQ_RECONNECT_MAX", "2")
    client = make_client(s, "r2")
    assert (client._reconnect_min_delay, client._reconnect_max_delay) == (RECONNECT_MIN, 2)
    monkeypatch.setenv("FEDMQ_RECONNECT_MAX", "soon")
    with pytest.raises(ConfigError, match="FEDMQ_RECONNECT_MAX='soon'"):
        make_client(s, "r3")


def test_reason_codes_become_sentences():
    s = ConnectionSettings("h", 1, username="bob")
    assert diagnose.from_connack(134, s).permanent
    assert "bad user name or password" in diagnose.from_connack(134, s).message
    assert not diagnose.from_connack(137, s).permanent  # server busy: try again
    refused = diagnose.from_suback([1, 135], ["a", "fedmq/x/updates/+"], s)
    assert refused and refused.permanent and "subscription to fedmq/x/updates/+" in str(refused)
    assert diagnose.from_suback([0, 1], ["a", "b"], s) is None
    assert diagnose.from_puback(0, "t", s) is None
    assert diagnose.from_puback(135, "fedmq/x/model", s).permanent


def test_transient_problems_are_rate_limited(caplog):
    s = ConnectionSettings("127.0.0.1", 1)
    fatal: list = []
    watch = ConnectionWatch(make_client(s, "w"), s, logging.getLogger("fedmq.t"), warn_every=60)
    refused = diagnose.from_exception(ConnectionRefusedError(111, "refused"), s)
    with caplog.at_level(logging.WARNING, logger="fedmq.t"):
        for _ in range(5):
            watch.report(refused)
        watch.report(diagnose.from_exception(TimeoutError(), s))  # a new reason: said at once
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert watch.fatal is None and not fatal
    impatient = ConnectionWatch(
        make_client(s, "w2"), s, logging.getLogger("fedmq.t"), patient=False, on_fatal=fatal.append
    )
    impatient.report(refused)
    impatient.report(refused)
    assert len(fatal) == 1 and "connection refused" in str(fatal[0])
    with pytest.raises(type(fatal[0]), match="connection refused"):
        impatient.wait_connected(1)
