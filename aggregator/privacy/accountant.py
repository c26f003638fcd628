"""The (epsilon, delta) spent by DP-FedAvg, from Google's ``dp-accounting`` RDP accountant.

A DP-FedAvg round samples each device with probability ``q`` (the sampling rate),
clips each update to L2 norm C and adds N(0, (sigma*C)^2) to their sum: a
Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma``. ``rounds``
rounds compose. We do not re-derive the analysis; this is a thin, validated
wrapper over the library (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", section 3; Mironov 2017 for RDP), plus the inverse
(``noise_for_epsilon``) for choosing sigma from a privacy budget.

The library logs "failed to converge" warnings through absl for some RDP orders
(it then leaves those orders out, which only loosens the bound a little); they
say nothing a user can act on, so they are silenced for the duration of a call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import dp_accounting
from dp_accounting.rdp import RdpAccountant

# Largest noise multiplier noise_for_epsilon will try before calling a budget unreachable.
MAX_NOISE_MULTIPLIER = 1e4


def _not_from_dp_accounting(record: logging.LogRecord) -> bool:
    return "dp_accounting" not in record.pathname


@contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    """Drop the library's absl log records (and only them) while the block runs."""
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_not_from_dp_accounting)
    try:
        yield
    finally:
        absl_logger.removeFilter(_not_from_dp_accounting)


def _check(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (0 < sampling_rate <= 1):
        raise ValueError(
            f"sampling_rate (the chance a device is in a round) must be in (0, 1], "
            f"got {sampling_rate}"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the subsampled Gaussian mechanism.

    ``inf`` without noise (``noise_multiplier == 0``), ``0`` before any round.
    """
    _check(noise_multiplier, sampling_rate, rounds, delta)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = RdpAccountant()
    with _quiet_dp_accounting():
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return float(accountant.get_epsilon(delta))


def epsilon_of_rounds(noise_multipliers: list[float], sampling_rate: float, delta: float) -> float:
    """Epsilon at ``delta`` after rounds of differing noise multipliers, composed: secure
    aggregation's rounds are as noisy as the devices that stayed made them."""
    for sigma in noise_multipliers:
        _check(sigma, sampling_rate, 0, delta)
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) == 0:
        return math.inf
    accountant = RdpAccountant()
    with _quiet_dp_accounting():
        for sigma in noise_multipliers:
            event = dp_accounting.GaussianDpEvent(sigma)
            if sampling_rate < 1:
                event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
            accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float, sampling_rate: float, rounds: int, delta: float, rel_tol: float = 1e-4
) -> float:
    """Smallest noise multiplier (within ``rel_tol``) whose epsilon is at most the target.

    Bisection on sigma (epsilon falls as sigma grows); the sigma returned is the upper
    end of the final bracket, so its epsilon never exceeds ``target_epsilon``.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    _check(1.0, sampling_rate, rounds, delta)
    if rounds == 0:
        return 0.0

    def within(sigma: float) -> bool:
        return epsilon(sigma, sampling_rate, rounds, delta) <= target_epsilon

    high = 1.0
    while not within(high):
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"epsilon {target_epsilon} at delta {delta} over {rounds} rounds needs a "
                f"noise multiplier above {MAX_NOISE_MULTIPLIER:g}"
            )
    low = high / 2
    while within(low):
        high, low = low, low / 2
    while high - low > rel_tol * high:
        middle = (low + high) / 2
        if within(middle):
            high = middle
        else:
            low = middle
    return high
