"""Test helpers: a secured federation on a real mosquitto, and threads to run roles in."""

from __future__ import annotations

import threading
from pathlib import Path

from aggregator.service import Aggregator
from broker.task import TaskSpec
from device_agent.agent import Agent
from fedmq.local import LocalFederation
from fedmq.synthetic import blobs_task, write_blobs  # noqa: F401 (re-exported for tests)


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

    def start_aggregator(self, tmp_path: Path, **options) -> tuple[Aggregator, threading.Thread]:
        """An aggregator on the synthetic blobs task, running in a thread."""
        options.setdefault("deadline", None)
        agg = self.aggregator(tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), **options)
        return agg, self.in_thread(agg.run, timeout=120)

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


def publish_as(fed, account: str, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish one QoS 1 message with ``account``'s credentials and wait for the broker's ack."""
    with mqtt_session(fed.settings(account), f"test-pub-{account}") as client:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


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


def signed_update(
    fed,
    device,
    model,
    *,
    round_=None,
    base_hash=None,
    num_samples=10,
    tensors=None,
    metrics=None,
    sign=True,
    sign_as=None,
    device_id=None,
    drop=(),
    run_id=None,
) -> bytes:
    """``device``'s update of ``model`` (its own weights unless ``tensors``), signed with its
    key (or ``sign_as``'s); every field can be made wrong for the hostile tests."""
    from broker import codec, messages, signing
    from broker.home import load_credentials

    tensors = tensors if tensors is not None else {k: v.clone() for k, v in model.tensors.items()}
    binding = {"federation": model.federation, "run_id": run_id or model.run_id}
    meta = messages.update_metadata(
        round_=model.round if round_ is None else round_,
        device_id=device_id or device,
        num_samples=num_samples,
        base_hash=model.model_hash if base_hash is None else base_hash,
        metrics=metrics or {"train_loss": 1.0},
        **binding,
    )
    for key in drop:
        del meta[key]
    if sign:
        key = load_credentials(fed.credentials(sign_as or device))["signing_key"]
        meta["signature"] = signing.sign(signing.load_private(key), tensors, meta)
    return codec.encode(tensors, meta)
