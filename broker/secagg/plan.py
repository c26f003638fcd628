"""The model plan's word on a secure-aggregation round (``plan.secure`` in the model's
metadata, signed with the model): the session and the fixed-point encoding."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from broker.errors import CodecError

MIN_ROSTER = 3  # devices a secure round needs: with two, each could subtract its own input
MAX_DEVICES = 20_000  # a roster's devices (the model plan's bound on selected ids)
_SESSION = re.compile(r"^[0-9a-f]{32}$")


def bad(why: str, reason: str = "bad_metadata") -> CodecError:
    return CodecError(f"secure aggregation message: {why}", reason=reason)


@dataclass(frozen=True)
class SecurePlan:
    """What the model's plan says about the round's secure aggregation (``plan.secure``)."""

    session: str  # 32 hex digits, fresh for every attempt at a round
    clip: float  # each coordinate of a device's weighted update is clipped to [-clip, clip]
    max_weight: int  # sample count at which a device's weight saturates at 1
    selected: int  # devices the round is sized for: the fixed-point levels fit their sum
    noise: float = 0.0  # std of the Gaussian noise each device adds (DP in shares)
    deadline: float = 60.0  # seconds of each key/share/unmask phase
    dropout: float = 0.3  # the fraction of devices that may drop after sharing: sizes the graph

    def to_json(self) -> dict:
        return {
            "session": self.session,
            "clip": self.clip,
            "max_weight": self.max_weight,
            "selected": self.selected,
            "noise": self.noise,
            "deadline": self.deadline,
            "dropout": self.dropout,
        }


def parse_secure_plan(raw: object) -> SecurePlan:
    if not isinstance(raw, dict) or set(raw) - {
        "session",
        "clip",
        "max_weight",
        "selected",
        "noise",
        "deadline",
        "dropout",
    }:
        raise bad("plan 'secure' must be an object of session, clip, max_weight, selected")
    session = raw.get("session")
    if not isinstance(session, str) or not _SESSION.match(session):
        raise bad("plan 'secure' session must be 32 hex digits")
    numbers = {}
    for key, low, high in (
        ("clip", 1e-9, 1e9),
        ("noise", 0.0, 1e9),
        ("deadline", 0.1, 86400.0),
        ("dropout", 0.0, 0.49),
    ):
        value = raw.get(key, {"noise": 0.0, "deadline": 60.0, "dropout": 0.3}.get(key))
        if not _number(value) or not low <= value <= high:
            raise bad(f"plan 'secure' {key} must be a number in [{low:g}, {high:g}]")
        numbers[key] = float(value)
    ints = {}
    for key, high in (("max_weight", 10**9), ("selected", MAX_DEVICES)):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise bad(f"plan 'secure' {key} must be an integer in [1, {high}]")
        ints[key] = value
    return SecurePlan(session=session, **numbers, **ints)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
