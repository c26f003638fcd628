"""The aggregator's inbox: messages from the network thread, bounded in count and bytes.

When the loop falls behind, the network thread waits in ``put``, TCP pushes back
and the broker keeps the rest, so memory holds at most ``max_bytes`` of payloads
(plus one message, which is always let into an empty inbox however large). A
message the loop has taken still counts until the loop says it is ``done`` with
it: the bound covers what waits and what is being handled, together.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int


class Inbox:
    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[Inbound] = deque()
        self._bytes = 0  # of the queued payloads
        self._held = 0  # of the payloads taken and not yet done
        self._cond = threading.Condition()

    def _fits(self, size: int) -> bool:
        if not self._items and not self._held:
            return True
        held = self._bytes + self._held
        return len(self._items) < self.max_items and held + size <= self.max_bytes

    def put(self, item: Inbound, stopped: Callable[[], bool]) -> bool:
        """Wait for room, then queue ``item``; False if ``stopped()`` became true first."""
        with self._cond:
            while not self._fits(len(item.payload)):
                if stopped():
                    return False
                self._cond.wait(0.5)
            self._items.append(item)
            self._bytes += len(item.payload)
            self._cond.notify_all()
            return True

    def take(self, limit: int, timeout: float) -> list[Inbound]:
        """Up to ``limit`` messages, waiting at most ``timeout`` for the first. They
        still count against ``max_bytes`` until ``done`` (or ``put_back``)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            batch = []
            while self._items and len(batch) < limit:
                item = self._items.popleft()
                size = len(item.payload)
                self._bytes -= size
                self._held += size
                batch.append(item)
            return batch

    def done(self, items: list[Inbound]) -> None:
        """The loop has handled ``items`` (taken by ``take``): their room is free again."""
        with self._cond:
            self._held -= sum(len(item.payload) for item in items)
            self._cond.notify_all()

    def put_back(self, items: list[Inbound]) -> None:
        """Return unhandled ``items`` (taken by ``take``) to the front, in their order."""
        with self._cond:
            for item in reversed(items):
                self._items.appendleft(item)
                size = len(item.payload)
                self._held -= size
                self._bytes += size

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
