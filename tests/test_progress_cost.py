"""The aggregator's progress line must not walk every device's status on every update:
at 10,000 devices that was quadratic, most of the aggregator's CPU in a round."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fedmq.progress import REDRAW_EVERY, RoundProgress


class CountingStatus(dict):
    walks = 0

    def values(self):
        CountingStatus.walks += 1
        return super().values()


def test_ten_thousand_updates_redraw_the_line_a_bounded_number_of_times():
    status = CountingStatus({f"d{i:05d}": "online" for i in range(10_000)})
    service = SimpleNamespace(
        spec=SimpleNamespace(rounds=2, min_devices=10_000),
        config=SimpleNamespace(upstream=None),
        state=SimpleNamespace(completed_round=0),
        current=SimpleNamespace(accepted=0),
        status=status,
        phase="collecting",
    )
    progress = RoundProgress(service)
    started = time.monotonic()
    for i in range(10_000):
        service.current.accepted = i + 1
        progress.event("update", {})
    elapsed = time.monotonic() - started
    assert CountingStatus.walks <= elapsed / REDRAW_EVERY + 2
    progress.event("round_open", {})  # a round opening always redraws
    assert "10000/10000 updates, 10000 devices online" in str(
        progress.progress.tasks[0].description
    )
