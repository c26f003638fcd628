"""Many light devices at once: signed updates published by short MQTT sessions.

For the scale test and the round benchmark. Each simulated device connects
with its own account (the broker's ACL lets it write only its own topic),
publishes one signed update at QoS 1, waits for the broker's ack and leaves.
A pool of worker threads keeps ``concurrency`` sessions going at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from broker import codec, messages, signing
from broker.connection import connect_async, make_client
from broker.home import load_credentials, settings_from_credentials


def signed_update(
    credentials: Path, model: messages.ModelMessage, *, num_samples: int, scale: float
) -> tuple[str, bytes]:
    """(device id, payload): the global weights nudged by ``scale``, signed by the device."""
    creds = load_credentials(credentials)
    device = creds["device_id"]
    tensors = {
        k: (v + scale) if v.is_floating_point() else v.clone() for k, v in model.tensors.items()
    }
    meta = messages.update_metadata(
        round_=model.round,
        device_id=device,
        num_samples=num_samples,
        base_hash=model.model_hash,
        metrics={"train_loss": scale},
        federation=model.federation,
        run_id=model.run_id,
    )
    meta["signature"] = signing.sign(signing.load_private(creds["signing_key"]), tensors, meta)
    return device, codec.encode(tensors, meta)


def update_jobs(
    credentials: Callable[[str], Path], federation: str, devices: list[str], model
) -> list[tuple[Path, str, bytes]]:
    """One ``publish_all`` job per device: its signed update, nudged from ``model`` by a
    small per-device step and weighted by 10 + i % 50 samples."""
    from broker.topics import Topics

    jobs = []
    for i, device in enumerate(devices):
        device_id, update = signed_update(
            credentials(device), model, num_samples=10 + i % 50, scale=0.001 * (i % 7)
        )
        jobs.append((credentials(device), Topics(federation).update(device_id), update))
    return jobs


def publish_all(
    jobs: Iterable[tuple[Path, str, bytes]],
    *,
    concurrency: int = 16,
    on_published: Callable[[], None] | None = None,
    timeout: float = 30,
) -> list[str]:
    """Publish ``(credentials file, topic, payload)`` jobs, one session each. Returns errors."""
    work: queue.Queue = queue.Queue()
    for job in jobs:
        work.put(job)
    errors: list[str] = []

    def worker() -> None:
        while True:
            try:
                creds_path, topic, payload = work.get_nowait()
            except queue.Empty:
                return
            try:
                _publish_once(creds_path, topic, payload, timeout)
                if on_published:
                    on_published()
            except Exception as exc:  # reported to the caller, who decides
                errors.append(f"{creds_path.stem}: {exc}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _publish_once(creds_path: Path, topic: str, payload: bytes, timeout: float) -> None:
    settings = settings_from_credentials(creds_path)
    client = make_client(settings, f"fedmq-load-{creds_path.stem}", persistent=False)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError("could not connect")
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError("publish not acknowledged")
    finally:
        client.disconnect()
        client.loop_stop()


def expected_average(model: messages.ModelMessage, scales_and_weights: list[tuple[float, int]]):
    """What FedAvg must produce from ``signed_update``s with these (scale, num_samples)."""
    total = sum(w for _, w in scales_and_weights)
    shift = sum(s * w for s, w in scales_and_weights) / total
    return {
        k: (v.to(torch.float64) + shift).to(v.dtype) if v.is_floating_point() else v
        for k, v in model.tensors.items()
    }


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmHWM``: its peak) in MB; 0.0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def broker_ceiling(settings, topic_filter: str, jobs: list, concurrency: int) -> float:
    """Seconds for the broker to deliver every job to a plain QoS 1 subscriber that
    discards them: what the broker alone can do, beside which the aggregator is measured."""
    got = threading.Semaphore(0)
    client = make_client(settings, "bench-ceiling-subscriber", persistent=False)
    ready = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: got.release()
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the ceiling subscriber could not subscribe")
        start = time.perf_counter()
        errors = publish_all(jobs, concurrency=concurrency)
        for _ in jobs:
            if not got.acquire(timeout=120):
                raise RuntimeError("the ceiling subscriber missed updates")
        seconds = time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()
    if errors:
        raise RuntimeError(f"publishing failed: {errors[:3]}")
    return seconds
