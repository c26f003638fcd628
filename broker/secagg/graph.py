"""The SecAgg+ communication graph: a random Harary graph over the round's devices.

Devices mask only with their graph neighbours, so each device's work is
O(log n) instead of O(n). The order on the ring is a keyed shuffle, so the
aggregator cannot place a chosen victim among colluders by picking ids, and
anyone holding the seed recomputes the same graph.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from broker.secagg.prg import SEED_BYTES, ZERO_NONCE

_CHUNK_WORDS = 1024


ROUND_FAILURE = 1e-3  # the chance, at the dropout bound, that some secret lacks t shares


def degree_for(n: int, dropout: float = 0.0) -> int:
    """2 * ceil(log2 n), raised until the round survives ``dropout`` (the fraction of the
    devices that may drop after sharing): at most ROUND_FAILURE that any of the n devices
    keeps fewer than t = degree // 2 + 1 of its neighbours. At most n - 1 (the complete
    graph); 0 for a single device. At 1,000 devices: 20 for no dropout, 134 for 30%."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of devices must be an int >= 1, got {n!r}")
    if not 0.0 <= dropout < 0.5:
        raise ValueError(f"dropout must be in [0, 0.5), got {dropout!r}")
    if n == 1:
        return 0
    k = min(2 * (n - 1).bit_length(), n - 1)  # (n-1).bit_length() == ceil(log2 n)
    while k < n - 1 and n * short_of_threshold(k, 1.0 - dropout) > ROUND_FAILURE:
        k += 2
    return min(k, n - 1)


def short_of_threshold(degree: int, keep: float) -> float:
    """P[fewer than degree // 2 + 1 of ``degree`` neighbours stay], each with chance ``keep``."""
    t = threshold_for(degree)
    return sum(math.comb(degree, i) * keep**i * (1.0 - keep) ** (degree - i) for i in range(t))


def threshold_for(degree: int) -> int:
    """A strict majority of a device's neighbours plus one: degree // 2 + 1.

    Honest neighbours reveal either the self-mask share or the key share of a
    device, never both; with a majority threshold the aggregator cannot gather
    enough of both kinds.
    """
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    return degree // 2 + 1


class _Words:
    """Unsigned 32-bit words from the ChaCha20 keystream of a seed, read lazily."""

    def __init__(self, seed: bytes) -> None:
        cipher = Cipher(algorithms.ChaCha20(seed, ZERO_NONCE), mode=None)
        self._encryptor = cipher.encryptor()
        self._buffer: list[int] = []
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._buffer):
            chunk = self._encryptor.update(bytes(4 * _CHUNK_WORDS))
            self._buffer = list(struct.unpack(f"<{_CHUNK_WORDS}I", chunk))
            self._pos = 0
        word = self._buffer[self._pos]
        self._pos += 1
        return word

    def below(self, bound: int) -> int:
        """Uniform in 0..bound-1: reject the top 2**32 mod bound words so no value is favoured."""
        limit = 2**32 - (2**32 % bound)
        while True:
            word = self.next()
            if word < limit:
                return word % bound


def shuffled(devices: Sequence[str], seed: bytes) -> list[str]:
    """The sorted device ids in a Fisher-Yates order driven by the seed's keystream."""
    order = sorted(devices)
    words = _Words(seed)
    for i in range(len(order) - 1, 0, -1):
        j = words.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(devices: Sequence[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted) in a random Harary graph of the given degree.

    Ids shuffled by ``seed`` sit on a cycle; each is joined to ``degree // 2``
    successors and predecessors, and if ``degree`` is odd and n even, to the
    device opposite. ``degree >= n - 1`` gives the complete graph. Symmetric,
    no self loops, deterministic in (set of devices, degree, seed).
    """
    ids = list(devices)
    if any(not isinstance(d, str) for d in ids):
        raise ValueError("device ids must be strings")
    if len(set(ids)) != len(ids):
        raise ValueError("device ids must be distinct")
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"graph seed must be {SEED_BYTES} bytes")
    n = len(ids)
    if degree >= n - 1:
        everyone = sorted(ids)
        return {d: tuple(x for x in everyone if x != d) for d in everyone}
    ring = shuffled(ids, bytes(seed))
    adjacent: dict[str, set[str]] = {d: set() for d in ring}
    offsets = list(range(1, degree // 2 + 1))
    if degree % 2 == 1 and n % 2 == 0:
        offsets.append(n // 2)
    for i, d in enumerate(ring):
        for k in offsets:
            for other in (ring[(i + k) % n], ring[(i - k) % n]):
                adjacent[d].add(other)
                adjacent[other].add(d)
    return {d: tuple(sorted(adjacent[d])) for d in sorted(ids)}
