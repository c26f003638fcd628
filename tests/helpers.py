"""Test helpers: a secured federation on a real mosquitto, and threads to run roles in."""

from __future__ import annotations

import threading
from pathlib import Path

from aggregator.service import Aggregator
from broker.task import TaskSpec
from device_agent.agent import Agent
from fedmq.local import LocalFederation


class Federation(LocalFederation):
    """LocalFederation plus in-process agents/aggregators that tests can inspect."""

    threads: list[threading.Thread]

    @classmethod
    def start(cls, path: Path, name: str, devices: list[str], **home_options) -> Federation:
        fed = cls.create(path, name, devices, **home_options)
        fed.threads = []
        fed.start_broker()
        return fed

    def agent(self, device: str, data: Path, **options) -> Agent:
        return Agent(self.agent_config(device, data, **options))

    def aggregator(self, run_dir: Path, task: TaskSpec | None, **options) -> Aggregator:
        options.setdefault("plot", False)
        return Aggregator(self.aggregator_config(run_dir, task, **options))

    def in_thread(self, target, *args, **kwargs) -> threading.Thread:
        """Run ``target`` in a daemon thread; ``join`` returns its value or raises its error."""
        result: dict = {}

        def run():
            try:
                result["value"] = target(*args, **kwargs)
            except BaseException as exc:  # surfaced by join()
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.result = result  # type: ignore[attr-defined]
        thread.start()
        self.threads.append(thread)
        return thread

    def close(self) -> None:
        super().close()
        for thread in self.threads:
            thread.join(timeout=10)


def join(thread: threading.Thread, timeout: float):
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout}s"
    if "error" in thread.result:
        raise thread.result["error"]
    return thread.result.get("value")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_blobs(directory: Path, devices: list[str], samples: int = 40, seed: int = 0) -> dict:
    """Small non-IID classification data, one CSV per device: 4 features, 3 classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(3, 4))
    files = {}
    directory.mkdir(parents=True, exist_ok=True)
    for i, device in enumerate(devices):
        # each device sees mostly one class: the non-IID split of a real fleet
        probs = np.full(3, 0.15)
        probs[i % 3] = 0.7
        y = rng.choice(3, size=samples, p=probs / probs.sum())
        X = centers[y] + rng.normal(0, 1.0, size=(samples, 4))
        path = directory / f"{device}.csv"
        rows = ["f0,f1,f2,f3,label"] + [
            ",".join(f"{v:.6f}" for v in x) + f",{c}" for x, c in zip(X, y)
        ]
        path.write_text("\n".join(rows) + "\n")
        files[device] = path
    return files


BLOBS_TASK = """
seed = 7
[model]
arch = "mlp"
in_features = 4
hidden = [16]
out_features = 3
[train]
epochs = 2
batch_size = 8
lr = 0.1
optimizer = "sgd"
loss = "cross_entropy"
[data]
label = "label"
"""


def blobs_task(directory: Path) -> Path:
    path = directory / "task.toml"
    path.write_text(BLOBS_TASK)
    return path


def mqtt_session(settings, client_id: str):
    """A connected plain paho client (context manager) for tests that speak MQTT directly."""
    import contextlib
    import threading

    from broker.connection import connect_async, make_client

    @contextlib.contextmanager
    def session():
        client = make_client(settings, client_id, persistent=False)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
        connect_async(client, settings, persistent=False)
        client.loop_start()
        try:
            assert connected.wait(10), f"{client_id} could not connect"
            yield client
        finally:
            client.disconnect()
            client.loop_stop()

    return session()


def publish_as(fed, account: str, topic: str, payload: bytes) -> None:
    """Publish one QoS 1 message with ``account``'s credentials and wait for the broker's ack."""
    with mqtt_session(fed.settings(account), f"test-pub-{account}") as client:
        client.publish(topic, payload, qos=1).wait_for_publish(10)


def current_model(fed, account: str, timeout: float = 10):
    """The retained global model as ``account`` sees it (decoded)."""
    import queue

    from broker import messages
    from broker.topics import Topics

    inbox: queue.Queue = queue.Queue()
    with mqtt_session(fed.settings(account), f"test-sub-{account}") as client:
        client.on_message = lambda c, u, m: inbox.put(m.payload)
        client.subscribe(Topics(fed.name).model, qos=1)
        return messages.decode_model(inbox.get(timeout=timeout))
