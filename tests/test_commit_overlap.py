"""The aggregator handles the next updates while the last batch's fsync runs, and still acks
nothing before it is on disk (aggregator/service.py ``_process_batch``, the journal's
``commit_later``).

An in-process aggregator on a real run directory, never connected: its acks are recorded.
The journal's fsyncs go through a gate that the test opens, and each fsync records how much
of the journal it made durable, so every ack is checked against what was really on disk."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from aggregator import durable
from aggregator.inbox import Inbound
from aggregator.service import Aggregator, AggregatorConfig
from broker import messages
from broker.connection import ConnectionSettings
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.synthetic import mlp_task
from tests.helpers import wait_for

DEVICES = [f"d{i}" for i in range(4)]


class GatedDisk:
    """os.fsync for aggregator/durable.py: waits for ``gate``, fsyncs for real, then records
    the file's size as it was when the fsync began (what this fsync made durable)."""

    def __init__(self, monkeypatch) -> None:
        self.gate = threading.Event()
        self.durable: dict[str, int] = {}
        self.calls = 0
        self.fail = False
        self._lock = threading.Lock()
        self._real = os.fsync
        monkeypatch.setattr(durable.os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory made durable when a file is created
            return self._real(fd)
        path, size = os.readlink(f"/proc/self/fd/{fd}"), st.st_size
        with self._lock:
            self.calls += 1
        if not self.gate.wait(10):
            raise AssertionError("the test never opened the gate")
        if self.fail:
            raise OSError(5, "injected I/O error")
        self._real(fd)
        with self._lock:
            self.durable[path] = max(self.durable.get(path, 0), size)

    def durable_lines(self, path) -> int:
        with self._lock:
            size = self.durable.get(str(path), 0)
        return path.read_bytes()[:size].count(b"\n")


@pytest.fixture
def aggregator(tmp_path):
    task = tmp_path / "task.toml"
    task.write_text(mlp_task([16], out_features=4))
    agg = Aggregator(
        AggregatorConfig(
            connection=ConnectionSettings(port=1),  # never connected
            federation="overlap",
            run_dir=tmp_path / "run",
            task=TaskSpec.load(task),
            rounds=2,
            min_devices=len(DEVICES) + 1,  # the round stays open
            deadline=None,
            insecure=True,
            plot=False,
        )
    )
    agg.client.publish = lambda *args, **kwargs: None
    agg._loop_started = time.monotonic()
    current = agg._open_round(1)
    model = messages.decode_model(current.model_payload)
    for mid, device in enumerate(DEVICES, start=1):
        tensors = {k: v + 0.01 * mid for k, v in model.tensors.items()}
        payload = messages.encode_update(
            tensors,
            round_=1,
            device_id=device,
            num_samples=10,
            base_hash=model.model_hash,
            metrics={"train_loss": 0.5},
            federation=model.federation,
            run_id=model.run_id,
        )
        agg._inbox.put(Inbound(Topics("overlap").update(device), payload, mid, 1), lambda: False)
    return agg, current


def test_the_next_batch_is_handled_during_the_fsync_and_acks_wait_for_the_disk(
    aggregator, monkeypatch
):
    agg, current = aggregator
    disk = GatedDisk(monkeypatch)
    acked: list[tuple[int, int]] = []  # (mid, journal lines durable when it was acked)
    agg.client.ack = lambda mid, qos: acked.append((mid, disk.durable_lines(current.journal.path)))

    agg._process_batch(current, limit=2)  # d0, d1: written, fsync started, more waiting
    assert current.accepted == 2 and wait_for(lambda: disk.calls >= 1, 10, "the first fsync")
    assert acked == []  # their fsync has not finished

    second = threading.Thread(target=agg._process_batch, args=(current, 2))
    second.start()
    # d2, d3 handled while d0, d1's fsync waits
    assert wait_for(lambda: current.accepted == 4, 10, "d2 and d3 handled")
    assert acked == []
    disk.gate.set()
    second.join(10)
    assert not second.is_alive()
    assert [mid for mid, _ in acked] == [1, 2, 3, 4]  # the inbox was empty: no ack left over
    for n, (_, durable_lines) in enumerate(acked, start=1):
        assert durable_lines >= n  # its journal line was on disk when it was acked
    assert agg._unacked is None and len(agg._inbox) == 0


def test_a_failed_fsync_acks_nothing_and_stops_the_loop(aggregator, monkeypatch):
    agg, current = aggregator
    disk = GatedDisk(monkeypatch)
    acked: list[int] = []
    agg.client.ack = lambda mid, qos: acked.append(mid)
    agg._process_batch(current, limit=2)  # d0, d1: their fsync is held
    assert current.accepted == 2 and wait_for(lambda: disk.calls >= 1, 10, "the first fsync")
    disk.fail = True
    disk.gate.set()
    with pytest.raises(OSError, match="injected"):
        agg._process_batch(current, limit=2)  # waits for d0, d1's fsync: it fails
    assert acked == [] and disk.calls >= 1
