"""Hostile and broken updates against a running aggregator on a real broker.

Each is refused with its own reason, counted in the retained ``state``, and the
aggregator keeps going: the round still completes with the honest device.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch

from aggregator.service import initial_weights
from broker import messages
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.operator import StateWatcher
from tests.helpers import (
    blobs_task,
    current_model,
    join,
    publish_as,
    signed_update,
    wait_for,
    write_blobs,
)

pytestmark = pytest.mark.mosquitto
README = Path(__file__).resolve().parent.parent / "README.md"
MAX_PAYLOAD = 64 * 1024  # the aggregator's limit in the live test: "oversize" stays small


def readme_refusal_kinds() -> set[str]:
    """The reasons the README's "Reliability" section says a payload is refused for."""
    text = README.read_text()
    section = text[text.index("Payloads refused") :]
    section = section[: section.index(" kinds.")]
    declared = int(re.search(r"(\d+)$", section).group(1))
    listed = re.sub(r"\([^()]*\)", "", section[section.index("):") :])  # no asides
    kinds = set(re.findall(r"`([a-z_]+)`", listed))
    assert len(kinds) == declared, f"the README lists {sorted(kinds)} as {declared} kinds"
    return kinds


def raw_header(header: dict, data: bytes = b"", declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def hostile_payloads(fed, model) -> dict[str, tuple[str, bytes]]:
    """reason -> (account, payload): published by that account on its own update topic,
    it must be refused for exactly that reason."""
    good = signed_update(fed, "mallory", model)
    name, first = next(iter(model.tensors.items()))
    wrong_shape = {**model.tensors, name: torch.zeros(first.shape[0] + 1, *first.shape[1:])}
    wrong_dtype = {**model.tensors, name: first.to(torch.float64)}
    extra = {**model.tensors, "backdoor": torch.zeros(1)}
    missing = {k: v for k, v in model.tensors.items() if k != name}
    nan = {**model.tensors, name: torch.full_like(first, math.nan)}
    payloads = {
        "not_safetensors": b'{"weights": [1, 2, 3]}',
        "truncated": good[: len(good) // 2],
        "header_too_large": struct.pack("<Q", 10**12) + b"{}",
        "bad_header": struct.pack("<Q", 5) + b"{nope",
        "bad_offsets": raw_header(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        "oversize": good + b" " * MAX_PAYLOAD,
        "shape_mismatch": signed_update(fed, "mallory", model, tensors=wrong_shape),
        "dtype_mismatch": signed_update(fed, "mallory", model, tensors=wrong_dtype),
        "unknown_tensor": signed_update(fed, "mallory", model, tensors=extra),
        "missing_tensor": signed_update(fed, "mallory", model, tensors=missing),
        "non_finite": signed_update(fed, "mallory", model, tensors=nan),
        "missing_metadata": signed_update(fed, "mallory", model, drop=["num_samples"]),
        "bad_metadata": signed_update(fed, "mallory", model, num_samples=0),
        "future_round": signed_update(fed, "mallory", model, round_=model.round + 5),
        "stale": signed_update(fed, "mallory", model, base_hash="0" * 64),
        # bob's genuine signature over an update naming bob, sent on mallory's topic
        "wrong_device": signed_update(fed, "mallory", model, device_id="bob", sign_as="bob"),
        "missing_signature": signed_update(fed, "mallory", model, sign=False),
        "bad_signature": signed_update(fed, "mallory", model, sign_as="bob"),
    }
    sent = {reason: ("mallory", payload) for reason, payload in payloads.items()}
    # trudy has a broker account, but the aggregator has no public key for her
    sent["unknown_device"] = ("trudy", signed_update(fed, "trudy", model))
    # signed by mallory, for this federation but another run of it
    sent["wrong_run"] = ("mallory", signed_update(fed, "mallory", model, run_id="0" * 32))
    return sent


def test_the_live_test_sends_every_refusal_kind_the_readme_lists(federation, tmp_path):
    fed = federation(devices=["bob", "mallory", "trudy"])
    task = TaskSpec.load(blobs_task(tmp_path))
    model = messages.decode_model(messages.encode_model(initial_weights(task), 1, task)[0])
    assert set(hostile_payloads(fed, model)) == readme_refusal_kinds()


def test_every_hostile_payload_is_refused_counted_and_survived(federation, tmp_path):
    fed = federation(devices=["bob", "mallory", "trudy"])
    (fed.home.device_keys_dir / "trudy.pub").unlink()  # an account, but no key: unknown
    files = write_blobs(tmp_path / "data", ["bob"])
    agg, agg_thread = fed.start_aggregator(
        tmp_path, rounds=1, min_devices=1, max_payload=MAX_PAYLOAD
    )
    model = current_model(fed, "mallory")
    payloads = hostile_payloads(fed, model)
    with StateWatcher(fed.settings("fedmq-operator"), fed.name) as watcher:
        for account, payload in payloads.values():
            publish_as(fed, account, Topics(fed.name).update(account), payload)
        state = watcher.next_state(10)
        while state["totals"].get("rejected_total", 0) < len(payloads):
            state = watcher.next_state(10)
    assert state["totals"]["rejected"] == {reason: 1 for reason in payloads}
    assert state["phase"] == "collecting"  # still running, nothing accepted from them

    # the honest device still gets its round through
    fed.in_thread(fed.agent("bob", files["bob"], exit_when_done=True).run, timeout=60)
    assert join(agg_thread, 60) == 0
    assert agg.run_dir.metrics()[0]["devices"] == 1


def test_late_duplicate_and_replayed_updates_count_once(federation, tmp_path):
    fed = federation(devices=["bob", "alice"])
    files = write_blobs(tmp_path / "data", ["bob", "alice"])
    agg, agg_thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=2)
    round1 = current_model(fed, "bob")
    topic = Topics(fed.name).update("bob")
    first = signed_update(fed, "bob", round1, num_samples=40)
    publish_as(fed, "bob", topic, first)
    publish_as(fed, "bob", topic, first)  # QoS 1 redelivery: the very same bytes
    second = signed_update(fed, "bob", round1, num_samples=40, metrics={"train_loss": 2.0})
    publish_as(fed, "bob", topic, second)  # a second, different update for the same round
    wait_for(lambda: agg.current.journal.counts()["outcomes"].get("duplicate"), 10, "duplicate")
    assert agg.current.accepted == 1

    # alice closes round 1 (both present devices reported); bob's round-1 update is now late
    alice = fed.agent("alice", files["alice"], max_rounds=1)
    join(fed.in_thread(alice.run, timeout=60), 60)
    wait_for(lambda: agg.state.completed_round == 1, 20, "round 1 to close")
    publish_as(fed, "bob", topic, signed_update(fed, "bob", round1, num_samples=41))
    wait_for(lambda: agg.current.journal.counts()["outcomes"].get("late"), 10, "late update")
    for device in ("bob", "alice"):
        fed.in_thread(fed.agent(device, files[device], exit_when_done=True).run, timeout=60)
    assert join(agg_thread, 60) == 0
    totals = agg.state.totals
    assert (totals["accepted"], totals["duplicate"], totals["late"]) == (4, 1, 1)
    assert agg.run_dir.metrics()[0]["devices"] == 2


def test_broker_drops_payloads_over_its_message_size_limit(tmp_path):
    """mosquitto's message_size_limit (rendered by fedmq) stops oversized updates before
    they reach anyone; a normal message sent after them arrives (the sync point)."""
    import queue

    from broker.connection import ConnectionSettings
    from broker.launcher import free_port, start_mosquitto
    from broker.mosquitto_conf import MosquittoConfig, render
    from tests.helpers import mqtt_session

    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        render(MosquittoConfig(data_dir=tmp_path, port=port, message_size_limit=10_000))
    )
    broker = start_mosquitto(conf, port=port)
    try:
        settings = ConnectionSettings(port=port)
        got: queue.Queue = queue.Queue()
        with mqtt_session(settings, "sub") as sub, mqtt_session(settings, "pub") as pub:
            sub.on_message = lambda c, u, m: got.put(len(m.payload))
            subscribed = queue.Queue()
            sub.on_subscribe = lambda *a: subscribed.put(True)
            sub.subscribe("fedmq/t/updates/+", qos=1)
            subscribed.get(timeout=5)
            pub.publish("fedmq/t/updates/big", b"x" * 20_000, qos=1)
            # no wait_for_publish: paho 2 reads mosquitto's refusal of the big one as a
            # malformed packet and reconnects, resending both, so the small one's PUBACK
            # never comes and the wait ran out its 5 s every time. The sync point is the
            # small message arriving.
            pub.publish("fedmq/t/updates/small", b"x" * 100, qos=1)
            # same connection, same order: had the big one passed, it would have come first
            assert got.get(timeout=5) == 100
            assert all(got.get_nowait() == 100 for _ in range(got.qsize()))  # QoS 1 may repeat
    finally:
        broker.stop()
