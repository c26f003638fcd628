"""Why a client cannot talk to the broker, in one specific sentence.

paho retries forever and says nothing: a refused socket, a certificate for
another host name and a wrong password all look like a client that hangs.
These functions turn what paho reports (an exception, a CONNACK, SUBACK or
PUBACK reason code) plus the connection settings into a ``Problem``: one
sentence naming the address, the account or the certificate's names, and
whether retrying can help (``permanent`` problems need a human).

Pure apart from ``certificate_names``, which opens a socket to read the
certificate the broker presents.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.connection import ConnectionSettings

# OpenSSL verify codes: the chain does not lead to the CA we trust
_UNTRUSTED = {2, 18, 19, 20, 21}
_EXPIRED, _NOT_YET_VALID = 10, 9
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64

# CONNACK reason codes (MQTT 5) that retrying will not fix
_CONNACK_PERMANENT = {
    128: "the broker refused the connection (unspecified error)",
    129: "the broker could not parse our CONNECT (malformed packet)",
    130: "protocol error",
    132: "the broker does not speak MQTT 5",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized (wrong user name or password, or a removed account)",
    138: "banned",
    140: "bad authentication method",
}


@dataclass(frozen=True)
class Problem:
    """What stops a client, as one sentence; ``permanent``: retrying will not help."""

    message: str
    permanent: bool

    def __str__(self) -> str:
        return self.message


def _account(settings: ConnectionSettings) -> str:
    return f"account {settings.username!r}" if settings.username else "an anonymous client"


def _host_kind(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return "IP address"
    except ValueError:
        return "host name"


def certificate_names(host: str, port: int, timeout: float = 3.0) -> list[str] | None:
    """The DNS names and IP addresses (SANs) of the certificate the broker at host:port
    presents, read without verifying it; None if it cannot be read."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    return names + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def from_exception(
    exc: BaseException | None, settings: ConnectionSettings, *, fetch_names: bool = True
) -> Problem:
    """A failed connection attempt (what paho's ``reconnect`` raised) as a Problem.

    ``fetch_names``: on a host name mismatch, read the names the certificate
    does hold from the broker (``certificate_names``)."""
    where = f"cannot connect to the broker at {settings.address}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification_problem(exc, settings, fetch_names)
    if isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)) or (
        isinstance(exc, ssl.SSLError) and "unexpected eof" in str(exc).lower()
    ):
        hint = (
            f" (is {settings.port} the broker's plaintext port? TLS is on because a CA file is set)"
            if settings.tls
            else ""
        )
        return Problem(f"{where}: the broker closed the connection at once{hint}", False)
    if isinstance(exc, ssl.SSLError):
        text = (exc.reason or str(exc)).lower()
        if "wrong_version_number" in text or "wrong version number" in text:
            return Problem(
                f"{where}: TLS handshake failed, the other side does not speak TLS (is "
                f"{settings.port} the broker's plaintext port? its TLS port is usually 8883)",
                permanent=True,
            )
        if "certificate required" in text or "certificate_required" in text:
            return Problem(
                f"{where}: the broker requires a client certificate: give --cert-file and "
                "--key-file (or the credentials file `fedmq broker add-device` wrote)",
                permanent=True,
            )
        if "unknown ca" in text or "bad certificate" in text or "certificate unknown" in text:
            return Problem(
                f"{where}: the broker refused our client certificate ({exc.reason or exc})",
                permanent=True,
            )
        return Problem(f"{where}: TLS handshake failed ({exc.reason or exc})", permanent=False)
    if isinstance(exc, socket.gaierror):
        return Problem(
            f"{where}: the host name {settings.host!r} does not resolve ({exc.strerror or exc}); "
            "add it to DNS or /etc/hosts, or use the broker's IP address",
            permanent=False,
        )
    if isinstance(exc, ConnectionRefusedError):
        return Problem(
            f"{where}: connection refused, nothing listens on that port "
            "(is the broker running, and is this its port?)",
            permanent=False,
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Problem(
            f"{where}: no answer (timed out); is the host up, the address right, "
            "and the port open in its firewall?",
            permanent=False,
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Problem(f"{where}: {exc.strerror} (check the address and the network)", False)
    if isinstance(exc, OSError):
        return Problem(f"{where}: {exc.strerror or exc}", permanent=False)
    return Problem(f"{where}: {exc!r}" if exc else where, permanent=False)


def _verification_problem(
    exc: ssl.SSLCertVerificationError, settings: ConnectionSettings, fetch_names: bool
) -> Problem:
    code = getattr(exc, "verify_code", None)
    detail = getattr(exc, "verify_message", None) or str(exc)
    where = f"TLS verification of the broker at {settings.address} failed"
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = certificate_names(settings.host, settings.port) if fetch_names else None
        asked = f"{_host_kind(settings.host)} {settings.host!r}"
        if names:
            listed = ", ".join(names)
            dial = " or ".join(f"{n}:{settings.port}" for n in names[:3])
            return Problem(
                f"{where}: its certificate names {listed}, not the {asked} we asked for; "
                f"dial {dial} instead (--broker), or make a broker home whose "
                f"`fedmq broker init --host` includes {settings.host}",
                permanent=True,
            )
        return Problem(
            f"{where}: its certificate does not name the {asked} we asked for ({detail})", True
        )
    if code in _UNTRUSTED:
        return Problem(
            f"{where}: its certificate is not signed by the CA in {settings.ca_file} "
            "(another broker home's CA, or another broker on that address?)",
            permanent=True,
        )
    if code in (_EXPIRED, _NOT_YET_VALID):
        return Problem(f"{where}: {detail} (check both machines' clocks)", permanent=True)
    return Problem(f"{where}: {detail}", permanent=True)


def from_connack(reason_code: int, settings: ConnectionSettings) -> Problem:
    """A CONNACK failure (reason code >= 128) as a Problem."""
    who = _account(settings)
    what = _CONNACK_PERMANENT.get(reason_code)
    if reason_code in (134, 135):
        return Problem(
            f"the broker at {settings.address} refused {who}: {what}; check the credentials "
            "file (a removed device, or a password from another broker home, is refused)",
            permanent=True,
        )
    if what is not None:
        return Problem(f"the broker at {settings.address} refused {who}: {what}", True)
    names = {136: "server unavailable", 137: "server busy", 151: "quota exceeded"}
    text = names.get(reason_code, f"reason code {reason_code}")
    return Problem(f"the broker at {settings.address} turned {who} away: {text}", False)


def closed_before_connack(settings: ConnectionSettings) -> Problem:
    """The broker closed the socket without answering our CONNECT."""
    if settings.tls:
        hint = "does it require a client certificate?"
    else:
        hint = "is this its TLS port? a --ca-file turns TLS on"
    return Problem(
        f"cannot connect to the broker at {settings.address}: it closed the connection "
        f"without answering ({hint})",
        permanent=False,
    )


def from_suback(
    reason_codes: Sequence[int], topics: Sequence[str], settings: ConnectionSettings
) -> Problem | None:
    """The first refused subscription of a SUBACK as a Problem, None if all were granted.

    mosquitto 2.0 grants a subscription its ACL denies (the client then receives
    nothing); other brokers answer 135 (not authorized)."""
    for i, code in enumerate(reason_codes):
        if code >= 128:
            topic = topics[i] if i < len(topics) else "a topic"
            why = "not authorized" if code == 135 else f"reason code {code}"
            return Problem(
                f"the broker at {settings.address} refused {_account(settings)} a "
                f"subscription to {topic}: {why} (is this the right account for this role?)",
                permanent=True,
            )
    return None


def from_puback(
    reason_code: int, topic: str | None, settings: ConnectionSettings
) -> Problem | None:
    """A refused QoS 1 publish (PUBACK reason code >= 128) as a Problem, else None.

    mosquitto 2 answers a publish its ACL denies with 135 (not authorized)."""
    if reason_code < 128:
        return None
    where = topic or "a topic"
    if reason_code == 135:
        return Problem(
            f"the broker at {settings.address} refused {_account(settings)} publishing to "
            f"{where}: not authorized (the ACL does not let this account write there; is it "
            "the right credentials file, and the right --device-id / --federation?)",
            permanent=True,
        )
    names = {149: "packet too large", 151: "quota exceeded", 144: "topic name invalid"}
    return Problem(
        f"the broker at {settings.address} refused a publish to {where}: "
        f"{names.get(reason_code, f'reason code {reason_code}')}",
        permanent=False,
    )
