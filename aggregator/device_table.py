"""What the aggregator knows of each device, and the bounded table of it in the ``state`` topic.

The operator's account may not read the devices' status topics (broker/acl.py), so all it
learns of a device comes through the aggregator's retained ``state``. That state is published
often (on every change, at most four times a second, and with each heartbeat) and a fleet may
hold up to MAX_TRACKED_DEVICES devices: the table lists only the STATE_DEVICE_ROWS most recently
seen and counts the rest, so the retained state stays a few tens of kilobytes whatever the fleet.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

STATE_DEVICE_ROWS = 200  # devices listed in the published state; the rest are counted


@dataclass
class DeviceBook:
    """Per device: its last status, when it was last heard from (a status or an update,
    unix time), the last round an update of its was accepted in, and that update's metrics."""

    status: dict[str, str] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    last_round: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why it skipped (its status says)

    def seen(self, device: str, when: float) -> None:
        self.last_seen[device] = when

    def accepted(self, rows: list[dict]) -> None:
        """A closed round's device rows (``round``, ``device``, ``metrics``)."""
        for row in rows:
            self.last_round[row["device"]] = row["round"]
            self.metrics[row["device"]] = dict(row.get("metrics") or {})

    def table(self, limit: int = STATE_DEVICE_ROWS) -> tuple[dict[str, dict], int]:
        """({device: row} for the ``limit`` most recently seen, newest first; how many more)."""
        known = self.status.keys() | self.last_seen.keys()
        newest = heapq.nlargest(limit, known, key=lambda d: (self.last_seen.get(d, 0.0), d))
        rows = {
            d: {
                "status": self.status.get(d, "unknown"),
                "last_seen": self.last_seen.get(d),
                "round": self.last_round.get(d),
                "metrics": self.metrics.get(d, {}),
                **({"reason": self.reasons[d]} if self.reasons.get(d) else {}),
            }
            for d in newest
        }
        return rows, len(known) - len(rows)
