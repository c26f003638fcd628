"""An attacker is a real agent process with valid keys: ``fedmq agent run --attack KIND``
trains, poisons its weights, signs them, and the aggregator accepts the update."""

from __future__ import annotations

import pytest
import torch

from broker.task import TaskSpec
from fedmq.synthetic import blobs_task, write_blobs
from tests.helpers import join, wait_for

pytestmark = pytest.mark.mosquitto


def test_an_attacker_process_sends_a_signed_poisoned_update(federation, tmp_path):
    fed = federation(devices=["mallory"])
    files = write_blobs(tmp_path / "data", ["mallory"])
    agg = fed.aggregator(
        tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), rounds=1, min_devices=1
    )
    thread = fed.in_thread(agg.run)
    log = tmp_path / "mallory.log"
    proc = fed.spawn_agent(
        "mallory",
        files["mallory"],
        "--exit-when-done",
        "--attack",
        "constant",
        "--attack-scale",
        "0.5",
        log=log,
    )
    assert join(thread, 90) == 0
    wait_for(lambda: proc.poll() is not None, 30, "the agent to leave")
    text = log.read_text()
    assert "ATTACKER: round 1: sending a poisoned update (constant: every weight 0.5)" in text
    assert agg.run_dir.metrics()[0]["contributors"] == ["mallory"]  # signature accepted
    # FedAvg of one update is that update: every floating weight is the attacker's 0.5
    for name, value in agg.weights.items():
        if value.dtype.is_floating_point:
            assert torch.equal(value, torch.full_like(value, 0.5)), name
