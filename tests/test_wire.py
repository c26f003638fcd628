"""What crosses the wire: weights and metrics that anyone can read, never a device's data."""

from __future__ import annotations

import queue
import shutil
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load

from broker.home import load_credentials
from broker.task import TaskSpec
from broker.topics import Topics
from device_agent.data import load_dataset
from tests.helpers import join, mqtt_session, write_blobs

pytestmark = pytest.mark.mosquitto


def test_no_device_data_in_any_payload_of_a_whole_run(federation, tmp_path):
    devices = ["bob", "alice"]
    fed = federation(devices=devices)
    files = write_blobs(tmp_path / "data", devices, samples=30)
    seen: queue.Queue = queue.Queue()
    # the aggregator's account may read every topic of the federation
    with mqtt_session(fed.settings("fedmq-aggregator"), "sniffer") as sniffer:
        sniffer.on_message = lambda c, u, m: seen.put((m.topic, bytes(m.payload)))
        subscribed = queue.Queue()
        sniffer.on_subscribe = lambda *a: subscribed.put(True)
        sniffer.subscribe(Topics(fed.name).all, qos=1)
        subscribed.get(timeout=5)
        agg, agg_thread = fed.start_aggregator(tmp_path, rounds=3, min_devices=2)
        for d in devices:
            fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=60)
        assert join(agg_thread, 90) == 0
    payloads = []
    while not seen.empty():
        payloads.append(seen.get())
    kinds = {topic.split("/")[2] for topic, _ in payloads}
    assert {"model", "updates", "status", "state"} <= kinds
    blob = b"\0".join(p for _, p in payloads)

    for d in devices:
        data = load_dataset(files[d], "label")
        text = files[d].read_text().splitlines()[1:]
        for row, line in zip(data.X, text):
            for dtype in (np.float32, np.float64):
                assert row.astype(dtype).tobytes() not in blob  # a sample, as numbers
            assert line.encode() not in blob  # a sample, as the file holds it
            assert line.split(",")[0].encode() not in blob  # even one feature's text


def test_the_retained_model_reads_with_a_plain_mqtt_client(federation, tmp_path):
    """mosquitto_sub + safetensors: no fedmq code on the reading side."""
    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.fail("mosquitto_sub missing: `make test` installs mosquitto-clients")
    fed = federation(devices=["bob"])
    agg, agg_thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    creds = load_credentials(fed.credentials("bob"))
    out = subprocess.run(
        [
            mosquitto_sub,
            "-h",
            "127.0.0.1",
            "-p",
            str(fed.tls_port),
            "--cafile",
            str(creds["ca_file"]),
            "-u",
            creds["username"],
            "-P",
            creds["password"],
            "-t",
            Topics(fed.name).model,
            "-C",
            "1",
            "-N",
            "-q",
            "1",
            "-W",
            "10",
        ],
        capture_output=True,
        check=True,
        timeout=20,
    ).stdout
    tensors = load(out)
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    path = tmp_path / "model.safetensors"
    path.write_bytes(out)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["round"] == "1"
    assert TaskSpec.from_json(meta["task"]).model.arch == "mlp"
    agg.stop()
    join(agg_thread, 30)
