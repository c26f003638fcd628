"""A round with many more devices than mosquitto's 20 unacknowledged messages per client.

An aggregator that held its acks until the round's checkpoint would stop
receiving after 20 updates and never close the round; this one acks each
update once it is journaled.
"""

from __future__ import annotations

import pytest
import torch

from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.loadgen import expected_average, publish_all, signed_update
from tests.helpers import blobs_task, current_model, join

pytestmark = pytest.mark.mosquitto
DEVICES = 120


def test_a_round_of_120_devices_closes_with_every_update_folded(federation, tmp_path):
    devices = [f"d{i:03d}" for i in range(DEVICES)]
    fed = federation(devices=devices)
    agg = fed.aggregator(
        tmp_path / "run",
        TaskSpec.load(blobs_task(tmp_path)),
        rounds=1,
        min_devices=DEVICES,
        deadline=None,
    )
    agg_thread = fed.in_thread(agg.run, timeout=120)
    model = current_model(fed, devices[0])
    weights = [(0.001 * i, 10 + i) for i in range(DEVICES)]
    jobs = []
    for device, (scale, n) in zip(devices, weights):
        device_id, payload = signed_update(
            fed.credentials(device), model, num_samples=n, scale=scale
        )
        jobs.append((fed.credentials(device), Topics(fed.name).update(device_id), payload))
    assert publish_all(jobs, concurrency=24) == []
    assert join(agg_thread, 120) == 0
    assert agg.run_dir.metrics()[0]["devices"] == DEVICES
    expected = expected_average(model, weights)
    for name, tensor in agg.weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
