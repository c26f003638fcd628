"""An attacker is a real agent process with valid keys: ``fedmq agent run --attack KIND``
trains, poisons its weights, signs them, and the aggregator accepts the update."""

from __future__ import annotations

import pytest
import torch

from broker import codec
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


BATCHNORM_TASK = """
seed = 0
[model]
arch = "cnn1d"
in_channels = 1
num_classes = 3
channels = [4]
kernel_size = 3
[train]
epochs = 1
batch_size = 16
lr = 0.01
optimizer = "adam"
"""


def test_honest_updates_still_count_once_an_attack_broke_the_batchnorm_statistics(
    federation, tmp_path
):
    """FedAvg of an honest update and a constant -5 one has a negative running variance:
    the global model gives NaN on every input, so the honest device's federated evaluation
    is NaN. Its training (batch statistics) is not: the update is sent without the NaN
    metric and accepted, and the round closes instead of waiting for the deadline."""
    fed = federation(devices=["bob", "mallory"])
    files = write_blobs(tmp_path / "data", ["bob", "mallory"])
    task_path = tmp_path / "task.toml"
    task_path.write_text(BATCHNORM_TASK)
    agg = fed.aggregator(
        tmp_path / "run", TaskSpec.load(task_path), rounds=2, min_devices=2, deadline=60
    )
    thread = fed.in_thread(agg.run)
    bob = fed.agent("bob", files["bob"], exit_when_done=True)
    events = []
    bob.on_event = lambda kind, info: events.append((kind, info))
    fed.in_thread(bob.run, timeout=90)
    fed.spawn_agent(
        "mallory",
        files["mallory"],
        "--exit-when-done",
        "--attack",
        "constant",
        "--attack-scale",
        "-5",
        log=tmp_path / "mallory.log",
    )
    assert join(thread, 90) == 0
    rows = agg.run_dir.metrics()
    assert [r["contributors"] for r in rows] == [["bob", "mallory"]] * 2
    payload = agg.run_dir.checkpoint_path(1).read_bytes()  # the model bob evaluated in round 2
    after_round_1 = codec.decode(payload, max_payload=len(payload)).tensors
    assert (after_round_1["1.running_var"] < 0).any()
    trained = [info for kind, info in events if kind == "trained"]
    assert len(trained) == 2
    assert "eval_loss" in trained[0]["metrics"]
    assert "eval_loss" not in trained[1]["metrics"]  # NaN: left out
    assert "train_loss" in trained[1]["metrics"]
