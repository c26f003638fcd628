"""The task's ``[secure_aggregation]`` table, checked against the strategy::

    [secure_aggregation]
    enabled = true          # the bare table turns it on
    clip_range = 1.0        # each coordinate of a device's weighted update, clipped to +-this
    max_weight = 10000      # sample count at which a device's weight saturates
    phase_deadline = 60     # seconds for each of the key, share and unmasking phases
    max_dropout = 0.3       # the fraction of devices that may drop after sharing their keys

It works with the strategies whose result is a function of the weighted sum of the
updates (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad) and refuses the
others (median, Krum, ...: they need each update in the clear). With ``[privacy]``
the devices clip their updates and add the noise themselves, in shares
(``noise_per_device``): every device counts the same (``max_weight`` is 1).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aggregator.strategies import STRATEGIES, Params, Strategy, StrategyError
from broker.secagg.plan import SecurePlan

SECTION = "secure_aggregation"


@dataclass(frozen=True)
class SecureSettings:
    clip_range: float
    max_weight: int
    phase_deadline: float
    max_dropout: float = 0.3  # sizes the graph: more neighbours, more tolerance, more work
    noise_multiplier: float = 0.0  # sigma of [privacy], 0 without it
    dp_clip: float = 0.0  # C of [privacy]

    def plan(self, selected: int) -> SecurePlan:
        """A fresh session's plan for a round sized for ``selected`` devices."""
        return SecurePlan(
            session=secrets.token_hex(16),
            clip=self.clip_range,
            max_weight=self.max_weight,
            selected=selected,
            noise=self.noise_per_device(selected),
            deadline=self.phase_deadline,
            dropout=self.max_dropout,
        )

    def noise_per_device(self, selected: int) -> float:
        """sigma * C / sqrt(n'): n' devices each adding this much sum to sigma * C."""
        return self.noise_multiplier * self.dp_clip / math.sqrt(selected)


def secure_settings(table: Mapping[str, Any] | None, strategy: Strategy) -> SecureSettings | None:
    """The checked settings, or None without the table; ``StrategyError`` names the key."""
    if not table:
        return None
    params = Params(table, section=SECTION)
    if not params.flag("enabled", True):
        return None
    if not strategy.secure_sum:
        sums = sorted(name for name, cls in STRATEGIES.items() if cls.secure_sum)
        raise StrategyError(
            f"[{SECTION}] needs a strategy that is a sum of the updates ({', '.join(sums)}); "
            f"{strategy.name!r} needs each device's update in the clear"
        )
    if strategy.clip_norm is not None:
        raise StrategyError(
            f"[strategy] clip_norm cannot be used with [{SECTION}]: the aggregator never sees "
            "one update to clip it (use [privacy] clip_norm: the devices clip)"
        )
    sigma = getattr(strategy, "noise_multiplier", None) or 0.0
    dp_clip = getattr(strategy, "dp_clip", None) or 0.0
    private = dp_clip > 0
    # with DP the clipped update (norm C) plus its noise must fit in the range
    default_range = dp_clip * (1 + 6 * sigma) if private else 1.0
    clip_range = params.number("clip_range", default_range, low=0.0, low_open=True)
    max_weight = params.integer("max_weight", 1 if private else 10_000, low=1)
    if private and max_weight != 1:
        raise StrategyError(
            f"[{SECTION}] max_weight must be 1 with [privacy]: every device counts the same"
        )
    deadline = params.number("phase_deadline", 60.0, low=0.1)
    max_dropout = params.number("max_dropout", 0.3, low=0.0, high=0.49)
    params.done(SECTION)
    return SecureSettings(
        clip_range=clip_range,
        max_weight=max_weight,
        phase_deadline=deadline,
        max_dropout=max_dropout,
        noise_multiplier=sigma,
        dp_clip=dp_clip,
    )
