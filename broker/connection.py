"""How a fedmq process reaches the broker: settings and a well-behaved paho client.

Every client is MQTT 5 with the paho-mqtt 2 callback API, a stable client id and
a persistent session (``clean_start=False`` plus a session expiry), reconnects
with exponential backoff, and TLS when a CA file is given.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.errors import ConfigError

SESSION_EXPIRY = 7 * 24 * 3600  # seconds the broker keeps a disconnected client's session
RECONNECT_MIN, RECONNECT_MAX = 1, 30  # seconds of backoff


@dataclass(frozen=True)
class ConnectionSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

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
) -> ConnectionSettings:
    """Settings from CLI/config values; a password may come from a 0600 file instead of argv."""
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
    return ConnectionSettings(host, port, username, password, **paths)


def make_client(
    settings: ConnectionSettings,
    client_id: str,
    *,
    persistent: bool = True,
    manual_ack: bool = False,
    will: tuple[str, bytes] | None = None,
) -> mqtt.Client:
    """A configured, not yet connected, MQTT 5 client. ``will`` is (topic, payload), retained."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
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
    client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
    client.max_inflight_messages_set(20)
    client.max_queued_messages_set(0)
    client.user_data_set({"persistent": persistent})
    return client


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
    acknowledged: with manual acks, it bounds how many payloads wait in memory."""
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=int(os.environ.get("FEDMQ_KEEPALIVE", "30")),
        clean_start=not persistent,
        properties=connect_properties(persistent, receive_maximum),
    )
