"""Pseudorandom masks expanded from a 32-byte seed with ChaCha20.

A SecAgg+ device adds one mask per neighbour plus a self mask to its quantized
update, each as long as the model, so expansion must be fast: one call into
OpenSSL's ChaCha20 and a zero-copy view as uint32.

cryptography's ``algorithms.ChaCha20(key, nonce)`` takes a 16-byte nonce that
is the RFC 8439 initial block counter (4 bytes, little-endian) followed by the
12-byte RFC nonce.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
NONCE_BYTES = 16
ZERO_NONCE = bytes(NONCE_BYTES)
_WORD = np.dtype("<u4")


def keystream(key: bytes, nonce: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of the ChaCha20 keystream (zeros encrypted) under ``key``, ``nonce``.

    ``nonce`` is cryptography's 16 bytes: little-endian block counter, then the 12-byte nonce.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) != SEED_BYTES:
        raise ValueError(f"ChaCha20 key must be {SEED_BYTES} bytes")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"ChaCha20 nonce must be {NONCE_BYTES} bytes (counter || nonce)")
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    encryptor = Cipher(algorithms.ChaCha20(bytes(key), bytes(nonce)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values: the keystream of ``seed`` read as little-endian words.

    The nonce is fixed (all zero): every seed is used for exactly one mask
    (self-mask seeds are fresh per round, pairwise seeds come from a key
    agreement whose HKDF ``info`` names the round), so a (key, nonce) pair never
    repeats. The array is writable and owns no shared state.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"mask length must be an int >= 0, got {length!r}")
    stream = bytearray(keystream(seed, ZERO_NONCE, 4 * length))
    # bytearray makes the view writable; astype is a no-op on little-endian hosts
    return np.frombuffer(stream, dtype=_WORD).astype(np.uint32, copy=False)
