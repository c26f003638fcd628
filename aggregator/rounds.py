"""The rules of a round, as pure functions: who may contribute, and when it closes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    selected: Collection[str] | None = None,
    stale_window: Mapping[int, str] | None = None,
) -> Verdict:
    """Whether a well-formed, signature-checked update counts in the current round.

    ``binding`` is the update's (federation, run id), ``expected_binding`` this run's;
    ``selected`` the devices sampled for the round (None: all); ``stale_window`` maps
    earlier rounds whose updates still count (fedbuff) to their models' hashes."""
    if meta_device != topic_device:
        return Verdict(REJECTED, "wrong_device")
    if binding != expected_binding:
        return Verdict(REJECTED, "wrong_run")
    if update_round < current_round and update_round in (stale_window or {}):
        current_hash = stale_window[update_round]  # trained on an older model: still counts
    elif update_round < current_round:
        return Verdict(LATE)
    elif update_round > current_round:
        return Verdict(REJECTED, "future_round")
    elif selected is not None and topic_device not in selected:
        return Verdict(REJECTED, "not_selected")
    if base_hash != current_hash:
        return Verdict(REJECTED, "stale")
    if topic_device in accepted_devices:
        return Verdict(DUPLICATE)
    return Verdict(ACCEPTED)


PRESENT = ("online", "training")


def present_devices(
    status: Mapping[str, str],
    offline_at: Mapping[str, float],
    *,
    link_lost_at: float | None,
    relinked_at: float | None,
    now: float,
    grace: float,
    settle: float = 2.0,
) -> set[str]:
    """Devices a round waits for: online or training, and those whose "offline" may be a
    broker restart's doing. A broker shutting down fires every client's last will (the
    aggregator may see them just before its own link drops), and after its restart each
    retained status says offline until the device reconnects. So an "offline" counts only
    once it is ``settle`` seconds old, and one that came within ``settle`` seconds of the
    aggregator's own loss of the broker only ``grace`` seconds after the link is back."""
    present = {d for d, s in status.items() if s in PRESENT}
    restart = link_lost_at is not None and (relinked_at is None or now < relinked_at + grace)
    for device, s in status.items():
        if s != "offline" or device not in offline_at:
            continue
        seen = offline_at[device]
        if now - seen < settle or (restart and seen >= link_lost_at - settle):
            present.add(device)
    return present


CLOSE, WAIT, SHORT = "close", "wait", "short"


def close_decision(
    *,
    accepted: int,
    min_devices: int,
    present: Collection[str],
    reporters: Collection[str],
    elapsed: float,
    deadline: float | None,
    buffer_size: int | None = None,
) -> str:
    """CLOSE when the quorum is met and every present device has reported (or, with a
    ``buffer_size``, as soon as that many updates are in), or at the deadline with the
    quorum; SHORT at the deadline without it; else WAIT."""
    quorum = accepted >= min_devices
    if buffer_size is not None:
        if accepted >= buffer_size:
            return CLOSE
    elif quorum and set(present) <= set(reporters):
        return CLOSE
    if deadline is not None and elapsed >= deadline:
        return CLOSE if quorum else SHORT
    return WAIT
