"""The journal of one round: every update's fate, durable before it is acknowledged.

``run_dir/rounds/<r>/journal.jsonl`` has one line per distinct payload seen in
round ``r`` (keyed by the payload's SHA-256): ``accepted``, ``rejected`` with a
reason, ``duplicate`` or ``late``. Accepted payloads are kept beside it as
``updates/<device_id>.safetensors`` so that a restarted aggregator can fold them
again. A payload the broker redelivers after a crash is recognised by its digest
and neither folded nor counted twice. The round's directory is removed once its
checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.durable import append_line, atomic_write, read_lines, repair_tail


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass
class RoundJournal:
    directory: Path
    _digests: set[str] = field(default_factory=set)
    _entries: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, run_dir: Path, round_: int) -> RoundJournal:
        journal = cls(run_dir / "rounds" / f"{round_:06d}")
        repair_tail(journal.path)
        for line in read_lines(journal.path):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (
                entry.get("outcome") == "accepted"
                and not journal.update_path(entry["device"]).exists()
            ):
                continue  # cannot happen with fsync ordering; be safe anyway
            journal._entries.append(entry)
            journal._digests.add(entry["digest"])
        return journal

    @property
    def path(self) -> Path:
        return self.directory / "journal.jsonl"

    def update_path(self, device_id: str) -> Path:
        return self.directory / "updates" / f"{device_id}.safetensors"

    def seen(self, digest: str) -> bool:
        return digest in self._digests

    @property
    def entries(self) -> list[dict]:
        return list(self._entries)

    def record(self, digest: str, device_id: str | None, outcome: str, reason: str = "") -> None:
        entry = {"digest": digest, "device": device_id, "outcome": outcome}
        if reason:
            entry["reason"] = reason
        append_line(self.path, json.dumps(entry, sort_keys=True))
        self._entries.append(entry)
        self._digests.add(digest)

    def record_accepted(self, digest: str, device_id: str, payload: bytes) -> None:
        """Payload first, then the line that makes it count: a crash between leaves no trace."""
        atomic_write(self.update_path(device_id), payload)
        self.record(digest, device_id, "accepted")

    def accepted(self) -> Iterator[tuple[str, bytes]]:
        """(device_id, payload) of accepted updates, in the order they were accepted."""
        for entry in self._entries:
            if entry["outcome"] == "accepted":
                yield entry["device"], self.update_path(entry["device"]).read_bytes()

    def accepted_devices(self) -> list[str]:
        return [e["device"] for e in self._entries if e["outcome"] == "accepted"]

    def reporters(self) -> set[str]:
        """Devices that sent anything attributable for this round."""
        return {e["device"] for e in self._entries if e["device"]}

    def counts(self) -> dict[str, Counter]:
        """{'accepted': n, 'duplicate': n, 'late': n} and rejected reasons."""
        outcomes: Counter = Counter()
        reasons: Counter = Counter()
        for e in self._entries:
            outcomes[e["outcome"]] += 1
            if e["outcome"] == "rejected":
                reasons[e.get("reason", "unknown")] += 1
        return {"outcomes": outcomes, "rejected": reasons}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
