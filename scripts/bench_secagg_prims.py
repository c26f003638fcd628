"""Benchmark the SecAgg+ primitives a device and the aggregator call per round.

    python scripts/bench_secagg_prims.py

Prints the median of repeated runs for: expanding a 100,000-element uint32
mask from a seed, Shamir-splitting a 32-byte secret into 20 shares, combining
11 of them, and one X25519 + HKDF key agreement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from broker.secagg import keys, prg, shamir


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: imports, OpenSSL contexts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    seed = bytes(range(32))
    t = median_seconds(lambda: prg.mask(seed, 100_000), 20)
    print(f"mask expansion, 100k uint32:        {t * 1e3:8.3f} ms   (median of 20)")

    secret = bytes(range(32))
    xs = list(range(1, 21))
    t = median_seconds(lambda: shamir.split(secret, xs, 11), 200)
    print(f"shamir split, 32 B into 20 (t=11):  {t * 1e6:8.1f} us   (median of 200)")

    shares = shamir.split(secret, xs, 11)
    subset = {x: shares[x] for x in xs[9:]}
    assert shamir.combine(subset, 11, 32) == secret
    t = median_seconds(lambda: shamir.combine(subset, 11, 32), 200)
    print(f"shamir combine, 11 shares:          {t * 1e6:8.1f} us   (median of 200)")

    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    t = median_seconds(lambda: keys.agree(a.private, b.public, b"bench"), 200)
    print(f"agree (X25519 + HKDF-SHA256):       {t * 1e6:8.1f} us   (median of 200)")


if __name__ == "__main__":
    main()
