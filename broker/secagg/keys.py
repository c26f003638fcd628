"""X25519 key agreement and authenticated encryption of shares.

Each SecAgg+ device holds two X25519 key pairs: one whose agreements with its
neighbours seed the pairwise masks, one whose agreements key the channel that
carries its Shamir shares (relayed by the aggregator, so sealed end to end).
HKDF turns a raw X25519 output, which is not uniform, into a 32-byte key, and
its ``info`` binds the key to one purpose and round so one agreement never
serves twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
INFO_PREFIX = b"fedmq secagg "


@dataclass(frozen=True)
class KeyPair:
    """An X25519 private key and its public key as the 32 raw bytes that travel."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(X25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: X25519PrivateKey) -> KeyPair:
        return cls(private, private.public_key().public_bytes_raw())


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what gets Shamir-shared)."""
    return key.private_bytes_raw()


def private_from_bytes(b: bytes) -> X25519PrivateKey:
    """A private key from 32 raw bytes (e.g. recombined from shares); ValueError otherwise."""
    if not isinstance(b, (bytes, bytearray)) or len(b) != KEY_BYTES:
        raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(b))


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared with the owner of ``peer_public``, bound to ``info``.

    X25519 then HKDF-SHA256 (no salt, info ``b"fedmq secagg " + info``). Both
    sides get the same key. ValueError if the peer's key is malformed or of low
    order (the all-zero shared secret, which would let a peer force a known key).
    """
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
        raise ValueError(f"X25519 public key must be {KEY_BYTES} bytes")
    if not isinstance(info, (bytes, bytearray)):
        raise ValueError("info must be bytes")
    peer = X25519PublicKey.from_public_bytes(bytes(peer_public))
    try:
        shared = private.exchange(peer)
    except ValueError as exc:
        raise ValueError("X25519 agreement refused: peer public key is of low order") from exc
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=INFO_PREFIX + bytes(info)
    )
    return hkdf.derive(shared)


def _aead(key: bytes) -> ChaCha20Poly1305:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"ChaCha20-Poly1305 key must be {KEY_BYTES} bytes")
    return ChaCha20Poly1305(bytes(key))


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce; returns nonce || ciphertext || tag.

    A random 96-bit nonce is safe here: each agreed key seals a handful of messages.
    ``aad`` should name sender, recipient and round so a sealed share cannot be replayed
    elsewhere.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, bytes(plaintext), bytes(aad))


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open a ``seal`` blob; ValueError if it is short, tampered, or for another key or aad."""
    aead = _aead(key)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError("sealed blob must be bytes")
    if not isinstance(aad, (bytes, bytearray)):
        raise ValueError("aad must be bytes")
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"sealed blob too short ({len(blob)} bytes)")
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], bytes(aad))
    except InvalidTag as exc:
        raise ValueError("sealed blob failed authentication") from exc
