"""Shamir secret sharing over the prime field GF(P), P = 2**521 - 1.

SecAgg+ shares two kinds of secrets per device (its self-mask seed and its
mask private key), each at most 64 bytes, so a Mersenne prime just above 512
bits holds any of them as one field element and shares serialize to a fixed
66 bytes. Shares arrive from other devices, so the parsers and ``combine``
refuse malformed input with ``ValueError`` and nothing else.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64  # 512 bits, always < PRIME


def _check_x(x: object) -> int:
    # bool is an int subclass; True as a share index would be a bug, not an index
    if not isinstance(x, int) or isinstance(x, bool):
        raise ValueError(f"share index must be an int, got {type(x).__name__}")
    if not 1 <= x < PRIME:
        raise ValueError(f"share index {x} is outside 1..P-1")
    return x


def _check_threshold(threshold: object) -> int:
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    return threshold


def split(
    secret: bytes,
    xs: Sequence[int],
    threshold: int,
    *,
    coefficients: Sequence[int] | None = None,
) -> dict[int, int]:
    """Share ``secret`` at the points ``xs`` so that any ``threshold`` of them recover it.

    The polynomial has degree ``threshold - 1`` and constant term the secret read
    as a big-endian integer. Its higher coefficients are uniform in GF(P) (from
    ``secrets``), unless ``coefficients`` gives them, lowest degree first, which
    only known-answer tests should do.
    """
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes")
    points = [_check_x(x) for x in xs]
    if len(set(points)) != len(points):
        raise ValueError("share indices must be distinct")
    threshold = _check_threshold(threshold)
    if threshold > len(points):
        raise ValueError(f"threshold {threshold} exceeds the number of shares {len(points)}")
    if coefficients is None:
        coeffs = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    else:
        coeffs = list(coefficients)
        if len(coeffs) != threshold - 1:
            raise ValueError(f"need {threshold - 1} coefficients, got {len(coeffs)}")
        for c in coeffs:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < PRIME:
                raise ValueError("coefficients must be ints in 0..P-1")
    poly = [int.from_bytes(secret, "big"), *coeffs]
    shares: dict[int, int] = {}
    for x in points:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int], threshold: int, length: int) -> bytes:
    """Recover the secret (``length`` big-endian bytes) by Lagrange interpolation at 0.

    Exactly ``threshold`` shares are used, those with the smallest indices, so
    the result does not depend on the order they arrived in. Wrong shares give a
    wrong secret (Shamir has no integrity); callers check the recovered value
    against something authenticated.
    """
    threshold = _check_threshold(threshold)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    for x, y in shares.items():
        _check_x(x)
        if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < PRIME:
            raise ValueError(f"share value at index {x} is not in 0..P-1")
    xs = sorted(shares)[:threshold]
    # Lagrange at 0: secret = Σ y_i · Π_{j≠i} x_j / Π_{j≠i} (x_j − x_i). The denominators are
    # inverted together (one modular inverse and 3t products), which keeps a combine at
    # t = 68 (1,000 devices sized for 30% dropout) near a millisecond.
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        nums.append(num)
        dens.append(den)
    secret = 0
    for xi, num, inverse in zip(xs, nums, _inverses(dens)):
        secret = (secret + shares[xi] * num * inverse) % PRIME
    if secret.bit_length() > 8 * length:
        raise ValueError(f"recovered value does not fit in {length} bytes (wrong shares?)")
    return secret.to_bytes(length, "big")


def _inverses(values: list[int]) -> list[int]:
    """Each value's inverse mod PRIME with a single ``pow`` (Montgomery's batch trick)."""
    prefix, running = [], 1
    for v in values:
        prefix.append(running)
        running = running * v % PRIME
    inverse = pow(running, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return out


def share_to_bytes(y: int) -> bytes:
    """One share value as exactly ``SHARE_BYTES`` big-endian bytes (fixed size: no length leak)."""
    if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < PRIME:
        raise ValueError("share value must be an int in 0..P-1")
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    """Parse a share value sent by a peer; ``ValueError`` unless it is exactly a field element."""
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise ValueError(f"share must be bytes, got {type(b).__name__}")
    if len(b) != SHARE_BYTES:
        raise ValueError(f"share must be {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ValueError("share value is not below P")
    return y
