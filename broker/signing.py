"""Ed25519 signatures on model and update payloads.

The aggregator signs every global model, each device signs its updates. A
signature covers ``broker.codec.content_digest(tensors, metadata)`` (which
leaves out the ``signature`` key itself) and travels base64-encoded in the
payload's metadata under ``signature``. Keys are PEM files: private keys
PKCS#8 (mode 0600), public keys SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import CodecError, ConfigError
from broker.passwords import write_secret_file

if TYPE_CHECKING:
    import torch

SIGNATURE_KEY = "signature"


def _digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    # imported here so that key handling (the broker CLI) does not pay for importing torch
    from broker.codec import content_digest

    return content_digest(tensors, metadata)


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_private(key: Ed25519PrivateKey, path: str | Path) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return write_secret_file(path, pem)


def write_public(key: Ed25519PublicKey, path: str | Path) -> Path:
    return write_secret_file(path, public_pem(key), mode=0o644)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> Ed25519PrivateKey:
    """Make an Ed25519 key pair: private key at ``private_path`` (0600), public beside it."""
    key = Ed25519PrivateKey.generate()
    write_private(key, private_path)
    write_public(key.public_key(), public_path)
    return key


def load_private(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def sign(
    private_key: Ed25519PrivateKey,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> str:
    """Base64 signature over the payload's content; store it as ``metadata["signature"]``."""
    return base64.b64encode(private_key.sign(_digest(tensors, metadata))).decode()


def verify(
    public_key: Ed25519PublicKey,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Return if ``metadata["signature"]`` is ``public_key``'s signature of this content.

    Raises ``CodecError`` with reason ``missing_signature`` or ``bad_signature``.
    """
    encoded = metadata.get(SIGNATURE_KEY)
    if not encoded:
        raise CodecError("payload carries no signature", reason="missing_signature")
    try:
        signature = base64.b64decode(encoded, validate=True)
        public_key.verify(signature, _digest(tensors, metadata))
    except (InvalidSignature, binascii.Error, ValueError):
        raise CodecError("signature does not match the payload", reason="bad_signature") from None
