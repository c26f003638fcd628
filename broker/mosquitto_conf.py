"""fedmq's mosquitto configuration, rendered from one frozen dataclass.

Pure: ``render(config)`` returns the text of a mosquitto.conf; writing it and
the password/ACL/certificate files it points at is ``broker/home.py``'s job.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path

from broker.limits import DEFAULT_MAX_PAYLOAD


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
    return "\n".join(lines) + "\n"
