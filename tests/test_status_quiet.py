"""A device says "training" in status only when its training takes long enough to be seen.

Every status is a retained QoS 1 message that the broker stores and the aggregator parses;
two per device per round ("training", then "online" with the update) were a third of the
messages of a round trained in milliseconds. The agent says "training" on its first round
and then only when its last round's training took ``training_status_seconds`` (1 s by
default) or more, and "online" after an update only when its status said something else.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

import pytest

from broker import signals
from broker.task import TaskSpec
from broker.topics import Topics
from device_agent.agent import Agent, says_training
from fedmq.local import AGGREGATOR
from fedmq.synthetic import BLOBS_TASK, write_blobs
from tests.helpers import join, mqtt_session

pytestmark = pytest.mark.mosquitto

ROUNDS = 3


def test_the_first_round_and_slow_ones_are_said():
    assert says_training(None, 1.0)  # nothing known yet: say it
    assert says_training(1.0, 1.0) and says_training(30.0, 1.0)
    assert not says_training(0.004, 1.0)
    assert says_training(0.004, 0.0)  # a threshold of 0: every round


@pytest.mark.parametrize("threshold, said_every_round", [(1.0, False), (0.0, True)])
def test_statuses_a_device_publishes_over_rounds(federation, tmp_path, threshold, said_every_round):
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    task_path = tmp_path / "task.toml"
    task_path.write_text(BLOBS_TASK)
    agg = fed.aggregator(
        tmp_path / "run", TaskSpec.load(task_path), rounds=ROUNDS, min_devices=1, deadline=60
    )
    heard: queue.Queue = queue.Queue()
    with mqtt_session(fed.settings(AGGREGATOR), "test-status-listener") as listener:
        listener.on_message = lambda c, u, m: heard.put(signals.parse_status(m.payload))
        subscribed = threading.Event()
        listener.on_subscribe = lambda *args: subscribed.set()
        listener.subscribe(Topics(fed.name).status("bob"), qos=1)
        assert subscribed.wait(10)
        thread = fed.in_thread(agg.run)
        config = fed.agent_config("bob", files["bob"], exit_when_done=True)
        bob = Agent(replace(config, training_status_seconds=threshold))
        trained = []
        bob.on_event = lambda kind, info: trained.append(info) if kind == "trained" else None
        assert join(fed.in_thread(bob.run, timeout=60), 60) == 0
        assert join(thread, 60) == 0
        said = []
        while len(said) == 0 or said[-1].status != "offline":  # bob's goodbye is the last
            said.append(heard.get(timeout=10))

    rows = agg.run_dir.metrics()
    assert [r["contributors"] for r in rows] == [["bob"]] * ROUNDS
    seconds = {t["round"]: t["metrics"]["train_seconds"] for t in trained}
    training = [s.round for s in said if s.status == "training"]
    after = [s.round for s in said if s.status == "online" and s.round is not None]
    if said_every_round:
        assert training == after == list(range(1, ROUNDS + 1)), said
    else:
        # round 1, then only a round after one whose training took a second or more (blobs
        # trains in milliseconds; a loaded machine may stall one past a second)
        slow = [r + 1 for r in range(1, ROUNDS) if seconds[r] >= threshold]
        assert training == after == [1, *slow], (said, seconds)
        assert len(slow) < ROUNDS - 1, f"every training took over {threshold} s: {seconds}"
    assert [s.status for s in said][0] == "online" and said[-1].status == "offline"
