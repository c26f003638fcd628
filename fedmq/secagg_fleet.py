"""Many simulated devices, each a real MQTT client, for the secure-aggregation benchmark.

Each device has its own account and credentials (TLS when the federation uses it),
signs what it sends and checks what the aggregator signed, like ``device_agent.agent``,
but trains nothing: its "trained" model is the announced one plus a fixed pseudorandom
delta (``synthetic_delta``), so the benchmark knows the exact FedAvg to expect.

- ``plain`` mode: on the round's model it publishes one signed update (as loadgen does);
- ``secure`` mode: it speaks SecAgg+ with ``device_agent.secure_client.SecureClient``,
  on the agent's topics: keys, roster check and shares, delivery, receipt and masked
  input, reveal. A device told to ``drop`` goes away after the shares are delivered,
  before its masked input: it says ``offline`` in its status and disconnects.

A ``Fleet`` runs its devices in one process: one paho network thread per device and a
few handler threads that take the messages in turn (one device's messages one at a
time). ``fleet_process`` runs a fleet in a child process for the benchmark's workers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import torch

from broker import codec, messages, signals
from broker.connection import connect_async, make_client
from broker.home import load_credentials, settings_from_credentials
from broker.limits import DEFAULT_MAX_PAYLOAD
from broker.secagg import wire
from broker.topics import Topics
from device_agent.secure_client import Refused, SecureClient
from fedmq.signing_hooks import agent_hooks, agent_identity

DELTA_STD = 0.01  # the synthetic updates' spread: well inside the secure round's clip range


def synthetic_delta(index: int, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Device ``index``'s update, the same wherever it is computed (tensors in name order)."""
    rng = np.random.default_rng(1_000_003 + index)
    return {
        k: torch.from_numpy(rng.normal(0.0, DELTA_STD, tuple(template[k].shape))).to(
            template[k].dtype
        )
        for k in sorted(template)
    }


def synthetic_samples(index: int) -> int:
    return 10 + index % 50


def trained_weights(index: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What device ``index`` "trained" from ``base``: the sum in the model's own dtype."""
    delta = synthetic_delta(index, base)
    return {k: base[k] + delta[k] for k in base}


def synthetic_update(index: int, device_id: str, model: messages.ModelMessage, sign) -> bytes:
    """Device ``index``'s plain update payload for ``model``: the model plus its synthetic
    delta, signed with ``sign(tensors, meta)`` (None: unsigned)."""
    tensors = trained_weights(index, model.tensors)
    meta = messages.update_metadata(
        round_=model.round,
        device_id=device_id,
        num_samples=synthetic_samples(index),
        base_hash=model.model_hash,
        metrics={"train_loss": 0.5},
        federation=model.federation,
        run_id=model.run_id,
    )
    if sign is not None:
        meta["signature"] = sign(tensors, meta)
    return codec.encode(tensors, meta)


def expected_fedavg(base: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """Plain FedAvg (float64) of those devices' synthetic updates from ``base``."""
    total = sum(synthetic_samples(i) for i in indices)
    acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    for i in indices:
        trained = trained_weights(i, base)
        w = synthetic_samples(i) / total
        for k in acc:
            acc[k] += (trained[k].double() - base[k].double()) * w
    return {k: base[k].double() + acc[k] for k in base}


@dataclass
class FleetSpec:
    """What a fleet (in this or a child process) needs to know; picklable."""

    federation: str
    mode: str  # "plain" | "secure"
    devices: list[tuple[int, str, str]]  # (index, device id, credentials file)
    drop: set[str] = field(default_factory=set)  # devices that go away after sharing
    handlers: int = 4  # threads handling messages
    connect_batch: int = 50  # devices connecting at once


class SimDevice:
    def __init__(self, index: int, device_id: str, creds_path: Path, spec: FleetSpec, inbox):
        creds = load_credentials(creds_path)
        self.index, self.device_id, self.spec = index, device_id, spec
        self.settings = settings_from_credentials(creds)
        self.sign, self.verify = agent_hooks(creds["signing_key"], creds["model_key"])
        self.identity = agent_identity(
            creds["signing_key"], creds["registry_key"], creds["identity_cert"]
        )
        self.topics = Topics(spec.federation)
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.done = threading.Event()
        self.uploaded: Counter = Counter()  # message kind -> payload bytes this device sent
        self.errors: list[str] = []
        self.refusals: list[str] = []
        self.secure: SecureClient | None = None
        self.model: messages.ModelMessage | None = None
        self.trained: dict[str, torch.Tensor] | None = None
        self.sent_update: str | None = None  # the model hash a plain update answered
        self.cpu = 0.0  # thread CPU seconds spent handling this device's messages
        status = self.topics.status(device_id)
        self.client = make_client(
            self.settings,
            f"bench-{spec.federation}-{device_id}",
            persistent=False,
            will=(status, signals.encode_status("offline", device_id)),
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, m: inbox.put((self, m.topic, m.payload))

    # -- network thread ------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.errors.append(f"connect refused: {reason_code}")
            return
        self._status("online")
        client.subscribe(
            [
                (self.topics.model, mqtt.SubscribeOptions(qos=1)),
                (self.topics.round, mqtt.SubscribeOptions(qos=1)),
                (self.topics.inbox(self.device_id), mqtt.SubscribeOptions(qos=1)),
            ]
        )

    def _status(self, status: str) -> mqtt.MQTTMessageInfo:
        payload = signals.encode_status(status, self.device_id)
        return self.client.publish(self.topics.status(self.device_id), payload, qos=1, retain=True)

    def _send(self, kind: str, topic: str, payload: bytes, retain: bool = False) -> None:
        self.uploaded[kind] += len(payload)
        self.client.publish(topic, payload, qos=1, retain=retain)

    # -- handler threads ------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        with self.lock:
            started = time.thread_time()
            try:
                self._handle(topic, payload)
            except Exception as exc:  # reported by the fleet; the benchmark fails on it
                self.errors.append(f"{topic}: {type(exc).__name__}: {exc}")
            finally:
                self.cpu += time.thread_time() - started

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload or self.done.is_set():
            return
        if topic == self.topics.model:
            self._on_model(payload)
        elif self.topics.kind_of(topic) == "receipts":
            if self.secure is not None:
                msg = wire.decode(payload, max_payload=wire.MAX_SMALL)
                if topic == self.topics.receipt(msg.device_id):
                    self.secure.on_receipt(msg)
        elif self.secure is not None:
            self._on_secure(topic, payload)

    def _on_model(self, payload: bytes) -> None:
        msg = messages.decode_model(payload, max_payload=DEFAULT_MAX_PAYLOAD)
        self.verify(msg.tensors, msg.metadata)
        if msg.final or not msg.selects(self.device_id):
            return
        if self.spec.mode == "plain":
            if msg.secure is None and self.sent_update != msg.model_hash:
                self.sent_update = msg.model_hash
                self._send("update", self.topics.update(self.device_id), self._update(msg))
                self.done.set()
            return
        if msg.secure is None or (self.secure and self.secure.session == msg.secure.session):
            return
        self.model, self.trained = msg, None
        self.secure = SecureClient(
            device_id=self.device_id,
            plan=msg.secure,
            round=msg.round,
            model_hash=msg.model_hash,
            federation=msg.federation,
            run_id=msg.run_id,
            identity=self.identity,
            sign=self.sign,
        )
        self._send("keys", self.topics.secagg(self.device_id), self.secure.keys_message())

    def _update(self, model: messages.ModelMessage) -> bytes:
        return synthetic_update(self.index, self.device_id, model, self.sign)

    def _on_secure(self, topic: str, payload: bytes) -> None:
        me = self.device_id
        if topic not in (self.topics.round, self.topics.inbox(me)):
            return
        msg = wire.decode(payload, max_payload=DEFAULT_MAX_PAYLOAD)
        client = self.secure
        if msg.session != client.session:
            return  # an earlier run's retained roster or unmasking request
        self.verify(msg.tensors, msg.metadata)
        try:
            if msg.kind == "roster":
                shares = client.on_roster(msg)
                self.client.subscribe(
                    [
                        (self.topics.receipt(v), mqtt.SubscribeOptions(qos=1))
                        for v in client.neighbours
                    ]
                )
                self._send("shares", self.topics.secagg(me), shares)
                self.trained = trained_weights(self.index, self.model.tensors)
            elif msg.kind == "deliver":
                client.on_deliver(msg)
                if me in self.spec.drop:
                    self._go_away()
                    return
                vector = client.masked_vector(
                    self.model.tensors, self.trained, synthetic_samples(self.index)
                )
                self._send("receipt", self.topics.receipt(me), client.receipt_message(), True)
                masked = client.masked_message(vector, {"train_loss": 0.5})
                self._send("masked", self.topics.secagg(me), masked)
            elif msg.kind == "unmask":
                self._send("reveal", self.topics.secagg(me), client.on_unmask(msg))
                self.done.set()
        except Refused as exc:  # e.g. an earlier run's round still retained: counted
            self.refusals.append(f"refused {msg.kind}: {exc}")

    def _go_away(self) -> None:
        """Dropped after sharing: say offline (as an agent stopping does), then leave."""
        self._status("offline").wait_for_publish(10)
        self.client.disconnect()
        self.done.set()


class Fleet:
    """Devices of one process: connected, handled, and stopped."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.inbox: queue.Queue = queue.Queue()
        self.devices = [SimDevice(i, d, Path(c), spec, self.inbox) for i, d, c in spec.devices]
        self.stopping = threading.Event()
        self.handlers = [
            threading.Thread(target=self._handle_loop, daemon=True) for _ in range(spec.handlers)
        ]
        for t in self.handlers:
            t.start()

    def _handle_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                device, topic, payload = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            device.handle(topic, payload)

    def connect(self, timeout: float = 120) -> float:
        """Connect every device, in batches; seconds until all are subscribed and online."""
        started = time.perf_counter()
        batch = self.spec.connect_batch
        for at in range(0, len(self.devices), batch):
            group = self.devices[at : at + batch]
            for d in group:
                connect_async(d.client, d.settings, persistent=False)
                d.client.loop_start()
            for d in group:
                if not d.ready.wait(timeout):
                    raise TimeoutError(f"{d.device_id} did not connect: {d.errors[:1]}")
        return time.perf_counter() - started

    def stop(self) -> dict:
        """Disconnect everyone; what each device sent (bytes by kind) and any errors."""
        self.stopping.set()
        leaving = [d._status("offline") for d in self.devices if d.client.is_connected()]
        for info in leaving:  # a clean disconnect fires no will: say it, as an agent does
            info.wait_for_publish(10)
        for d in self.devices:
            d.client.disconnect()
        for d in self.devices:
            d.client.loop_stop()
        return {
            "uploaded": {d.device_id: dict(d.uploaded) for d in self.devices},
            "done": sorted(d.device_id for d in self.devices if d.done.is_set()),
            "errors": [f"{d.device_id}: {e}" for d in self.devices for e in d.errors],
            "refusals": [f"{d.device_id}: {e}" for d in self.devices for e in d.refusals],
            "handler_cpu": sum(d.cpu for d in self.devices),
            "process_cpu": time.process_time(),
        }


def fleet_process(spec: FleetSpec, conn) -> None:
    """A child process's fleet: connect, say so, run until told to stop, report."""
    try:
        fleet = Fleet(spec)
        conn.send(("ready", fleet.connect()))
    except Exception as exc:  # told to the parent, which stops the benchmark
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.recv()  # "stop"
    conn.send(("done", fleet.stop()))
