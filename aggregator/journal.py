"""The journal of one round: every update's fate, durable before it is acknowledged.

``run_dir/rounds/<r>/`` holds two append-only files:

- ``journal.jsonl``: one line per distinct payload seen in round ``r`` (keyed by
  the payload's SHA-256): ``accepted``, ``rejected`` with a reason,
  ``duplicate`` or ``late``, and ``reports``: whether it counts as its device's
  report for this round (signature checked, meant for this round); an accepted
  line gives the offset and size of its payload in
- ``updates.bin``: the accepted payloads, back to back, so that a restarted
  aggregator can fold them again.

Writes are buffered and made durable together by ``commit()`` (group commit:
one concurrent pair of fsyncs for every update that arrived meanwhile); the service acks
updates to the broker only after ``commit()``, or once the future of
``commit_later()`` is done (the disk works while the service handles the next updates).
On open, a torn last line is cut and an accepted line whose payload is not wholly
on disk (or does not match its digest) is dropped: that update was never
acknowledged, so the broker delivers it again. The round's directory is removed
once its checkpoint is written (in the background, once the next model is out).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Collection, Iterator
from concurrent.futures import Future
from pathlib import Path

from aggregator.durable import (
    atomic_write,
    close_all,
    fsync_all,
    fsync_all_later,
    open_dirs,
    read_lines,
    remove_tree_later,
    repair_tail,
)


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class RoundJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._digests: set[str] = set()
        self._entries: list[dict] = []
        self._accepted: dict[str, dict] = {}  # device -> its accepted entry
        self._per_device: Counter = Counter()  # lines written for each (topic) device
        self._reporters: set[str] = set()  # devices whose signed report is in
        self._lines = None  # open file handles, made on the first write
        self._blobs = None
        self._blob_size = 0
        self._dirty = False
        self._syncing: Future | None = None  # commit_later's fsync, until waited for
        # directories whose new entries (the files, the round's own) the next commit makes
        # durable with the files' fsyncs, not one serial wait each before the first record
        self._new_dirs: list[Path] = []

    @classmethod
    def open(cls, run_dir: Path, round_: int) -> RoundJournal:
        journal = cls(run_dir / "rounds" / f"{round_:06d}")
        repair_tail(journal.path)
        blob_size = journal.blobs_path.stat().st_size if journal.blobs_path.exists() else 0
        kept = []
        for line in read_lines(journal.path):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("outcome") == "accepted" and not journal._payload_ok(entry, blob_size):
                continue  # its bytes never reached the disk: it was not acked, it comes again
            kept.append(line)
            journal._remember(entry)
        if len(kept) != len(read_lines(journal.path)):
            atomic_write(journal.path, "".join(k + "\n" for k in kept).encode())
        journal._blob_size = blob_size
        return journal

    # -- layout ---------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.directory / "journal.jsonl"

    @property
    def blobs_path(self) -> Path:
        return self.directory / "updates.bin"

    # -- queries --------------------------------------------------------------------------
    def seen(self, digest: str) -> bool:
        return digest in self._digests

    @property
    def entries(self) -> list[dict]:
        return list(self._entries)

    def accepted_devices(self) -> list[str]:
        return list(self._accepted)

    def accepted_count(self) -> int:
        return len(self._accepted)

    def accepted_view(self) -> Collection[str]:
        """The devices with an accepted update, as a live read-only view: ``device in it``
        costs O(1), where ``accepted_devices()`` copies (the loop asks for every update)."""
        return self._accepted.keys()

    def reporters(self) -> set[str]:
        """Devices whose signed report for this round is in (accepted, duplicate, refused);
        kept up to date as lines are written: do not modify it."""
        return self._reporters

    def accepted_bytes(self) -> int:
        """Bytes of the accepted payloads (what the round's updates cost on the wire)."""
        return sum(entry["size"] for entry in self._accepted.values())

    def records_of(self, device_id: str | None) -> int:
        """How many lines this round's journal holds for ``device_id``."""
        return self._per_device[device_id]

    def counts(self) -> dict[str, Counter]:
        """{'outcomes': accepted/duplicate/late/rejected counts, 'rejected': by reason}."""
        outcomes: Counter = Counter()
        reasons: Counter = Counter()
        for e in self._entries:
            outcomes[e["outcome"]] += 1
            if e["outcome"] == "rejected":
                reasons[e.get("reason", "unknown")] += 1
        return {"outcomes": outcomes, "rejected": reasons}

    def accepted(self, *, by_device: bool = False) -> Iterator[tuple[str, bytes]]:
        """(device_id, payload) of accepted updates, one payload in memory at a time: in the
        order they were accepted, or with ``by_device`` in device-id order (canonical)."""
        self.commit()
        if not self._accepted:
            return
        order = sorted(self._accepted) if by_device else list(self._accepted)
        with open(self.blobs_path, "rb") as fh:
            for device in order:
                entry = self._accepted[device]
                fh.seek(entry["offset"])
                yield device, fh.read(entry["size"])

    # -- writes (buffered until commit) -----------------------------------------------------
    def record(
        self,
        digest: str,
        device_id: str | None,
        outcome: str,
        reason: str = "",
        *,
        reports: bool = False,
    ) -> None:
        entry = {"digest": digest, "device": device_id, "outcome": outcome, "reports": reports}
        if reason:
            entry["reason"] = reason
        self._write(entry)

    def record_accepted(self, digest: str, device_id: str, payload: bytes) -> None:
        self._files()
        offset = self._blob_size
        self._blobs.write(payload)
        self._blob_size += len(payload)
        self._write(
            {
                "digest": digest,
                "device": device_id,
                "outcome": "accepted",
                "reports": True,
                "offset": offset,
                "size": len(payload),
            }
        )

    def commit(self) -> None:
        """Make every record so far durable: payloads and lines in one concurrent wait for
        the disk. Their order does not matter: on open, an accepted line whose payload is
        not wholly on disk (or does not match its digest) is dropped, and it was not acked."""
        self._wait_syncing()
        if not self._dirty:
            return
        self._flush()
        dirs = open_dirs(self._new_dirs)
        try:
            fsync_all([self._blobs.fileno(), self._lines.fileno(), *dirs])
        finally:
            close_all(dirs)
        self._new_dirs = []
        self._dirty = False

    def commit_later(self) -> Future | None:
        """``commit()`` in the background: hand the records so far to the OS now and return
        a future that is done once they are durable (None: nothing new to commit). Records
        made meanwhile wait for the next commit; ``commit()`` waits for this one too."""
        self._wait_syncing()
        if not self._dirty:
            return None
        self._flush()
        dirs = open_dirs(self._new_dirs)
        self._syncing = fsync_all_later([self._blobs.fileno(), self._lines.fileno(), *dirs])
        self._syncing.add_done_callback(lambda _: close_all(dirs))
        self._new_dirs = []
        self._dirty = False  # what is not durable yet is the future's
        return self._syncing

    def _wait_syncing(self) -> None:
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            syncing.result()  # an OSError is the disk's: the caller's to raise

    def _flush(self) -> None:
        for fh in (self._blobs, self._lines):
            fh.flush()

    def close(self) -> None:
        self.commit()
        for fh in (self._blobs, self._lines):
            if fh is not None:
                fh.close()
        self._lines = self._blobs = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def remove_later(self) -> Future:
        """``remove()``, the deletion in the background (unlinking a round's files took
        milliseconds of the loop's time in every round); done when the directory is gone."""
        self.close()
        return remove_tree_later(self.directory)

    # -- internals ----------------------------------------------------------------------------
    def _files(self) -> None:
        if self._lines is None:
            created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._blobs = open(self.blobs_path, "ab")  # noqa: SIM115 (closed by close())
            self._lines = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._new_dirs = [self.directory, *([self.directory.parent] if created else [])]

    def _write(self, entry: dict) -> None:
        self._files()
        self._lines.write(json.dumps(entry, sort_keys=True) + "\n")
        self._dirty = True
        self._remember(entry)

    def _remember(self, entry: dict) -> None:
        self._entries.append(entry)
        self._digests.add(entry["digest"])
        self._per_device[entry.get("device")] += 1
        if entry["outcome"] == "accepted":
            self._accepted[entry["device"]] = entry
        if entry.get("device") and entry.get("reports"):
            self._reporters.add(entry["device"])

    def _payload_ok(self, entry: dict, blob_size: int) -> bool:
        offset, size = entry.get("offset"), entry.get("size")
        if not isinstance(offset, int) or not isinstance(size, int) or offset + size > blob_size:
            return False
        with open(self.blobs_path, "rb") as fh:
            fh.seek(offset)
            return payload_digest(fh.read(size)) == entry["digest"]
