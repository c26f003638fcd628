"""How a fedmq process reaches the broker: settings and a well-behaved paho client.

Every client is MQTT 5 with the paho-mqtt 2 callback API, a stable client id and
a persistent session (``clean_start=False`` plus a session expiry), reconnects
with exponential backoff, and TLS when a CA file is given. A ``ConnectionWatch``
turns paho's silent retrying into one specific line (``broker/diagnose.py``).

Where the broker speaks only MQTT 3.1.1 (RabbitMQ 3.10's MQTT plugin closes the
socket on an MQTT 5 CONNECT; other brokers answer CONNACK 1, "unacceptable
protocol version"), the client falls back to 3.1.1 by itself and says once what
that costs (``FALLBACK_NOTE``); ``mqtt_version = 3`` in the credentials file or
``FEDMQ_MQTT_VERSION=3`` chooses 3.1.1 from the start. The rest of fedmq does not
change: ``subscribe`` takes ``SubscribeOptions`` either way (on 3.1.1 only their
QoS is sent) and publish properties are dropped on 3.1.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import diagnose
from broker.diagnose import Problem
from broker.errors import BrokerError, ConfigError
from broker.publish_parse import LARGE as LARGE_PUBLISH
from broker.publish_parse import payload_offset

MQTT_VERSION_ENV = "FEDMQ_MQTT_VERSION"
FALLBACK_NOTE = (
    "no receive maximum (the broker's own prefetch, 10 on RabbitMQ, bounds the "
    "unacknowledged messages it sends), no message expiry (a control command names the "
    "aggregator instance it is for, so a later one ignores it), no session expiry (a "
    "persistent session lasts until the broker drops it), no retain handling"
)
SESSION_EXPIRY = 7 * 24 * 3600  # seconds the broker keeps a disconnected client's session
RECONNECT_MIN, RECONNECT_MAX = 1, 30  # seconds of backoff
RECONNECT_MAX_ENV = "FEDMQ_RECONNECT_MAX"  # a shorter cap: tests that stop the broker a while


@dataclass(frozen=True)
class ConnectionSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # seconds between MQTT keepalive pings; None: FEDMQ_KEEPALIVE, else 30. paho's network
    # thread sends them, so a device busy training for an hour still answers
    keepalive: int | None = None
    # 3 (MQTT 3.1.1) or 5; None: FEDMQ_MQTT_VERSION, else MQTT 5 with a fallback to 3.1.1
    mqtt_version: int | None = None
    # every node of a clustered broker that keeps retained messages on the node that got
    # them (RabbitMQ): the aggregator publishes its retained messages to each (cluster.py)
    cluster: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def with_credentials(self, username: str | None, password: str | None) -> ConnectionSettings:
        return replace(self, username=username, password=password)


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or 'HOST', port 1883) -> (host, port); ConfigError if malformed."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = text.strip(), "1883"
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"broker address {text!r} is not HOST:PORT")
    return host, int(port_text)


def settings_from(
    broker: str,
    *,
    username: str | None = None,
    password: str | None = None,
    password_file: str | Path | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    mqtt_version: Any = None,
    cluster: Any = None,
    where: str = "the credentials",
) -> ConnectionSettings:
    """Settings from CLI/config values; a password may come from a 0600 file instead of argv.
    ``mqtt_version`` and ``cluster`` are the credentials file's values, checked here."""
    host, port = parse_address(broker)
    if password is None and password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{password_file}: cannot read password file: {exc}") from None
    paths = {}
    for name, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if value:
            p = Path(value)
            if not p.is_file():
                raise ConfigError(f"{p}: {name.replace('_', ' ')} not found")
            paths[name] = p
        else:
            paths[name] = None
    return ConnectionSettings(
        host,
        port,
        username,
        password,
        **paths,
        mqtt_version=check_mqtt_version(mqtt_version, where),
        cluster=check_cluster(cluster, where),
    )


def check_mqtt_version(value: Any, where: str) -> int | None:
    """A credentials file's ``mqtt_version``: 3, 5 or absent."""
    if value is not None and (isinstance(value, bool) or value not in (3, 5)):
        raise ConfigError(f"{where}: mqtt_version is {value!r}: use 3 (MQTT 3.1.1) or 5")
    return value


def check_cluster(value: Any, where: str) -> tuple[str, ...]:
    """A credentials file's ``cluster``: the "HOST:PORT" of every node of a clustered broker."""
    if not value:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f'{where}: cluster must be a list of "HOST:PORT" strings')
    for node in value:
        try:
            parse_address(node)
        except ConfigError as exc:
            raise ConfigError(f"{where}: cluster: {exc}") from None
    return tuple(value)


def requested_version(settings: ConnectionSettings) -> int | None:
    """3 or 5 when chosen (settings, else FEDMQ_MQTT_VERSION); None: 5, falling back to 3."""
    value: Any = settings.mqtt_version
    source = "mqtt_version"
    if value is None:
        value, source = os.environ.get(MQTT_VERSION_ENV, "").strip() or None, MQTT_VERSION_ENV
    if value is None or value == "auto":
        return None
    version = {"3": 3, "3.1.1": 3, "311": 3, "5": 5, "5.0": 5}.get(str(value))
    if version is None:
        raise ConfigError(f"{source} is {value!r}: use 3 (MQTT 3.1.1), 5 (MQTT 5) or auto")
    return version


# addresses where this process saw a broker refuse MQTT 5 and accept 3.1.1: later
# clients of the same broker start with 3.1.1 (one fallback per process, not per client)
_speaks_311: set[str] = set()
_told: set[str] = set()  # addresses using 3.1.1 so far: the first one is logged
_told_lock = threading.Lock()
_log = logging.getLogger("fedmq.connection")


class Client(mqtt.Client):
    """paho's client, speaking MQTT 5 or 3.1.1 behind the same interface.

    ``fallback``: start with MQTT 5 and, when the broker closes the socket or answers
    CONNACK 1 instead of accepting it, retry with 3.1.1 (then 5 again, and so on, until
    one of them gets a CONNACK; only a 3.1.1 attempt's failure is reported). The first
    3.1.1 CONNACK logs one line saying so."""

    def __init__(
        self, settings: ConnectionSettings, *, version: int | None, persistent: bool, **kwargs: Any
    ) -> None:
        fallback = version is None
        v311 = version == 3 or (fallback and settings.address in _speaks_311)
        kwargs["protocol"] = mqtt.MQTTv311 if v311 else mqtt.MQTTv5
        if v311:
            kwargs["clean_session"] = not persistent
        super().__init__(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.fedmq_address = settings.address
        self.fedmq_settings = settings
        self.fedmq_persistent = persistent
        self.fedmq_fallback = fallback
        self.fedmq_switching = False  # the last attempt ended without a CONNACK: switched
        self._fedmq_connack = False
        self._fedmq_v5_properties: Properties | None = None
        self._fedmq_payload: bytes | None = None  # a large PUBLISH's, cut off its header

    @property
    def mqtt5(self) -> bool:
        return self._protocol == mqtt.MQTTv5

    def _use(self, protocol: int) -> None:
        if protocol == mqtt.MQTTv311:
            self._fedmq_v5_properties = self._connect_properties or self._fedmq_v5_properties
            self._connect_properties = None
            self._clean_session = not self.fedmq_persistent
        else:
            self._connect_properties = self._fedmq_v5_properties
        self._protocol = protocol

    # -- paho internals (network thread) -----------------------------------------------
    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._fedmq_connack = False
        self.fedmq_switching = False
        return self._reconnect_nodelay()

    def _reconnect_nodelay(self) -> mqtt.MQTTErrorCode:
        """paho's reconnect, then TCP_NODELAY on the new socket: without it Nagle's
        algorithm and the broker's delayed ack hold each message's tail for up to 40 ms."""
        code = super().reconnect()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):  # not a TCP socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return code

    def _handle_connack(self) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        refused_v5 = self.mqtt5 and len(packet) >= 2 and packet[1] == 1
        if refused_v5 and self.fedmq_fallback:
            # "unacceptable protocol version" (MQTT 3.1.1's CONNACK 1): try 3.1.1 next
            self._use(mqtt.MQTTv311)
            self.fedmq_switching = True
            return self._reconnect_nodelay()
        self._fedmq_connack = True
        if not self.mqtt5 and self.fedmq_fallback and packet[1:2] == b"\x00":
            _speaks_311.add(self.fedmq_address)
            with _told_lock:  # one line per process: the nodes of a cluster say the same
                tell = not _told
                _told.add(self.fedmq_address)
            _log.log(
                logging.WARNING if tell else logging.DEBUG,
                "the broker at %s does not speak MQTT 5: using MQTT 3.1.1 (%s)",
                self.fedmq_address,
                FALLBACK_NOTE,
            )
        return super()._handle_connack()

    def _do_on_disconnect(self, packet_from_broker, v1_rc, reason=None, properties=None) -> None:
        if self.fedmq_fallback and not self._fedmq_connack and self._sock_was_open():
            if not self.mqtt5:  # 3.1.1 closed too: something else (the watch says what)
                self._use(mqtt.MQTTv5)
            elif _refuses_mqtt5(self.fedmq_settings):
                # closed without answering an MQTT 5 CONNECT, again, on a fresh socket:
                # RabbitMQ 3.10 does that. A broker that was restarting or full answers the
                # probe (even "not authorized") and keeps MQTT 5. Try 3.1.1 without a word
                self.fedmq_switching = True
                self._use(mqtt.MQTTv311)
        super()._do_on_disconnect(packet_from_broker, v1_rc, reason, properties)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        """A large PUBLISH: its payload copied once out of paho's receive buffer, and only
        the small header left for paho to parse (``broker/publish_parse.py``)."""
        packet = self._in_packet["packet"]
        qos = (self._in_packet["command"] & 0x06) >> 1
        if len(packet) >= LARGE_PUBLISH and qos < 2:  # QoS 2 delivers later: paho's way
            start = payload_offset(packet, qos, self.mqtt5)
            if start is not None:
                self._fedmq_payload = bytes(memoryview(packet)[start:])
                del packet[start:]  # the receive buffer, down to the header
        try:
            return super()._handle_publish()
        finally:
            self._fedmq_payload = None

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        if self._fedmq_payload is not None:
            message.payload, self._fedmq_payload = self._fedmq_payload, None
        super()._handle_on_message(message)

    def _sock_was_open(self) -> bool:
        # paho reports a refused TCP connection through on_connect_fail, not here
        return self._state not in (
            mqtt._ConnectionState.MQTT_CS_NEW,
            mqtt._ConnectionState.MQTT_CS_CONNECT_ASYNC,
        )

    # -- the same interface on both versions ---------------------------------------------
    def subscribe(self, topic: Any, qos: int = 0, options: Any = None, properties: Any = None):
        if self.mqtt5:
            return super().subscribe(topic, qos, options, properties)
        if options is not None:
            qos, options = options.QoS, None
        if isinstance(topic, tuple):
            topic = (topic[0], _qos_of(topic[1]))
        elif isinstance(topic, list):
            topic = [(t, _qos_of(o)) for t, o in topic]
        return super().subscribe(topic, qos)

    def publish(self, topic, payload=None, qos=0, retain=False, properties=None):
        if not self.mqtt5:
            properties = None  # e.g. message expiry: see FALLBACK_NOTE
        return super().publish(topic, payload, qos, retain, properties)


def _refuses_mqtt5(settings: ConnectionSettings) -> bool:
    """Two probes half a second apart both closed unanswered: a broker in the middle of
    shutting down or restarting may close one, RabbitMQ 3.10 closes every one."""
    if probe_mqtt5(settings) != "closed":
        return False
    time.sleep(0.5)
    return probe_mqtt5(settings) == "closed"


def probe_mqtt5(settings: ConnectionSettings, timeout: float = 3.0) -> str:
    """Send a bare MQTT 5 CONNECT (no credentials) on a new socket: "answered" (a CONNACK,
    whatever it says), "closed" (the socket closed unanswered: no MQTT 5 there) or
    "unknown" (unreachable, TLS trouble, silence)."""
    import socket

    client_id = f"fedmq-probe-{os.urandom(4).hex()}".encode()
    body = b"\x00\x04MQTT\x05\x02\x00\x0a\x00" + len(client_id).to_bytes(2, "big") + client_id
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=timeout)
    except OSError:
        return "unknown"
    try:
        if settings.tls:
            context = ssl.create_default_context(cafile=str(settings.ca_file))
            if settings.cert_file is not None:
                context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
            sock = context.wrap_socket(sock, server_hostname=settings.host)
        sock.sendall(packet)
        first = sock.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except (OSError, ValueError):
        return "unknown"
    finally:
        sock.close()
    if not first:
        return "closed"
    return "answered" if first[0] >> 4 == 2 else "unknown"


def _qos_of(option: Any) -> int:
    return option.QoS if isinstance(option, mqtt.SubscribeOptions) else int(option)


def make_client(
    settings: ConnectionSettings,
    client_id: str,
    *,
    persistent: bool = True,
    manual_ack: bool = False,
    will: tuple[str, bytes] | None = None,
) -> Client:
    """A configured, not yet connected client: MQTT 5 unless the settings or the broker say
    3.1.1 (``requested_version``). ``will`` is (topic, payload), retained."""
    version = requested_version(settings)
    client = Client(
        settings, version=version, persistent=persistent, client_id=client_id, manual_ack=manual_ack
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file),
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(RECONNECT_MIN, reconnect_max())
    client.max_inflight_messages_set(20)
    client.max_queued_messages_set(0)
    client.user_data_set({"persistent": persistent})
    return client


def reconnect_max() -> int:
    """Seconds paho's backoff grows to between reconnection attempts: RECONNECT_MAX, or
    FEDMQ_RECONNECT_MAX (at least RECONNECT_MIN)."""
    value = os.environ.get(RECONNECT_MAX_ENV)
    if not value:
        return RECONNECT_MAX
    try:
        return max(RECONNECT_MIN, int(value))
    except ValueError:
        raise ConfigError(f"{RECONNECT_MAX_ENV}={value!r}: a whole number of seconds") from None


def connect_properties(persistent: bool, receive_maximum: int | None = None) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY if persistent else 0
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def connect_async(
    client: mqtt.Client,
    settings: ConnectionSettings,
    persistent: bool,
    receive_maximum: int | None = None,
) -> None:
    """Start connecting in the background; paho's loop keeps reconnecting with backoff.

    ``receive_maximum`` caps the QoS 1 messages the broker sends before they are
    acknowledged: with manual acks, it bounds how many payloads wait in memory (on MQTT
    3.1.1 there is none: the broker's prefetch does that)."""
    keepalive = settings.keepalive or int(os.environ.get("FEDMQ_KEEPALIVE", "30"))
    properties = connect_properties(persistent, receive_maximum)
    if isinstance(client, Client) and not client.mqtt5:
        client._fedmq_v5_properties = properties  # should it switch back to MQTT 5
        client.connect_async(settings.host, settings.port, keepalive=keepalive)
        _say_chosen(client)
        return
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=keepalive,
        clean_start=not persistent,
        properties=properties,
    )


def _say_chosen(client: Client) -> None:
    """Once per process: MQTT 3.1.1 was asked for, and what it does without."""
    if client.fedmq_fallback:
        return  # said when the broker refused MQTT 5
    with _told_lock:
        tell = not _told
        _told.add(client.fedmq_address)
    if tell:
        _log.info(
            "using MQTT 3.1.1 with the broker at %s (mqtt_version = 3): %s",
            client.fedmq_address,
            FALLBACK_NOTE,
        )


class ConnectionWatch:
    """Makes paho's silent, endless retrying loud and specific.

    paho's ``loop_start`` retries a failed connection forever and tells no one.
    A watch wraps a client's callbacks (set the owner's callbacks first) and its
    ``subscribe``/``publish``, diagnoses every failed attempt, refused CONNACK,
    SUBACK and PUBACK (``broker/diagnose.py``), and:

    - a permanent problem (bad credentials, TLS verification, not authorized)
      becomes ``fatal``, a ``BrokerError`` handed once to ``on_fatal``;
    - a transient one (refused, unreachable, unresolvable) is logged as a
      WARNING at once, again when it changes, and at most every ``warn_every``
      seconds while it lasts; paho keeps retrying. With ``patient=False`` (a
      one-shot command) a transient problem is fatal too.
    """

    def __init__(
        self,
        client: mqtt.Client,
        settings: ConnectionSettings,
        log: logging.Logger,
        *,
        on_fatal: Callable[[BrokerError], None] | None = None,
        patient: bool = True,
        warn_every: float = 30.0,
        log_connect: bool = True,
    ) -> None:
        self.settings = settings
        self.log = log
        self.on_fatal = on_fatal
        self.patient = patient
        self.warn_every = warn_every
        self.log_connect = log_connect
        self.problem: Problem | None = None  # the latest problem; None while all is well
        self.fatal: BrokerError | None = None
        self.connected = threading.Event()
        self._changed = threading.Event()  # connected or fatal
        self._lock = threading.Lock()
        self._warned: tuple[str, float] | None = None  # (message, monotonic time)
        self._connack_seen = False  # in the current attempt
        self._ever_connected = False
        self._subscriptions: dict[int, list[str]] = {}
        self._publishes: dict[int, str] = {}
        self._early_pubacks: dict[int, int] = {}  # PUBACKs that overtook publish()'s return
        self._wrap(client)

    # -- installing ----------------------------------------------------------------
    def _wrap(self, client: mqtt.Client) -> None:
        def chain(name: str, ours: Callable[..., None]) -> None:
            theirs = getattr(client, name)

            def callback(*args: Any) -> None:
                ours(*args)
                if theirs is not None:
                    theirs(*args)

            setattr(client, name, callback)

        chain("on_pre_connect", self._on_pre_connect)
        chain("on_connect", self._on_connect)
        chain("on_connect_fail", self._on_connect_fail)
        chain("on_disconnect", self._on_disconnect)
        chain("on_subscribe", self._on_subscribe)
        chain("on_publish", self._on_publish)
        subscribe, publish = client.subscribe, client.publish

        def watched_subscribe(topic: Any, *args: Any, **kwargs: Any) -> tuple[Any, int | None]:
            result, mid = subscribe(topic, *args, **kwargs)
            if mid is not None:
                with self._lock:
                    self._subscriptions[mid] = _topic_names(topic)
            return result, mid

        def watched_publish(topic: str, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
            info = publish(topic, *args, **kwargs)
            qos = kwargs.get("qos", args[1] if len(args) > 1 else 0)
            if qos:
                with self._lock:
                    early = self._early_pubacks.pop(info.mid, None)
                    if early is None:
                        self._publishes[info.mid] = topic
                if early is not None:
                    self._puback(early, topic)
            return info

        client.subscribe = watched_subscribe  # type: ignore[method-assign]
        client.publish = watched_publish  # type: ignore[method-assign]

    # -- paho callbacks (network thread) ----------------------------------------------
    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._connack_seen = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            self.report(diagnose.from_connack(reason_code.value, self.settings))
            return
        with self._lock:
            before, self.problem, self._warned = self.problem, None, None
        if before is not None and self.fatal is None:
            self.log.info("connected to the broker at %s", self.settings.address)
        elif not self._ever_connected and self.log_connect:
            self.log.info("connected to the broker at %s", self.settings.address)
        self._ever_connected = True
        self.connected.set()
        self._changed.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is current
        self.report(diagnose.from_exception(sys.exc_info()[1], self.settings))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if getattr(client, "fedmq_switching", False):
            return  # MQTT 5 refused: the next attempt is MQTT 3.1.1 (or the other way round)
        if not self._connack_seen and reason_code.is_failure:
            self.report(diagnose.closed_before_connack(self.settings))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            topics = self._subscriptions.pop(mid, [])
        problem = diagnose.from_suback([rc.value for rc in reason_codes], topics, self.settings)
        if problem is not None:
            self.report(problem)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            topic = self._publishes.pop(mid, None)
            if topic is None and reason_code.is_failure:
                self._early_pubacks[mid] = reason_code.value
                return
        self._puback(reason_code.value, topic)

    def _puback(self, code: int, topic: str | None) -> None:
        problem = diagnose.from_puback(code, topic, self.settings)
        if problem is not None:
            self.report(problem)

    # -- reporting ---------------------------------------------------------------------
    def report(self, problem: Problem) -> None:
        """Log a transient problem (rate-limited), or make a permanent one fatal."""
        with self._lock:
            if self.fatal is not None:
                return
            self.problem = problem
            if problem.permanent or not self.patient:
                self.fatal = BrokerError(problem.message)
                fatal = self.fatal
            else:
                fatal = None
                now = time.monotonic()
                if (
                    self._warned is not None
                    and self._warned[0] == problem.message
                    and now - self._warned[1] < self.warn_every
                ):
                    return
                self._warned = (problem.message, now)
        if fatal is None:
            self.log.warning("%s; still trying", problem.message)
            return
        self.log.debug("giving up: %s", problem.message)
        self._changed.set()
        if self.on_fatal is not None:
            self.on_fatal(fatal)

    def raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    def wait_connected(
        self, timeout: float | None, stopped: Callable[[], bool] | None = None
    ) -> bool:
        """Return True once connected, False if ``stopped()`` became true first (SIGTERM
        while the broker is unreachable); raise ``fatal`` as soon as there is one, or at
        ``timeout`` a BrokerError naming the latest problem."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.connected.is_set():
            self.raise_if_fatal()
            if stopped is not None and stopped():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                problem = self.problem
                raise BrokerError(
                    problem.message
                    if problem is not None
                    else f"no answer from the broker at {self.settings.address} within {timeout:g}s"
                )
            self._changed.wait(0.1 if left is None else min(0.1, left))
            self._changed.clear()
        self.raise_if_fatal()
        return True


def _topic_names(topic: Any) -> list[str]:
    """The topic filters of whatever ``Client.subscribe`` accepts."""
    if isinstance(topic, str):
        return [topic]
    if isinstance(topic, tuple):
        return [topic[0]]
    return [t[0] if isinstance(t, tuple) else str(t) for t in topic]
