"""A round's accepted updates as a strategy reads them (``strategies.base.Updates``).

``JournalUpdates`` reads them back from the round's journal on disk in device-id
order, one payload in memory at a time; ``ListUpdates`` holds them in memory (for
in-process simulations and tests). Both give strategies that need every update
at once a ``DeltaMatrix`` on disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from aggregator.journal import RoundJournal
from aggregator.strategies.base import Tensors, Update
from broker import compression, messages
from broker.compression_settings import NONE, Compression


class _MatrixMixin:
    template: Tensors
    _workdir: Path | None

    def matrix(self, clip_norm: float | None = None):  # -> DeltaMatrix
        from aggregator.update_matrix import DeltaMatrix  # only strategies that keep all

        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedmq-matrix-")
            self._workdir = Path(self._tmp.name)
        return DeltaMatrix.build(self._workdir / "deltas.f64", iter(self), self.template, clip_norm)


HOLD_BYTES = 2 * 1024 * 1024  # a round's accepted payloads kept decoded, at most


class HeldUpdates:
    """A small round's accepted updates as admission decoded them, so that its close
    folds them without reading the journal back and decoding each again (a fifth of a
    10-device round's close). Past ``budget`` bytes of payloads it lets them all go and
    the close reads the journal, one update in memory at a time, as for a large round."""

    def __init__(self, budget: int = HOLD_BYTES) -> None:
        self._updates: dict[str, messages.UpdateMessage] = {}
        self._bytes = 0
        self._budget = budget
        self.overflowed = False

    def add(self, device: str, update: messages.UpdateMessage, size: int) -> None:
        if self.overflowed:
            return
        if self._bytes + size > self._budget:
            self._updates.clear()
            self.overflowed = True
            return
        self._updates[device] = update
        self._bytes += size

    def matching(self, devices: Collection[str]) -> dict[str, messages.UpdateMessage] | None:
        """The held updates, if they are exactly those of ``devices`` (the journal's
        accepted ones: a resumed round holds none), else None."""
        if self.overflowed or len(self._updates) != len(devices):
            return None
        return self._updates if all(d in self._updates for d in devices) else None


class JournalUpdates(_MatrixMixin):
    """The accepted updates of ``journal``. ``base_of(round)`` gives the global model an
    update of that round was trained from (the current one, but for fedbuff's stale ones).
    ``held``: the same updates kept decoded since admission, used when they are all there."""

    def __init__(
        self,
        journal: RoundJournal,
        template: Tensors,
        base_of: Callable[[int], Tensors],
        round_: int,
        compressed: Compression = NONE,  # the task's [compression]: updates carry deltas
        held: HeldUpdates | None = None,
    ) -> None:
        self.journal = journal
        self._held = held
        self._compressed = compressed
        self.round = round_  # the round being closed (fedbuff: updates may be older)
        self.template = template
        self._base_of = base_of
        self._workdir = journal.directory
        self._seen: dict[str, tuple[int, dict, int]] = {}  # device -> (samples, metrics, round)
        self.partials: dict[str, int] = {}  # site -> devices its partial result stands for

    def __len__(self) -> int:
        return len(self.journal.accepted_devices())

    def __iter__(self) -> Iterator[Update]:
        held = None
        if self._held is not None:
            self.journal.commit()  # as a read-back would: the round's records durable first
            held = self._held.matching(self.journal.accepted_view())
        if held is not None:
            decoded = ((device, held[device]) for device in sorted(held))
        else:
            decoded = self._read_back()
        for device, update in decoded:
            self._seen[device] = (update.num_samples, update.metrics, update.round)
            carried = messages.parse_partial(update.metadata)
            if carried is not None:
                self.partials[device] = carried
            base = self._base_of(update.round)
            tensors = update.tensors
            if self._compressed.active:  # checked at admission, decoded again from the base
                tensors = compression.decode(tensors, self._compressed, base)
            yield Update(
                device=device,
                num_samples=update.num_samples,
                tensors=tensors,
                round=update.round,
                base=base,
                metrics=update.metrics,
            )
            del update, tensors  # gone before the next payload is read

    def _read_back(self) -> Iterator[tuple[str, messages.UpdateMessage]]:
        for device, payload in self.journal.accepted(by_device=True):
            # checked at admission (finite values included; the journal's bytes are checked
            # against their digest when a restart reads them); its tensors read in place
            yield (
                device,
                messages.decode_update(
                    payload, max_payload=len(payload), copy=False, require_finite=False
                ),
            )
            del payload

    def summaries(self) -> list[tuple[str, int, dict, int]]:
        """(device, samples, metrics, round trained for) of every accepted update, in
        device-id order: from the strategy's own reading when it read them all, else read
        once more."""
        if set(self._seen) != set(self.journal.accepted_devices()):
            for _ in self:
                pass
        return [(d, *self._seen[d]) for d in sorted(self._seen)]


class ListUpdates(_MatrixMixin):
    """Updates held in memory, served in device-id order."""

    def __init__(
        self,
        updates: Sequence[Update],
        template: Tensors,
        workdir: Path | None = None,
        round_: int | None = None,
    ):
        self._updates = sorted(updates, key=lambda u: u.device)
        self.round = max((u.round for u in updates), default=0) if round_ is None else round_
        self.template = template
        self._workdir = workdir

    def __len__(self) -> int:
        return len(self._updates)

    def __iter__(self) -> Iterator[Update]:
        return iter(self._updates)
