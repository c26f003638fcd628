"""Compressed updates over a real, secured mosquitto: agents encode, sign what they send,
the aggregator checks, decodes and aggregates; hostile compressed updates are refused."""

from __future__ import annotations

import pytest
import torch

from aggregator.checkpoint import RunDir
from broker import codec, compression, messages, signing
from broker.compression_settings import parse
from broker.home import load_credentials
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.operator import StateWatcher
from fedmq.synthetic import BLOBS_TASK
from tests.helpers import current_model, join, publish_as, write_blobs

pytestmark = pytest.mark.mosquitto
DEVICES = ["dev1", "dev2", "dev3"]
ROUNDS = 3

TABLES = {
    "plain": {},
    "fp16": {"encoding": "fp16"},
    "int8": {"encoding": "int8"},
    "int8-channel": {"encoding": "int8", "per_channel": True},
    "topk": {"encoding": "topk", "fraction": 0.25},
}


def task_with(path, table: dict) -> TaskSpec:
    lines = [BLOBS_TASK]
    if table:
        lines += ["[compression]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return TaskSpec.load(path)


def _toml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def run(federation, tmp_path, name: str, table: dict):
    files = write_blobs(tmp_path / "data", DEVICES, samples=600)
    fed = federation(devices=DEVICES, name=name)
    task = task_with(tmp_path / f"{name}.toml", table)
    agg = fed.aggregator(tmp_path / name, task, rounds=ROUNDS, min_devices=3, deadline=None)
    thread = fed.in_thread(agg.run, timeout=120)
    for d in DEVICES:
        fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=120)
    assert join(thread, 150) == 0
    return agg, RunDir(tmp_path / name).metrics()


@pytest.mark.parametrize("name", list(TABLES))
def test_each_encoding_completes_its_rounds_with_smaller_updates(federation, tmp_path, name):
    agg, rows = run(federation, tmp_path, name, TABLES[name])
    assert [r["contributors"] for r in rows] == [DEVICES] * ROUNDS
    assert all(not r["rejected"] for r in rows)
    # every update is 3 devices' worth; the blobs MLP is tiny (131 weights), so the
    # metadata weighs as much as the tensors: compare the tensors' share
    per_update = rows[-1]["update_bytes"] / 3
    expected_data = {"plain": 131 * 4, "fp16": 131 * 2, "int8": 131, "int8-channel": 131}
    if name in expected_data:
        assert expected_data[name] + 450 < per_update < expected_data[name] + 1_300
    # the model learnt the blobs: the devices' evaluation of the last round's model
    assert rows[-1]["metrics"]["eval_accuracy"] > 0.8
    assert all(torch.isfinite(v).all() for v in agg.weights.values() if v.is_floating_point())


def test_compressed_updates_are_smaller_than_plain_ones_on_the_wire(federation, tmp_path):
    _, plain = run(federation, tmp_path, "plainref", {})
    _, int8 = run(federation, tmp_path, "int8ref", {"encoding": "int8"})
    assert int8[-1]["update_bytes"] < 0.75 * plain[-1]["update_bytes"]


def signed(fed, device, model, tensors, meta_changes=None) -> bytes:
    meta = messages.update_metadata(
        round_=model.round,
        device_id=device,
        num_samples=10,
        base_hash=model.model_hash,
        metrics={"train_loss": 1.0},
        federation=model.federation,
        run_id=model.run_id,
    )
    meta.update(meta_changes or {})
    key = load_credentials(fed.credentials(device))["signing_key"]
    meta["signature"] = signing.sign(signing.load_private(key), tensors, meta)
    return codec.encode(tensors, meta)


def test_hostile_compressed_updates_are_refused_and_an_honest_one_gets_through(
    federation, tmp_path
):
    devices = ["bob", "mallory", "trudy", "eve", "oscar"]
    fed = federation(devices=devices)
    table = {"encoding": "topk", "fraction": 0.25}
    task = task_with(tmp_path / "task.toml", table)
    settings = parse(table)
    agg = fed.aggregator(tmp_path / "run", task, rounds=1, min_devices=1, deadline=None)
    agg_thread = fed.in_thread(agg.run, timeout=120)
    model = current_model(fed, "mallory")
    trained = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.tensors.items()}
    wire, _ = compression.encode(trained, model.tensors, settings)
    label = {"encoding": settings.label}
    bad_index = dict(wire, index=wire["index"].clone())
    bad_index["index"][-1] = 10**6
    narrower, _ = compression.encode(trained, model.tensors, parse({**table, "fraction": 0.5}))
    forged = signed(fed, "oscar", model, wire, label)
    forged = forged.replace(b"topk/0.25", b"topk/0.26")  # the signature no longer holds
    payloads = {
        "mallory": signed(fed, "mallory", model, trained),  # plain weights: bad_metadata
        "trudy": signed(fed, "trudy", model, bad_index, label),  # bad_metadata
        "eve": signed(fed, "eve", model, narrower, label),  # shape_mismatch
        "oscar": forged,  # bad_metadata (the label) before any signature check
    }
    with StateWatcher(fed.settings("fedmq-operator"), fed.name) as watcher:
        for account, payload in payloads.items():
            publish_as(fed, account, Topics(fed.name).update(account), payload)
        state = watcher.next_state(10)
        while state["totals"].get("rejected_total", 0) < len(payloads):
            state = watcher.next_state(10)
    assert state["totals"]["rejected"] == {"bad_metadata": 3, "shape_mismatch": 1}
    # bob's honest compressed update, signed as sent, closes the round
    publish_as(fed, "bob", Topics(fed.name).update("bob"), signed(fed, "bob", model, wire, label))
    assert join(agg_thread, 60) == 0
    rows = agg.run_dir.metrics()
    assert rows[0]["contributors"] == ["bob"]
    want = compression.decode(wire, settings, model.tensors)
    for name, value in agg.weights.items():
        assert torch.equal(value, want[name]), name  # one update: FedAvg is that update
