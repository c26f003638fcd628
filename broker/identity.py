"""Device identities that other devices can check: the federation registry's word that
an Ed25519 key is a device's.

Secure aggregation needs devices to trust each other's key advertisements, which
reach them through the aggregator; if the aggregator could substitute keys it could
pose as every neighbour of a device and unmask it. So ``fedmq broker add-device``
signs each device's public key with the federation's registry key
(``keys/registry.key`` in the broker home, made at ``broker init``), and every device
holds the registry's public key. The guarantee is as strong as the registry key is
kept away from the aggregator's process: provision devices where it runs only if
you trust it with that.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import CodecError

_CONTEXT = b"fedmq device identity\x00"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _statement(federation: str, device_id: str, public: bytes) -> bytes:
    return _CONTEXT + federation.encode() + b"\x00" + device_id.encode() + b"\x00" + public


def certify(
    registry: Ed25519PrivateKey, federation: str, device_id: str, public: Ed25519PublicKey
) -> bytes:
    """The registry's signature binding ``public`` to ``device_id`` in ``federation``."""
    return registry.sign(_statement(federation, device_id, raw_public(public)))


def check(
    registry: Ed25519PublicKey, federation: str, device_id: str, public: bytes, cert: bytes
) -> Ed25519PublicKey:
    """The device's key if ``cert`` is the registry's signature of it, else ``CodecError``."""
    try:
        registry.verify(cert, _statement(federation, device_id, public))
        return Ed25519PublicKey.from_public_bytes(public)
    except (InvalidSignature, ValueError):
        raise CodecError(
            f"the key advertised for device {device_id!r} is not certified by the "
            "federation's registry",
            reason="bad_identity",
        ) from None
