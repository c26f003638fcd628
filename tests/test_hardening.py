"""Issue 8 on a real broker: what a device, a second aggregator or a stale command can do.

Each test drives a running aggregator over a real mosquitto with fedmq's secured
config and checks what it counts, keeps and publishes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading

import pytest
from click.testing import CliRunner

from aggregator.checkpoint import RunDir
from broker import messages, signals
from broker.errors import FedmqError
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.cli import main
from fedmq.operator import StateWatcher, read_state
from tests.helpers import (
    blobs_task,
    current_model,
    join,
    mqtt_session,
    publish_as,
    signed_update,
    wait_for,
)

pytestmark = pytest.mark.mosquitto


def nudged(model) -> dict:
    return {k: v + 0.5 if v.is_floating_point() else v for k, v in model.tensors.items()}


def bob_reports(fed):
    """bob sends his update of the retained model; returns that model."""
    model = current_model(fed, "bob")
    publish_as(fed, "bob", Topics(fed.name).update("bob"), signed_update(fed, "bob", model))
    return model


def second_aggregator(fed, tmp_path):
    """A running aggregator (run dir ``a``) and a second one for the same federation (``b``)."""
    (tmp_path / "a").mkdir()
    first, thread = fed.start_aggregator(tmp_path / "a", rounds=1, min_devices=1)
    wait_for(lambda: first.phase == "collecting", 20, "the first aggregator")
    task = TaskSpec.load(blobs_task(tmp_path))
    second = fed.aggregator(tmp_path / "b" / "run", task, rounds=1, deadline=None)
    return first, thread, second


def set_status(fed, device, status):
    publish_as(
        fed, device, Topics(fed.name).status(device), signals.encode_status(status, device), True
    )


def test_a_nesting_bomb_status_is_refused_counted_and_survived_across_restarts(
    federation, tmp_path
):
    fed = federation(devices=["bob", "mallory"])
    topics = Topics(fed.name)
    # retained on the device's own status topic: seen again by every aggregator start
    publish_as(fed, "mallory", topics.status("mallory"), b"[" * 100_000, retain=True)
    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    wait_for(lambda: agg._refused.get("status:too_large"), 20, "the refusal")
    deep = b'{"status": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # under the size bound
    publish_as(fed, "mallory", topics.status("mallory"), deep, retain=True)
    wait_for(lambda: agg._refused.get("status:not_json"), 20, "the second refusal")
    assert agg.phase == "collecting" and thread.is_alive()
    agg.stop()
    assert join(thread, 20) == 0

    again, thread = fed.start_aggregator(tmp_path, resume=True, min_devices=1)
    wait_for(lambda: again._refused.get("status:not_json"), 20, "the retained one again")
    set_status(fed, "bob", "online")
    bob_reports(fed)
    assert join(thread, 30) == 0  # the round completed with bob, nothing crashed
    state = read_state(fed.settings("fedmq-operator"), fed.name)
    assert state["totals"]["refused_messages"]["status:not_json"] >= 1


def test_only_signed_updates_for_this_round_count_as_a_report(federation, tmp_path):
    """Late, unsigned, wrong-run and forged copies never stand in for a device's report;
    device metric names cannot overwrite the aggregator's own fields."""
    fed = federation(devices=["bob", "alice"])
    topics = Topics(fed.name)
    agg, thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=1)
    for device in ("bob", "alice"):
        set_status(fed, device, "online")
    wait_for(lambda: len(agg.status) == 2, 20, "both devices online")
    first = current_model(fed, "bob")
    for device in ("bob", "alice"):
        publish_as(fed, device, topics.update(device), signed_update(fed, device, first))
    wait_for(lambda: agg.state.completed_round == 1, 30, "round 1")

    second = current_model(fed, "bob")
    assert second.round == 2
    publish_as(fed, "bob", topics.update("bob"), signed_update(fed, "bob", second))
    # alice: a new signed update for round 1 (late), an unsigned and a wrong-run one for round 2
    publish_as(
        fed,
        "alice",
        topics.update("alice"),
        signed_update(fed, "alice", first, tensors=nudged(first)),
    )
    publish_as(
        fed, "alice", topics.update("alice"), signed_update(fed, "alice", second, sign=False)
    )
    publish_as(
        fed, "alice", topics.update("alice"), signed_update(fed, "alice", second, run_id="other")
    )
    wait_for(lambda: len(agg.current.journal.entries) == 4, 20, "four fates journaled")
    outcomes = sorted(
        (e["device"], e["outcome"], e.get("reason", "")) for e in agg.current.journal.entries
    )
    assert outcomes == [
        ("alice", "late", ""),
        ("alice", "rejected", "missing_signature"),
        ("alice", "rejected", "wrong_run"),
        ("bob", "accepted", ""),
    ]
    assert agg.current.journal.reporters() == {"bob"}
    assert agg.state.completed_round == 1  # alice is present and has not reported: wait

    hostile_names = {"round": 99.0, "devices": 1e6, "samples": -1.0, "train_loss": 0.25}
    publish_as(
        fed,
        "alice",
        topics.update("alice"),
        signed_update(fed, "alice", second, metrics=hostile_names),
    )
    assert join(thread, 30) == 0
    rows = agg.run_dir.metrics()
    assert [(r["round"], r["devices"], r["samples"]) for r in rows] == [(1, 2, 20), (2, 2, 20)]
    assert rows[1]["contributors"] == ["alice", "bob"]
    assert rows[1]["metrics"]["round"] == 99.0  # alice's own number, under "metrics"
    per_device = [json.loads(line) for line in RunDir(agg.run_dir.path).devices_jsonl.open()]
    assert [(r["round"], r["device"]) for r in per_device] == [
        (1, "alice"),
        (1, "bob"),
        (2, "alice"),
        (2, "bob"),
    ]
    assert per_device[2]["metrics"]["round"] == 99.0


def test_one_device_cannot_flood_the_journal(federation, tmp_path):
    from aggregator import service

    fed = federation(devices=["bob", "mallory"])
    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    model = current_model(fed, "mallory")
    topic = Topics(fed.name).update("mallory")
    extra = 8
    with mqtt_session(fed.settings("mallory"), "flood") as client:
        for k in range(service.MAX_RECORDS_PER_DEVICE + extra):
            payload = signed_update(
                fed, "mallory", model, round_=model.round + 1 + k
            )  # future rounds
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    wait_for(lambda: agg._refused.get("updates:flood") == extra, 30, "the flood to be counted")
    assert agg.current.journal.records_of("mallory") == service.MAX_RECORDS_PER_DEVICE
    agg.stop()
    join(thread, 20)


def test_a_short_round_is_announced_again(federation, tmp_path):
    fed = federation(devices=["bob"])
    announced = queue.Queue()
    with mqtt_session(fed.settings("fedmq-aggregator"), "watch-model") as client:
        client.on_message = lambda c, u, m: announced.put(m.payload)
        client.subscribe(Topics(fed.name).model, qos=1)
        agg, thread = fed.start_aggregator(
            tmp_path, rounds=1, min_devices=2, deadline=0.5, on_short="retry"
        )
        first = messages.decode_model(announced.get(timeout=20))
        again = messages.decode_model(announced.get(timeout=20))  # after the deadline
        assert again.round == first.round == 1 and again.model_hash == first.model_hash
        agg.stop()
        join(thread, 20)


def test_the_final_model_is_published_even_if_the_broker_is_down_at_the_end(
    federation, tmp_path, monkeypatch
):
    monkeypatch.setenv("FEDMQ_RECONNECT_MAX", "1")  # retry each second, not at 1 s then 3 s
    fed = federation(devices=["bob"])
    restarted = threading.Event()

    def on_event(kind, info):
        if kind == "round_done":  # the broker goes away just before the final publish
            fed.stop_broker()
            threading.Timer(1.5, lambda: (fed.start_broker(), restarted.set())).start()

    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    agg.on_event = on_event
    set_status(fed, "bob", "online")
    bob_reports(fed)
    assert join(thread, 60) == 0
    assert restarted.is_set()
    final = current_model(fed, "bob")
    assert final.final and final.round == 2


def test_a_second_aggregator_is_refused_and_a_dead_one_is_reported(federation, tmp_path):
    fed = federation(devices=["bob"])
    first, thread, second = second_aggregator(fed, tmp_path)
    with pytest.raises(FedmqError, match="another aggregator is running federation 'test'"):
        second.run(timeout=30)
    assert first.phase == "collecting" and thread.is_alive()  # not knocked off

    operator = str(fed.credentials("fedmq-operator"))
    result = CliRunner().invoke(main, ["aggregator", "status", "--config", operator])
    assert "round 1 of 1, collecting" in result.output
    first.stop()
    join(thread, 20)
    result = CliRunner().invoke(main, ["aggregator", "status", "--config", operator])
    assert result.exit_code == 0
    assert "no aggregator running for federation 'test' (last seen" in result.output
    result = CliRunner().invoke(main, ["aggregator", "stop", "--config", operator])
    assert result.exit_code == 1 and "'stop' not sent" in result.output


def test_a_killed_aggregator_leaves_its_will(federation, tmp_path, monkeypatch):
    import signal

    fed = federation(devices=["bob"])
    task = tmp_path / "task.toml"
    task.write_text(blobs_task(tmp_path).read_text())
    monkeypatch.setenv("FEDMQ_KEEPALIVE", "1")  # the will fires ~1.5 s after the link is quiet
    proc = fed.spawn_aggregator("--task", str(task), "--run-dir", str(tmp_path / "run"))
    operator = fed.settings("fedmq-operator")
    with StateWatcher(operator, fed.name) as watcher:
        while watcher.next_state(60)["phase"] != "collecting":
            pass
    assert read_state(operator, fed.name)["aggregator"]["running"]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: not read_state(operator, fed.name)["aggregator"]["running"], 20, "the will")


def test_a_stop_queued_while_no_aggregator_runs_does_not_stop_the_next_one(
    federation, tmp_path, caplog
):
    fed = federation(devices=["bob"])
    agg, thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=1, stop_after=1)
    set_status(fed, "bob", "online")
    bob_reports(fed)
    assert join(thread, 30) == 0 and agg.state.completed_round == 1
    # a stop for the aggregator that just left, queued in its persistent session
    stale = signals.encode_control("stop", agg.instance)
    publish_as(fed, "fedmq-operator", Topics(fed.name).control, stale)

    caplog.set_level(logging.INFO, logger="fedmq.aggregator")
    again, thread = fed.start_aggregator(tmp_path, resume=True)
    wait_for(lambda: again.current and again.current.number == 2, 20, "round 2 announced")
    model = current_model(fed, "bob")
    assert model.round == 2
    wait_for(lambda: again._refused.get("control:not_for_us"), 20, "the stale stop ignored")
    publish_as(fed, "bob", Topics(fed.name).update("bob"), signed_update(fed, "bob", model))
    assert join(thread, 30) == 0
    assert again.phase == "done" and again.state.completed_round == 2
    assert "meant for another aggregator instance" in caplog.text


def test_plot_on_stop_and_offline_devices_are_logged(federation, tmp_path, caplog):
    fed = federation(devices=["bob"])
    caplog.set_level(logging.INFO, logger="fedmq.aggregator")
    agg, thread = fed.start_aggregator(tmp_path, rounds=3, min_devices=1, plot=True, stop_after=1)
    set_status(fed, "bob", "online")
    wait_for(lambda: agg.status.get("bob") == "online", 20, "bob online")
    set_status(fed, "bob", "offline")
    wait_for(lambda: agg.status.get("bob") == "offline", 20, "bob offline")
    bob_reports(fed)
    assert join(thread, 60) == 0
    assert agg.phase == "stopped" and agg.run_dir.plot_png.stat().st_size > 0
    assert "device bob went offline" in caplog.text


def test_plots_come_after_the_final_model_and_state(federation, tmp_path):
    """Drawing the figures takes seconds: devices and operators must not wait for them."""
    fed = federation(devices=["bob"])
    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1, plot=True)
    seen = {}
    drawn = agg._plot

    def plot_and_look() -> None:
        seen["state"] = read_state(fed.settings("fedmq-operator"), fed.name)
        seen["model"] = current_model(fed, "bob")
        drawn()

    agg._plot = plot_and_look
    set_status(fed, "bob", "online")
    bob_reports(fed)
    assert join(thread, 60) == 0
    assert seen["state"]["phase"] == "done" and seen["state"]["completed_rounds"] == 1
    assert not seen["state"]["aggregator"]["running"]  # presence already offline
    assert seen["model"].final
    assert agg.run_dir.plot_png.stat().st_size > 0


def test_two_aggregators_past_the_start_check_do_not_fight(federation, tmp_path):
    """Both started at once (each found no presence): they share one client id, so each
    connection takes the session from the other (mosquitto 2.0.11 closes the old socket
    without a DISCONNECT reason). Each sees the other's presence: the younger stops, the
    older keeps the federation and finishes its round."""
    fed = federation(devices=["bob"])
    older, older_thread, younger = second_aggregator(fed, tmp_path)
    younger._refuse_if_another_is_running = lambda: None  # as if both had probed at once
    younger_thread = fed.in_thread(younger.run, timeout=60)
    with pytest.raises(FedmqError, match="started earlier and runs; this one stops"):
        join(younger_thread, 30)
    assert younger.phase == "failed"

    wait_for(lambda: older._connected.is_set(), 30, "the older one back on the broker")
    set_status(fed, "bob", "online")
    assert bob_reports(fed).run_id == older.spec.run_id
    assert join(older_thread, 30) == 0 and older.phase == "done"
    state = read_state(fed.settings("fedmq-operator"), fed.name)
    assert state["instance"] == older.instance


def test_the_retained_presence_of_a_killed_predecessor_is_not_an_aggregator(federation, tmp_path):
    """A broker SIGKILLed after an aggregator died can bring back that aggregator's
    'online' presence (its will was never saved): a dead pid on this host is nobody."""
    import socket
    import subprocess

    fed = federation(devices=["bob"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    ghost = signals.Presence("online", "ghost", host=socket.gethostname(), pid=gone.pid, since=1.0)
    topic = Topics(fed.name).aggregator
    publish_as(fed, "fedmq-aggregator", topic, ghost.encode(heartbeat=1.0), retain=True)
    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    wait_for(lambda: agg.phase == "collecting", 20, "the round")
    set_status(fed, "bob", "online")
    bob_reports(fed)
    assert join(thread, 30) == 0 and agg.phase == "done"
