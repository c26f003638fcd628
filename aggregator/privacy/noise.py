"""Gaussian noise for DP-FedAvg, drawn from a keyed cryptographic stream.

The aggregator adds ``N(0, (sigma*C)^2)`` to the sum of clipped updates. The noise
must be reproducible (a run resumed from a checkpoint adds exactly the noise an
uninterrupted one would) yet unpredictable to anyone without the secret key: a
Mersenne Twister (torch's, numpy's) can be reconstructed from its outputs, after
which the noise could be subtracted and the privacy guarantee is gone. So each
label (e.g. ``"round-17"``) gets its own ChaCha20 key derived with HKDF-SHA256 from
the federation's secret key, and the keystream is turned into normals:

* the keystream is read as little-endian uint64 words ``w0, w1, w2, ...``;
* each word gives a uniform ``u = ((w >> 11) + 1) * 2**-53`` in ``(0, 1]`` (53 bits,
  never 0, so the logarithm is finite);
* each pair ``(u1, u2) = (word 2i, word 2i+1)`` gives, by Box-Muller, value ``2i`` =
  ``sqrt(-2 ln u1) cos(2 pi u2)`` and value ``2i+1`` = ``sqrt(-2 ln u1) sin(2 pi u2)``.

Values are produced in chunks of whole pairs from one continuous stream, so the
chunk size (``CHUNK_PAIRS``) changes memory use, never the values.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
# HKDF "info" prefix: binds the derived keys to this use, so the same secret key
# could serve another purpose without the streams ever coinciding.
KDF_INFO = b"fedmq/privacy/noise/v1:"
# Pairs of normals per chunk: 2**20 pairs = 16 MiB of keystream, ~2M float64 values.
CHUNK_PAIRS = 1 << 20
# ChaCha20's 32-bit block counter covers 2**32 blocks of 64 bytes = 4 pairs each.
MAX_VALUES = 2 * 4 * (1 << 32)


def new_key() -> bytes:
    """A fresh secret noise key (32 random bytes from the OS CSPRNG)."""
    return secrets.token_bytes(KEY_BYTES)


def derive_key(key: bytes, label: str) -> bytes:
    """ChaCha20 key of stream ``label``: HKDF-SHA256(ikm=key, no salt, info=KDF_INFO + label)."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < KEY_BYTES:
        raise ValueError(f"noise key must be at least {KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO + label.encode())
    return hkdf.derive(bytes(key))


def standard_normals(key: bytes, label: str, count: int) -> torch.Tensor:
    """The first ``count`` N(0, 1) values (float64) of stream ``label`` under ``key``."""
    if count < 0 or count > MAX_VALUES:
        raise ValueError(f"count must be in [0, {MAX_VALUES}], got {count}")
    derived = derive_key(key, label)
    stream = Cipher(algorithms.ChaCha20(derived, bytes(16)), mode=None).encryptor()
    pairs_total = (count + 1) // 2
    out = torch.empty(2 * pairs_total, dtype=torch.float64)  # one spare value if count is odd
    done = 0
    while done < pairs_total:
        pairs = min(CHUNK_PAIRS, pairs_total - done)
        words = np.frombuffer(stream.update(bytes(16 * pairs)), dtype="<u8")
        uniforms = torch.from_numpy(((words >> np.uint64(11)) + np.uint64(1)).astype(np.float64))
        uniforms.mul_(2.0**-53)
        radius = uniforms[0::2].log().mul_(-2.0).sqrt_()
        angle = uniforms[1::2].mul_(2.0 * math.pi)
        target = out[2 * done : 2 * (done + pairs)].view(pairs, 2)
        torch.mul(radius, angle.cos(), out=target[:, 0])
        torch.mul(radius, angle.sin(), out=target[:, 1])
        done += pairs
    return out[:count]


def gaussian(key: bytes, label: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std^2) noise of ``shape`` (float64), fixed by ``key`` and ``label``."""
    if not (std >= 0.0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    count = math.prod(shape)
    return standard_normals(key, label, count).mul_(std).view(shape)


def gaussian_like(
    key: bytes, label: str, tensors: Mapping[str, torch.Tensor], std: float
) -> dict[str, torch.Tensor]:
    """Noise (float64) for each floating-point tensor of ``tensors``, from one stream.

    Tensors are filled in sorted-name order from the single stream ``label``, so the
    result does not depend on the mapping's order. Non-floating tensors (e.g. batch
    norm counters) get no noise and are left out of the result.
    """
    names = sorted(name for name, value in tensors.items() if value.is_floating_point())
    sizes = [tensors[name].numel() for name in names]
    flat = gaussian(key, label, (sum(sizes),), std)
    return {name: part.view(tensors[name].shape) for name, part in zip(names, flat.split(sizes))}
