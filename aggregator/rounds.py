"""The rules of a round, as pure functions: who may contribute, and when it closes."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

ACCEPTED, REJECTED, DUPLICATE, LATE = "accepted", "rejected", "duplicate", "late"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # accepted | rejected | duplicate | late
    reason: str = ""

    @property
    def reports(self) -> bool:
        """Whether a signature-checked update with this verdict is its device's report for
        the open round (so the round stops waiting for it): one meant for this round and
        this run, even if useless (stale); never a late, future or other-run one."""
        return self.outcome in (ACCEPTED, DUPLICATE) or self.reason == "stale"


def admit(
    *,
    topic_device: str,
    meta_device: str,
    update_round: int,
    base_hash: str,
    current_round: int,
    current_hash: str,
    accepted_devices: Collection[str],
    binding: tuple[str, str] = ("", ""),
    expected_binding: tuple[str, str] = ("", ""),
) -> Verdict:
    """Whether a well-formed, signature-checked update counts in the current round.

    ``binding`` is the update's (federation, run id), ``expected_binding`` this run's."""
    if meta_device != topic_device:
        return Verdict(REJECTED, "wrong_device")
    if binding != expected_binding:
        return Verdict(REJECTED, "wrong_run")
    if update_round < current_round:
        return Verdict(LATE)
    if update_round > current_round:
        return Verdict(REJECTED, "future_round")
    if base_hash != current_hash:
        return Verdict(REJECTED, "stale")
    if topic_device in accepted_devices:
        return Verdict(DUPLICATE)
    return Verdict(ACCEPTED)


CLOSE, WAIT, SHORT = "close", "wait", "short"


def close_decision(
    *,
    accepted: int,
    min_devices: int,
    present: Collection[str],
    reporters: Collection[str],
    elapsed: float,
    deadline: float | None,
) -> str:
    """CLOSE when the quorum is met and every present device has reported, or at the
    deadline with the quorum; SHORT at the deadline without it; else WAIT."""
    quorum = accepted >= min_devices
    if quorum and set(present) <= set(reporters):
        return CLOSE
    if deadline is not None and elapsed >= deadline:
        return CLOSE if quorum else SHORT
    return WAIT
