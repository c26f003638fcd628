"""A secure round whose dropouts leave a survivor's self-mask seed without t shares
(5 devices: the complete graph, threshold 3; 2 go away after sharing, so each survivor's
seed has 2 holders left) cannot be unmasked. Once every survivor has revealed no share
can still come: the round is retried at once (not at the end of the unmasking phase's
deadline), with the devices still there, and completes as FedAvg over them."""

from __future__ import annotations

import time

import pytest

from aggregator.checkpoint import RunDir
from broker.task import TaskSpec
from device_agent.agent import Agent
from fedmq.synthetic import BLOBS_TASK
from tests.helpers import join, write_blobs
from tests.test_secagg_engine import DropsAfterSharing

pytestmark = pytest.mark.mosquitto
DEVICES = [f"dev{i}" for i in range(5)]
PHASE_DEADLINE = 60


def test_unmasking_shortfall_retries_at_once_with_the_devices_still_there(federation, tmp_path):
    files = write_blobs(tmp_path / "data", DEVICES, samples=60)
    path = tmp_path / "task.toml"
    secure = f"[secure_aggregation]\nclip_range = 2.0\nphase_deadline = {PHASE_DEADLINE}\n"
    path.write_text(BLOBS_TASK + "\n" + secure)
    fed = federation(devices=DEVICES, name="shortfall")
    task = TaskSpec.load(path)
    agg = fed.aggregator(tmp_path / "run", task, rounds=1, min_devices=3, deadline=30)
    events = []
    agg.on_event = lambda kind, info: events.append((time.monotonic(), kind))
    started = time.monotonic()
    thread = fed.in_thread(agg.run, timeout=120)
    for d in DEVICES:
        cls = DropsAfterSharing if d in ("dev1", "dev3") else Agent
        fed.in_thread(cls(fed.agent_config(d, files[d], exit_when_done=True)).run, timeout=120)
    assert join(thread, 130) == 0
    retries = [t - started for t, kind in events if kind == "retry"]
    assert len(retries) == 1 and retries[0] < PHASE_DEADLINE / 2, retries
    row = RunDir(tmp_path / "run").metrics()[0]
    assert row["contributors"] == ["dev0", "dev2", "dev4"]
    assert row["secure_aggregation"]["roster"] == 3
    assert row["secure_aggregation"]["dropped"] == []
