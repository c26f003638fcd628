"""fedmq's mosquitto configuration, rendered from one frozen dataclass.

Pure: ``render(config)`` returns the text of a mosquitto.conf; writing it and
the password/ACL/certificate files it points at is ``broker/home.py``'s job.

A site's broker (``Bridge``) also holds one bridge ``connection`` to the root
federation's broker: it logs in there as the site's device account and maps
topics 1:1 (the site's own federation has its own topic root, so nothing
collides): the root's ``model`` comes in, the site's ``updates/<site>`` and
``status/<site>`` go out, QoS 1, in a persistent session on both sides, so a
partial result published while the uplink is down is queued by the site
broker and delivered when it returns. The bridge speaks MQTT 3.1.1 (what
every broker, RabbitMQ included, takes).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path

from broker.limits import DEFAULT_MAX_PAYLOAD


@dataclass(frozen=True)
class Bridge:
    """The site -> root bridge: who the site is at the root, and how to reach it."""

    address: str  # HOST:PORT of the root broker, as the site dials it
    root_federation: str
    site: str  # the site's device account at the root (and its remote client id's stem)
    username: str
    password: str  # mosquitto 2.0 takes it only inline: the conf is written 0600
    ca_file: Path | None = None  # the root's CA: TLS, verified (None: plaintext)
    cert_file: Path | None = None  # client certificate, when the root requires one
    key_file: Path | None = None
    try_private: bool = True  # mosquitto roots: retained flags kept; false for RabbitMQ
    keepalive: int = 20  # seconds: a dead uplink is noticed within about 1.5x this
    restart_base: int = 1  # reconnect backoff (decorrelated jitter) from 1 s ...
    restart_cap: int = 15  # ... to 15 s: a returning uplink is used within seconds

    @property
    def connection_name(self) -> str:
        return f"fedmq-site-{self.site}"

    def topics(self) -> list[tuple[str, str]]:
        """(topic, direction) of every bridged topic, as the root names it."""
        base = f"fedmq/{self.root_federation}"
        return [
            (f"{base}/model", "in"),
            (f"{base}/updates/{self.site}", "out"),
            (f"{base}/status/{self.site}", "out"),
        ]


@dataclass(frozen=True)
class MosquittoConfig:
    data_dir: Path  # persistence database and pid file
    port: int | None  # plaintext listener; None switches plaintext off
    bind: str = "127.0.0.1"
    tls_port: int | None = None
    password_file: Path | None = None  # None means anonymous access (only for throwaway brokers)
    acl_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    require_client_cert: bool = False
    message_size_limit: int = DEFAULT_MAX_PAYLOAD
    # updates queue for an offline aggregator: at least one per device of the largest round
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 20
    autosave_interval: int = 2  # seconds between persistence snapshots
    log_dest: str = "stderr"
    # run as whoever starts it (mosquitto started as root would otherwise switch to the
    # "mosquitto" user, which cannot read a run directory owned by the operator)
    user: str = field(default_factory=getpass.getuser)
    bridge: Bridge | None = None


def render(cfg: MosquittoConfig) -> str:
    if cfg.port is None and cfg.tls_port is None:
        raise ValueError("mosquitto needs at least one listener")
    lines = [
        "# written by fedmq: edits are overwritten",
        "per_listener_settings false",
        f"user {cfg.user}",
        "persistence true",
        f"persistence_location {cfg.data_dir}/",
        f"autosave_interval {cfg.autosave_interval}",
        f"pid_file {cfg.data_dir / 'mosquitto.pid'}",
        f"message_size_limit {cfg.message_size_limit}",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_inflight_messages {cfg.max_inflight_messages}",
        "persistent_client_expiration 14d",
        "retain_available true",
        # Nagle's algorithm holds a message's last partial segment until the previous one
        # is acked, and the peer delays that ack by up to 40 ms: every model announced
        # reached the devices 40-50 ms late (scripts/bench/peer.py)
        "set_tcp_nodelay true",
        f"log_dest {cfg.log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if cfg.password_file is None:
        lines.append("allow_anonymous true")
    else:
        lines += ["allow_anonymous false", f"password_file {cfg.password_file}"]
    if cfg.acl_file is not None:
        lines.append(f"acl_file {cfg.acl_file}")
    if cfg.port is not None:
        lines += ["", f"listener {cfg.port} {cfg.bind}"]
    if cfg.tls_port is not None:
        if not (cfg.ca_file and cfg.cert_file and cfg.key_file):
            raise ValueError("a TLS listener needs ca_file, cert_file and key_file")
        lines += [
            "",
            f"listener {cfg.tls_port} {cfg.bind}",
            f"cafile {cfg.ca_file}",
            f"certfile {cfg.cert_file}",
            f"keyfile {cfg.key_file}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if cfg.require_client_cert else 'false'}",
        ]
    if cfg.bridge is not None:
        lines += ["", *render_bridge(cfg.bridge)]
    return "\n".join(lines) + "\n"


def render_bridge(bridge: Bridge) -> list[str]:
    """The ``connection`` block of a site's bridge to the root (mosquitto 2.0 options)."""
    if (bridge.cert_file is None) != (bridge.key_file is None):
        raise ValueError("a bridge client certificate needs both cert_file and key_file")
    if bridge.cert_file is not None and bridge.ca_file is None:
        raise ValueError("a bridge client certificate needs TLS (ca_file)")
    for value in (bridge.address, bridge.username, bridge.password):
        if not value or any(c.isspace() for c in value):  # one token per conf line
            raise ValueError("bridge address, username and password must be non-empty, no spaces")
    lines = [
        f"# bridge to the root federation {bridge.root_federation!r} as its device {bridge.site!r}",
        f"connection {bridge.connection_name}",
        f"address {bridge.address}",
        "bridge_protocol_version mqttv311",
        f"remote_clientid {bridge.connection_name}",  # stable: the root keeps its session
        f"local_clientid fedmq-site-local-{bridge.site}",
        f"remote_username {bridge.username}",
        f"remote_password {bridge.password}",
        "cleansession false",  # the root queues the model for a site that is away
        "local_cleansession false",  # and the site broker queues the site's partials
        "notifications false",  # no $SYS writes at the root: the site's ACL there has none
        f"try_private {'true' if bridge.try_private else 'false'}",
        "start_type automatic",
        f"restart_timeout {bridge.restart_base} {bridge.restart_cap}",
        f"keepalive_interval {bridge.keepalive}",
    ]
    if bridge.ca_file is not None:
        lines += [
            f"bridge_cafile {bridge.ca_file}",
            "bridge_insecure false",
            "bridge_tls_version tlsv1.2",
        ]
    if bridge.cert_file is not None:
        lines += [f"bridge_certfile {bridge.cert_file}", f"bridge_keyfile {bridge.key_file}"]
    lines += [f"topic {topic} {direction} 1" for topic, direction in bridge.topics()]
    return lines
