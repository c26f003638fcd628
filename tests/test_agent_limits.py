"""A device trains only when its owner's limits allow, says why it waits, and stays in the
round however long it trains: over a real mosquitto, with a real aggregator."""

from __future__ import annotations

import queue
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from aggregator.service import Aggregator
from broker import signals
from broker.task import TaskSpec, from_dict
from broker.topics import Topics
from device_agent.agent import Agent
from device_agent.resources import Limits
from fedmq.synthetic import blobs_task
from tests.helpers import join, mqtt_session, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto


def thermal(root: Path, millidegrees: int) -> None:
    zone = root / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "temp").write_text(f"{millidegrees}\n")


def test_a_hot_device_skips_saying_why_then_trains_once_it_cools(federation, tmp_path):
    """The round waits for bob (quorum 1); bob is at 81 °C over a 75 °C ceiling: its status,
    as the aggregator's account reads it, says "skipped" and why. The same model arriving
    again (as after a retried round) does not make bob say it twice; a reconnect makes his
    status say it again, not "online", and his log not. Once the (fake) thermal
    zone reads 60 °C, bob's next check trains the round it kept, and the round closes."""
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    root = tmp_path / "root"
    thermal(root, 81000)
    topics = Topics(fed.name)
    statuses: queue.Queue = queue.Queue()
    models: queue.Queue = queue.Queue()
    agent_events: list = []

    def on_message(client, userdata, message):
        if message.topic == topics.model:
            models.put(message.payload)
        else:
            statuses.put(signals.parse_status(message.payload))

    with mqtt_session(fed.settings("fedmq-aggregator"), "test-status") as watcher:
        watcher.on_message = on_message
        watcher.subscribe([(topics.status("bob"), 1), (topics.model, 1)])
        agg = fed.aggregator(tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), rounds=1)
        agg_thread = fed.in_thread(agg.run, timeout=60)
        config = fed.agent_config(
            "bob",
            files["bob"],
            exit_when_done=True,
            limits=Limits(max_cpu_temp=75),
            recheck_seconds=0.2,
            readings_root=root,
        )
        agent = Agent(config, on_event=lambda kind, info: agent_events.append((kind, info)))
        bob_got: list[bytes] = []  # the models bob's client received, as the broker sent them
        route = agent.client.on_message
        agent.client.on_message = lambda c, u, m: (
            bob_got.append(m.payload) if m.topic == topics.model else None,
            route(c, u, m),
        )
        defers: list[int] = []  # bob's checks that held the round back (each model, re-check)
        hold_back = agent._defer
        agent._defer = lambda *args: (defers.append(1), hold_back(*args))[1]
        agent_thread = fed.in_thread(agent.run, timeout=60)

        def held_back_again(times: int):  # the sync point: bob has checked ``times`` more
            done = len(defers) + times
            wait_for(lambda: len(defers) >= done, 10, f"bob to check {times} more times")

        def skipped():
            while not statuses.empty():
                status = statuses.get()
                if status.status == "skipped":
                    return status
            return None

        status = wait_for(skipped, 20, "bob's skipped status")
        assert status == signals.DeviceStatus("skipped", 1, "CPU at 81.0 °C, ceiling 75 °C")
        wait_for(lambda: agg.status.get("bob") == "skipped", 5, "the aggregator to see it")
        bob = agg.state_snapshot()["devices"]["table"]["bob"]  # what `fedmq status` shows
        assert bob["status"] == "skipped" and bob["reason"] == "CPU at 81.0 °C, ceiling 75 °C"
        assert agent.rounds_trained == 0
        assert agg_thread.is_alive()  # the round is still open, waiting for bob

        model = models.get(timeout=5)
        watcher.publish(topics.model, model, qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: len(bob_got) == 2, 10, "bob to receive the same model again")
        assert bob_got == [model, model]
        wait_for(agent._inbox.empty, 5, "bob's agent to take it")
        held_back_again(2)  # the model taken from the inbox is handled before either

        # bob's link dies: he reconnects, gets the retained model a third time, and says
        # "skipped" again (not "online") once, however often he re-checks
        while not statuses.empty():
            statuses.get()
        agent.client.socket().shutdown(socket.SHUT_RDWR)
        wait_for(lambda: len(bob_got) == 3, 20, "bob to reconnect and get the model again")
        assert [kind for kind, _ in agent_events].count("connected") == 2
        wait_for(agent._inbox.empty, 5, "bob's agent to take it")
        held_back_again(3)

        thermal(root, 60000)
        assert join(agg_thread, 30) == 0
        assert join(agent_thread, 30) == 0
        after = [statuses.get(timeout=5)]  # from the link's death to bob's goodbye
        while len(after) == 1 or after[-1].status != "offline":
            after.append(statuses.get(timeout=5))
    # the broker's "offline" (bob's will), bob's "skipped" on reconnecting, then the round
    assert [s.status for s in after] == ["offline", "skipped", "training", "online", "offline"]
    assert after[1] == signals.DeviceStatus("skipped", 1, "CPU at 81.0 °C, ceiling 75 °C")
    assert agent.rounds_trained == 1
    [row] = agg.run_dir.metrics()
    assert row["round"] == 1 and row["devices"] == 1
    deferred = [info for kind, info in agent_events if kind == "deferred"]
    assert deferred == [{"round": 1, "reason": "CPU at 81.0 °C, ceiling 75 °C"}]  # said once


KEEPALIVE = 1  # seconds; the broker drops a client silent for 1.5 of them
FORWARD_SECONDS = 1.2  # each forward pass; 5 batches + the evaluation before training


def test_training_for_many_keepalive_periods_does_not_drop_the_device(federation, tmp_path):
    """One local training lasts more than 5 keepalive periods, yet the broker never drops
    bob and his update is accepted.

    Why it holds: the agent calls paho's ``loop_start``, so a network thread of its own
    reads the socket and sends PINGREQ whenever the link has been quiet for a keepalive
    period, while the agent's thread trains. The training here is a pure-Python busy loop
    (tests/custom_arch.py ``slow``), which holds the GIL as long as Python lets it: the
    interpreter hands the GIL over every few milliseconds (sys.getswitchinterval), far
    inside a keepalive period. Real training spends its time in torch kernels, which
    release the GIL altogether. Flower's reported drops come from clients whose
    keepalive is answered by the same thread that trains; fedmq's never is."""
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"], samples=40)
    registry = {"slow": "tests.custom_arch:slow"}
    task = from_dict(
        {
            "model": {
                "arch": "slow",
                "in_features": 4,
                "out_features": 3,
                "seconds": FORWARD_SECONDS,
            },
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.1, "loss": "cross_entropy"},
            "data": {"label": "label"},
            "seed": 1,
        }
    )
    device_events: list = []
    agg_config = fed.aggregator_config(
        tmp_path / "run", task, rounds=1, deadline=None, plot=False, architectures=registry
    )
    agg_config = replace(agg_config, connection=replace(agg_config.connection, keepalive=KEEPALIVE))
    agg = Aggregator(agg_config, on_event=lambda kind, info: device_events.append((kind, info)))
    agg_thread = fed.in_thread(agg.run, timeout=60)

    config = fed.agent_config("bob", files["bob"], exit_when_done=True, architectures=registry)
    config = replace(config, connection=replace(config.connection, keepalive=KEEPALIVE))
    agent_events: list = []
    agent = Agent(config, on_event=lambda kind, info: agent_events.append((kind, info)))
    agent_thread = fed.in_thread(agent.run, timeout=60)
    assert join(agg_thread, 60) == 0
    assert join(agent_thread, 30) == 0

    [trained] = [info for kind, info in agent_events if kind == "trained"]
    assert trained["metrics"]["train_seconds"] > 5 * KEEPALIVE
    [row] = agg.run_dir.metrics()
    assert row["round"] == 1 and row["devices"] == 1  # bob's update accepted
    connects = [kind for kind, _ in agent_events if kind == "connected"]
    assert connects == ["connected"]  # never lost the broker, never reconnected
    bob = [info["status"] for kind, info in device_events if kind == "device"]
    assert "training" in bob
    assert "offline" not in bob[:-1], bob  # no last will while training; only its goodbye
