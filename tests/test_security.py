"""The security layer against a real mosquitto: authentication, ACL, TLS, client
certificates, revocation, and ``fedmq broker up``.

Each test starts its own broker from a ``BrokerHome`` on free loopback ports and
stops it in the fixture's finaliser. Waiting is on events with timeouts.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.acl import AGGREGATOR_USER, OPERATOR_USER
from broker.connection import ConnectionSettings, make_client
from broker.home import BrokerHome, settings_from_credentials
from broker.launcher import RunningBroker, free_port, free_ports, start_mosquitto
from broker.mosquitto_conf import MosquittoConfig, render
from broker.passwords import write_password_file
from broker.pki import CertificateAuthority
from broker.topics import Topics

pytestmark = pytest.mark.mosquitto
TIMEOUT = 10.0
T = Topics("demo")


# --------------------------------------------------------------------------- helpers


@dataclass
class Secured:
    home: BrokerHome
    broker: RunningBroker

    def tls(self, account: str) -> ConnectionSettings:
        """The account's settings exactly as its credentials file gives them."""
        return settings_from_credentials(self.home.credentials_path(account))

    def plain(self, account: str) -> ConnectionSettings:
        """The account's user and password on the plaintext listener."""
        assert self.broker.port is not None
        return dataclasses.replace(
            self.tls(account), port=self.broker.port, ca_file=None, cert_file=None, key_file=None
        )


def start_secured(
    tmp_path: Path, *, plaintext: bool = True, client_certs: bool = False, **create: object
) -> Secured:
    home = BrokerHome.create(
        tmp_path / "home", "demo", plaintext=plaintext, client_certs=client_certs, **create
    )
    for device in ("dev-a", "dev-b"):
        home.add_device(device)
    port, tls_port = free_ports(2)
    running = home.start(port=port if plaintext else None, tls_port=tls_port)
    return Secured(home, running)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    s = start_secured(tmp_path)
    yield s
    s.broker.stop()


@dataclass
class Outcome:
    connected: bool
    detail: str


def attempt(
    settings: ConnectionSettings, client: mqtt.Client | None = None, *, keep_open: bool = False
) -> Outcome:
    """Try one connection; report whether the broker accepted it, and why not."""
    client = client or make_client(settings, "probe", persistent=False)
    done = threading.Event()
    result: list[Outcome] = []

    def on_connect(c, userdata, flags, reason, props) -> None:
        result.append(Outcome(not reason.is_failure, f"connack: {reason}"))
        done.set()

    def on_disconnect(c, userdata, flags, reason, props) -> None:
        result.append(Outcome(False, f"disconnected: {reason}"))
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(settings.host, settings.port, clean_start=True)
    except (ssl.SSLError, OSError) as exc:
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    client.loop_start()
    outcome = Outcome(False, "no CONNACK and no disconnect")
    try:
        assert done.wait(TIMEOUT), outcome.detail
        outcome = result[0]
        return outcome
    finally:
        if not (keep_open and outcome.connected):
            client.disconnect()
            client.loop_stop()


def until(predicate, what: str) -> None:
    """Retry ``predicate`` until true (a reload is asynchronous); fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class Session:
    """A connected client that records what it receives."""

    def __init__(self, settings: ConnectionSettings, client_id: str) -> None:
        self.client = make_client(settings, client_id, persistent=False)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: dict[int, tuple[threading.Event, list]] = {}
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = self._on_subscribe
        outcome = attempt(settings, self.client, keep_open=True)
        assert outcome.connected, outcome.detail

    def _on_subscribe(self, c, userdata, mid, reasons, props) -> None:
        event, out = self._subacks.setdefault(mid, (threading.Event(), []))
        out.extend(reasons)
        event.set()

    def subscribe(self, topic: str) -> bool:
        """Subscribe at QoS 1; True if the broker granted it."""
        _, mid = self.client.subscribe(topic, qos=1)
        event, reasons = self._subacks.setdefault(mid, (threading.Event(), []))
        assert event.wait(TIMEOUT), f"no SUBACK for {topic}"
        return not reasons[0].is_failure

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)  # PUBACK received: the broker has decided

    def next(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    opened: list[Session] = []
    yield opened
    for s in opened:
        s.close()


# --------------------------------------------------------------------------- authentication


def test_password_file_accepted_by_real_broker(tmp_path: Path) -> None:
    password = "s3cret:with colons & ünïcode"
    write_password_file(tmp_path / "passwd", {"alice": password, "bob": "other"})
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(
        render(MosquittoConfig(data_dir=tmp_path, port=port, password_file=tmp_path / "passwd"))
    )
    running = start_mosquitto(conf, port=port)
    try:
        alice = ConnectionSettings(port=port, username="alice", password=password)
        assert attempt(alice).connected
        assert not attempt(alice.with_credentials("alice", "other")).connected
    finally:
        running.stop()


def test_anonymous_and_wrong_password_refused(secured: Secured) -> None:
    good = secured.plain("dev-a")
    assert attempt(good).connected
    assert attempt(secured.tls("dev-a")).connected
    anonymous = attempt(good.with_credentials(None, None))
    assert not anonymous.connected and "connack" in anonymous.detail
    assert not attempt(good.with_credentials("dev-a", "wrong")).connected
    assert not attempt(good.with_credentials("dev-a", secured.plain("dev-b").password)).connected
    assert not attempt(secured.tls("dev-a").with_credentials(None, None)).connected


def test_added_device_accepted_and_removed_device_refused_after_reload(secured: Secured) -> None:
    home = secured.home
    settings = settings_from_credentials(home.add_device("dev-c"))
    assert home.running_pid() == secured.broker.pid
    assert home.reload() == secured.broker.pid
    until(lambda: attempt(settings).connected, "new device never accepted after reload")
    session = Session(settings, "dev-c")
    dropped = threading.Event()
    session.client.on_disconnect = lambda *args: dropped.set()
    try:
        home.remove_device("dev-c")
        assert home.reload() == secured.broker.pid
        until(lambda: not attempt(settings).connected, "removed device still accepted")
        assert dropped.wait(TIMEOUT), "mosquitto kept the revoked device's open session"
    finally:
        session.close()
    assert attempt(secured.tls("dev-a")).connected  # the others are unaffected


# --------------------------------------------------------------------------- ACL


def test_device_cannot_impersonate_or_publish_the_model(secured, sessions) -> None:
    agg = Session(secured.plain(AGGREGATOR_USER), "agg")
    dev_a = Session(secured.plain("dev-a"), "dev-a")
    sessions += [agg, dev_a]
    for topic in (T.updates_filter, T.status_filter, T.model, T.control):
        assert agg.subscribe(topic), topic

    dev_a.publish(T.update("dev-b"), b"forged update")
    dev_a.publish(T.status("dev-b"), b'{"state": "offline"}', retain=True)
    dev_a.publish(T.model, b"forged model", retain=True)
    dev_a.publish(T.control, b'{"command": "stop"}')
    dev_a.publish(T.update("dev-a"), b"legit update")  # sent last: the sync point

    first = agg.next()
    assert (first.topic, first.payload) == (T.update("dev-a"), b"legit update")
    assert agg.messages.empty()


def test_device_reads_only_model_and_state(secured, sessions) -> None:
    agg = Session(secured.plain(AGGREGATOR_USER), "agg")
    op = Session(secured.plain(OPERATOR_USER), "op")
    dev_a = Session(secured.plain("dev-a"), "dev-a")
    dev_b = Session(secured.plain("dev-b"), "dev-b")
    sessions += [agg, op, dev_a, dev_b]
    assert agg.subscribe(T.updates_filter) and agg.subscribe(T.control)
    for topic in (T.updates_filter, T.control, T.status_filter):
        dev_b.subscribe(topic)  # may be refused outright; either way nothing may arrive
    assert dev_b.subscribe(T.model) and dev_b.subscribe(T.state)

    dev_a.publish(T.update("dev-a"), b"update of a")
    op.publish(T.control, b'{"command": "pause"}')
    assert {agg.next().topic, agg.next().topic} == {T.update("dev-a"), T.control}
    agg.publish(T.model, b"model r1", retain=True)
    agg.publish(T.state, b'{"round": 1}', retain=True)

    got = [(m.topic, m.payload) for m in (dev_b.next(), dev_b.next())]
    assert got == [(T.model, b"model r1"), (T.state, b'{"round": 1}')]
    assert dev_b.messages.empty()


def test_operator_writes_control_and_reads_state_only(secured, sessions) -> None:
    agg = Session(secured.plain(AGGREGATOR_USER), "agg")
    op = Session(secured.plain(OPERATOR_USER), "op")
    sessions += [agg, op]
    for topic in (T.model, T.state, T.updates_filter, T.status_filter, T.control):
        assert agg.subscribe(topic)
    assert op.subscribe(T.state)
    op.subscribe(T.model)  # refused or silent

    op.publish(T.model, b"forged model", retain=True)
    op.publish(T.state, b"forged state", retain=True)
    op.publish(T.update(OPERATOR_USER), b"forged update")
    op.publish(T.status(OPERATOR_USER), b"forged status")
    op.publish(T.control, b'{"command": "resume"}')
    message = agg.next()
    assert (message.topic, message.payload) == (T.control, b'{"command": "resume"}')
    assert agg.messages.empty()

    agg.publish(T.model, b"model", retain=True)
    agg.publish(T.state, b'{"round": 2}', retain=True)
    message = op.next()
    assert (message.topic, message.payload) == (T.state, b'{"round": 2}')


# --------------------------------------------------------------------------- TLS


def test_tls_needs_the_ca(secured: Secured) -> None:
    with_ca = secured.tls("dev-a")
    assert with_ca.tls and attempt(with_ca).connected
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="noca", protocol=mqtt.MQTTv5)
    client.username_pw_set(with_ca.username, with_ca.password)
    client.tls_set(cert_reqs=ssl.CERT_REQUIRED)  # system CAs only
    outcome = attempt(with_ca, client)
    assert not outcome.connected and "SSLCertVerificationError" in outcome.detail
    # plaintext client on the TLS port
    plain_on_tls = dataclasses.replace(with_ca, ca_file=None)
    assert not attempt(plain_on_tls).connected


def test_server_certificate_names_are_checked(tmp_path: Path) -> None:
    s = start_secured(tmp_path, hostnames=("localhost",))  # no 127.0.0.1 in the certificate
    try:
        outcome = attempt(dataclasses.replace(s.tls("dev-a"), host="127.0.0.1"))
        assert not outcome.connected and "SSLCertVerificationError" in outcome.detail
        assert attempt(dataclasses.replace(s.tls("dev-a"), host="localhost")).connected
    finally:
        s.broker.stop()


def test_plaintext_switched_off(tmp_path: Path) -> None:
    s = start_secured(tmp_path, plaintext=False)
    try:
        assert s.broker.port is None
        assert s.home.conf_path.read_text().count("listener ") == 1
        assert attempt(s.tls("dev-a")).connected
        assert not attempt(dataclasses.replace(s.tls("dev-a"), ca_file=None)).connected
    finally:
        s.broker.stop()


def test_client_certificates(tmp_path: Path) -> None:
    s = start_secured(tmp_path, client_certs=True)
    try:
        with_cert = s.tls("dev-a")
        assert with_cert.cert_file is not None and attempt(with_cert).connected
        no_cert = dataclasses.replace(with_cert, cert_file=None, key_file=None)
        assert not attempt(no_cert).connected
        other = CertificateAuthority.create(tmp_path / "o.key", tmp_path / "o.crt")
        other.issue_client("dev-a", tmp_path / "c.key", tmp_path / "c.crt")
        foreign = dataclasses.replace(
            with_cert, cert_file=tmp_path / "c.crt", key_file=tmp_path / "c.key"
        )
        assert not attempt(foreign).connected
        # a certificate does not replace the password
        assert not attempt(with_cert.with_credentials("dev-a", "wrong")).connected
        plain = s.plain("dev-a")  # the plaintext listener has no certificates: password only
        assert attempt(plain).connected
    finally:
        s.broker.stop()


# --------------------------------------------------------------------------- fedmq broker up


def test_broker_up_runs_until_sigterm(tmp_path: Path) -> None:
    home = BrokerHome.create(tmp_path / "home", "demo")
    home.add_device("dev-a")
    port, tls_port = free_ports(2)
    cmd = [
        sys.executable,
        "-m",
        "fedmq.cli_broker",
        "up",
        "--home",
        str(home.path),
        "--port",
        str(port),
        "--tls-port",
        str(tls_port),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in proc.stdout:  # blocks until `up` prints, or exits
            lines.append(line)
            if "mosquitto running" in line:
                break
        output = "".join(lines)
        assert "mosquitto running" in output, output
        password = settings_from_credentials(home.credentials_path("dev-a")).password
        assert password and password not in output
        assert f":{tls_port}" in output and "dev-a.toml" in output
        pid = home.running_pid()
        assert pid is not None
        assert attempt(settings_from_credentials(home.credentials_path("dev-a"))).connected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert "stopped" in proc.stdout.read()
        assert home.running_pid() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
