"""Fixed-point encoding of float updates into uint32, sized so that sums never wrap.

Masks cancel only in modular arithmetic, so devices send integers mod 2**32.
Each device maps its clipped values onto 0..levels with ``levels = (2**32-1) // n``,
hence the true sum of n encodings is below 2**32 and the unmasked total mod
2**32 *is* the integer sum: decoding needs no guess about wrap-around.
Stochastic rounding keeps each encoding unbiased, so the error of the mean
shrinks as devices are added instead of accumulating one rounding bias.
"""

from __future__ import annotations

import math

import numpy as np

MODULUS = 2**32
_MAX_LEVELS = MODULUS - 1
_INTS = (int, np.integer)  # numpy ints too: counts often come from array sizes


def levels_for(n: int) -> int:
    """The largest per-device level count such that a sum of ``n`` encodings is < 2**32."""
    if not isinstance(n, _INTS) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of devices must be an int >= 1, got {n!r}")
    return _MAX_LEVELS // int(n)


def _check(clip: float, levels: int) -> None:
    if not (isinstance(clip, (int, float, np.floating)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    if not isinstance(levels, _INTS) or isinstance(levels, bool) or not 1 <= levels <= _MAX_LEVELS:
        raise ValueError(f"levels must be an int in 1..2**32-1, got {levels!r}")


def quantize(x: np.ndarray, clip: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Encode ``x`` as uint32 in [0, levels]: clamp to [-clip, clip], scale, round stochastically.

    ``floor(y + u)`` with u ~ U[0, 1) rounds up with probability frac(y), so its
    expectation is y exactly. NaN cannot be encoded and raises ValueError; +-inf clamp.
    """
    _check(clip, levels)
    values = np.asarray(x, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("cannot quantize NaN")
    clipped = np.clip(values, -clip, clip)
    y = (clipped + clip) * (levels / (2.0 * clip))
    rounded = np.floor(y + rng.random(y.shape))
    return np.clip(rounded, 0, levels).astype(np.uint32)


def dequantize_sum(total: np.ndarray, count: int, clip: float, levels: int) -> np.ndarray:
    """Decode the exact integer sum of ``count`` encodings back to the float sum."""
    _check(clip, levels)
    if not isinstance(count, _INTS) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    values = np.asarray(total)
    if values.dtype.kind not in "iu":
        raise ValueError(f"total must be an integer array, got {values.dtype}")
    return values.astype(np.float64) * (2.0 * clip / levels) - count * clip


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    # refusing other dtypes matters: uint32 + int64 would silently upcast and not wrap
    for name, arr in (("a", a), ("b", b)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint32:
            raise ValueError(f"{name} must be a uint32 numpy array")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} and {b.shape}")


def add_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2**32, written into ``a`` (which must be writable) and returned.

    In place because the aggregator folds hundreds of model-sized masks into one
    running total; pass ``a.copy()`` to keep ``a``.
    """
    _check_pair(a, b)
    return np.add(a, b, out=a)


def sub_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) mod 2**32, written into ``a`` (which must be writable) and returned."""
    _check_pair(a, b)
    return np.subtract(a, b, out=a)
