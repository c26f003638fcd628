"""Who attacks in the demo, and how: ``fedmq demo --attack KIND --attackers F``.

The poison itself (sign_flip, scale, noise, constant, their default scales) is pure tensor
math in ``device_agent/attacks.py``, where the agent can use it without depending on
fedmq; here is only the demo's choice of attackers, made from the seed so that a run can
be repeated, and the checks on what a user typed.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.errors import ConfigError
from device_agent.attacks import (
    DEFAULT_SCALES,
    KINDS,
    Attacker,
    default_scale,
    describe,
    poison,
)

DEFAULT_FRACTION = 0.2  # of the devices, when --attack is given without --attackers
ATTACK_DEVICES = 10  # the demo's default number of devices under attack: one person each


@dataclass(frozen=True)
class AttackPlan:
    """``kind`` of attack at ``scale``, sent by the devices with these indices."""

    kind: str
    scale: float
    attackers: tuple[int, ...]

    def describe(self) -> str:
        return describe(self.kind, self.scale)

    def attacker(self, device_id: str) -> Attacker:
        return Attacker(self.kind, self.scale, device_id)


def attacker_count(devices: int, fraction: float) -> int:
    """``floor(fraction * devices)``, at least one for a fraction above 0; always fewer than
    half the devices (more would be a majority no aggregation rule can out-vote)."""
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 0.5):
        raise ConfigError(
            f"--attackers is the fraction of devices that attack: 0 <= F < 0.5, got {fraction!r}"
        )
    count = math.floor(fraction * devices + 1e-9)
    if fraction > 0:
        count = max(count, 1)
    if 2 * count >= devices and count > 0:
        raise ConfigError(
            f"--attackers {fraction:g} of {devices} device(s) makes {count} attacker(s), not a "
            f"minority: use more devices (at least {2 * count + 1})"
        )
    return count


def choose_attackers(devices: int, count: int, seed: int) -> tuple[int, ...]:
    """``count`` device indices out of ``range(devices)``, drawn from the seed, sorted."""
    digest = hashlib.sha256(f"fedmq-demo-attackers/{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:16], "big"))
    return tuple(sorted(rng.sample(range(devices), count)))


def plan_attack(
    kind: str | None, devices: int, fraction: float | None, scale: float | None, seed: int
) -> AttackPlan | None:
    """The demo's attack from its options (None without ``--attack``); ConfigError on bad
    input, naming the option."""
    if kind is None:
        if fraction is not None or scale is not None:
            raise ConfigError("--attackers and --attack-scale need --attack KIND")
        return None
    if kind not in KINDS:
        raise ConfigError(f"--attack must be one of {', '.join(KINDS)}, got {kind!r}")
    if scale is not None and not math.isfinite(scale):
        raise ConfigError(f"--attack-scale must be a finite number, got {scale!r}")
    fraction = DEFAULT_FRACTION if fraction is None else fraction
    count = attacker_count(devices, fraction)
    return AttackPlan(
        kind=kind,
        scale=default_scale(kind) if scale is None else float(scale),
        attackers=choose_attackers(devices, count, seed),
    )


def parse_strategy_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``--strategy-param KEY=VALUE`` options as a table: integers and decimals become
    numbers, ``true`` / ``false`` booleans, anything else stays a string."""
    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--strategy-param takes KEY=VALUE, got {pair!r}")
        if key == "name":
            raise ConfigError("--strategy-param name=...: choose the strategy with --strategy")
        table[key] = _number(text.strip())
    return table


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break
        return value
    return {"true": True, "false": False}.get(text, text)


def robust_defaults(name: str, devices: int, attackers: int) -> dict[str, Any]:
    """The parameters that tell a robust strategy how many attackers to expect, set from
    the demo's own count (the usual assumption: the defender knows an upper bound f):
    trimmed_mean trims ``beta = attackers / devices`` from each end; krum and multi_krum
    take ``f = attackers``; bulyan too, but at most ``(devices - 3) // 4`` (its bound
    ``n >= 4f + 3``), so 10 devices give it f = 1 against 2 attackers. Nothing for the
    others, nor without attackers (the strategies' own defaults then)."""
    if attackers <= 0:
        return {}
    if name == "trimmed_mean":
        return {"beta": attackers / devices}
    if name in ("krum", "multi_krum"):
        return {"f": min(attackers, max((devices - 3) // 2, 0))}
    if name == "bulyan":
        return {"f": min(attackers, max((devices - 3) // 4, 0))}
    return {}


def strategy_table(
    name: str | None, params: Mapping[str, Any], devices: int, attackers: int
) -> dict[str, Any]:
    """The demo's ``[strategy]`` table: ``name`` (None: no table, FedAvg), the robust
    defaults for ``attackers`` (``robust_defaults``), then the user's ``params`` over them.
    Validated by ``aggregator.strategies.build``: a bad name or key is a StrategyError."""
    from aggregator.strategies import build

    if name is None:
        if params:
            raise ConfigError("--strategy-param needs --strategy NAME")
        return {}
    table = {"name": name, **robust_defaults(name, devices, attackers), **params}
    build(table)
    return table


__all__ = [
    "ATTACK_DEVICES",
    "AttackPlan",
    "DEFAULT_FRACTION",
    "DEFAULT_SCALES",
    "KINDS",
    "attacker_count",
    "choose_attackers",
    "parse_strategy_params",
    "plan_attack",
    "poison",
    "robust_defaults",
    "strategy_table",
]
