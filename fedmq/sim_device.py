"""One light virtual device of ``fedmq simulate``: a real MQTT client, no thread of its own.

It behaves on the wire like ``device_agent.agent`` with its own account: client id
``fedmq-device-<federation>-<id>``, a persistent session, a retained ``offline`` last
will, ``online`` in its retained status once connected, the aggregator's signature
checked on every model, one signed update per announced round (the same bytes again
if the round's model comes back after a reconnect), and it stops at the final model.
It trains nothing: its update is the announced model plus its own deterministic
delta (``fedmq.secagg_fleet.trained_weights``), so the exact FedAvg is known.

Every callback runs on the process's one ``ClientLoop`` thread. Identical model
payloads (every device of the process receives the same retained model) are
decoded and signature-checked once per process (``ModelCache``); each device still
refuses a model that fails the check.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker import messages, signals
from broker.connection import connect_properties
from broker.errors import CodecError
from broker.limits import DEFAULT_MAX_PAYLOAD
from broker.topics import Topics
from fedmq.secagg_fleet import synthetic_update
from fedmq.signing_hooks import agent_hooks
from fedmq.sim_loop import ClientLoop, SimClient

KEEPALIVE = 60  # seconds: 10,000 devices ping ~170 times a second in all
MAX_ERRORS = 50  # error lines kept per process (the rest are counted)
# CONNACK reason codes no retry can fix: bad user name or password (134), not authorized
# (135), client identifier not valid (133), banned (138)
PERMANENT_REFUSALS = {133, 134, 135, 138}
CAPABILITIES = {"simulated": "fedmq simulate"}  # in the status, where an agent names its torch


@dataclass
class Tally:
    """What one process's devices did: counters the parent sums and shows."""

    devices: int = 0
    connected: int = 0  # connected right now
    ever_connected: int = 0
    online: int = 0  # subscribed and said online (first time)
    published: int = 0  # updates sent (re-sends included)
    acked: int = 0  # updates the broker acknowledged
    finished: int = 0  # devices that are done (final model, or --rounds answered)
    refused: int = 0  # devices the broker will not let in (credentials, TLS): given up
    reconnects: int = 0
    state_messages: int = 0  # aggregator state messages received (--subscribe-state)
    state_bytes: int = 0
    models_refused: int = 0
    rounds: Counter = field(default_factory=Counter)  # round -> devices that answered it
    first_connack: list[float] = field(default_factory=list)  # wall times, once per device
    # round -> [first, last] wall time a device of this process got the model / had its
    # update acknowledged: where a round's time goes
    model_times: dict = field(default_factory=dict)
    ack_times: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    # dials that failed for now and were tried again (a busy broker, a full accept queue):
    # not errors unless the device never gets in
    retried: int = 0
    retry_notes: list[str] = field(default_factory=list)

    @staticmethod
    def stamp(times: dict, round_: int) -> None:
        now = time.time()
        span = times.setdefault(round_, [now, now])
        span[1] = now

    def retry(self, message: str) -> None:
        self.retried += 1
        if len(self.retry_notes) < 3:
            self.retry_notes.append(message)

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)


class ModelCache:
    """Decoded, signature-checked models by payload digest (the last few only)."""

    def __init__(self, verify) -> None:
        self.verify = verify
        self._cache: dict[bytes, Any] = {}

    def get(self, payload: bytes) -> messages.ModelMessage:
        key = hashlib.sha256(payload).digest()
        hit = self._cache.get(key)
        if hit is None:
            try:
                msg = messages.decode_model(payload, max_payload=DEFAULT_MAX_PAYLOAD)
                if self.verify is not None:
                    self.verify(msg.tensors, msg.metadata)
                hit = msg
            except CodecError as exc:
                hit = exc
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[key] = hit
        if isinstance(hit, CodecError):
            raise hit
        return hit


def tls_context(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """What ``make_client``'s ``tls_set`` builds, once per process instead of once per client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


class VirtualDevice:
    def __init__(
        self,
        index: int,
        creds: dict,
        *,
        loop: ClientLoop,
        tally: Tally,
        models: ModelCache,
        context: ssl.SSLContext | None,
        rounds: int | None,
        subscribe_state: bool = False,
    ) -> None:
        self.index = index
        self.device_id: str = creds["device_id"]
        self.federation: str = creds["federation"]
        self.loop, self.tally, self.models, self.rounds = loop, tally, models, rounds
        self.subscribe_state = subscribe_state
        self.topics = Topics(self.federation)
        self.sign, _ = agent_hooks(creds["signing_key"], None)
        self.answered: list[int] = []  # rounds this device sent an update for
        self.last_update: tuple[str, bytes] | None = None  # (model hash, payload)
        self.update_mids: dict[int, int] = {}  # mid -> round
        self.finished = False
        self.said_online = False
        self.is_connected = False
        client = SimClient(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fedmq-device-{self.federation}-{self.device_id}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(creds["username"], creds["password"])
        self.context = context
        if context is not None:
            client.tls_set_context(context)
        client.will_set(self.topics.status(self.device_id), self._status("offline"), 1, True)
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    def start(self, host: str, port: int) -> None:
        self.loop.add(
            self.client,
            host,
            port,
            tls=self.context,
            keepalive=KEEPALIVE,
            clean_start=False,
            properties=connect_properties(persistent=True),
        )

    # -- callbacks (the loop's thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            permanent = reason_code.value in PERMANENT_REFUSALS
            self.tally.error(f"{self.device_id}: broker refused the connection: {reason_code}")
            if permanent:
                self.give_up()
            return
        self.loop.connected(client)
        self.is_connected = True
        self.tally.connected += 1
        if self.tally.ever_connected < self.tally.devices and not self.said_online:
            self.tally.first_connack.append(time.time())
            self.tally.ever_connected += 1
        else:
            self.tally.reconnects += 1
        # device_agent.agent's subscriptions; state only to measure what it costs
        topics = [self.topics.model, self.topics.round, self.topics.inbox(self.device_id)]
        if self.subscribe_state:
            topics.append(self.topics.state)
        client.subscribe([(t, mqtt.SubscribeOptions(qos=1)) for t in topics])
        client.publish(self.topics.status(self.device_id), self._status("online"), 1, True)
        if not self.said_online:
            self.said_online = True
            self.tally.online += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.is_connected:
            self.is_connected = False
            self.tally.connected -= 1
        if not self.finished:
            self.loop.connection_lost(client)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid in self.update_mids:
            round_ = self.update_mids.pop(mid)
            if reason_code.is_failure:
                self.tally.error(f"{self.device_id}: update refused by the broker: {reason_code}")
            else:
                self.tally.acked += 1
                self.tally.stamp(self.tally.ack_times, round_)
                self._maybe_finish()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.state:
            self.tally.state_messages += 1
            self.tally.state_bytes += len(msg.payload)
        if msg.topic != self.topics.model or not msg.payload or self.finished:
            return
        try:
            model = self.models.get(msg.payload)
            if model.federation != self.federation:
                raise CodecError(f"model of federation {model.federation!r}", reason="wrong_run")
        except CodecError as exc:
            self.tally.models_refused += 1
            self.tally.error(f"{self.device_id}: refused a model ({exc.reason}): {exc}")
            return
        if model.final:
            self.tally.stamp(self.tally.model_times, model.round)  # the run's end
            self._finish()
            return
        self.tally.stamp(self.tally.model_times, model.round)
        if not model.selects(self.device_id):
            payload = self._status("skipped", model.round, "not selected")
            client.publish(self.topics.status(self.device_id), payload, 1, True)
            return
        if self.last_update is not None and self.last_update[0] == model.model_hash:
            self._send(self.last_update[1], model.round)  # the same round again: the same bytes
            return
        if self.rounds is not None and len(self.answered) >= self.rounds:
            return
        payload = self._update(model)
        self.last_update = (model.model_hash, payload)
        self.answered.append(model.round)
        self.tally.rounds[model.round] += 1
        self._send(payload, model.round)

    # -- helpers ------------------------------------------------------------------------
    def _send(self, payload: bytes, round_: int) -> None:
        info = self.client.publish(self.topics.update(self.device_id), payload, qos=1)
        self.update_mids[info.mid] = round_
        self.tally.published += 1

    def _update(self, model: messages.ModelMessage) -> bytes:
        return synthetic_update(self.index, self.device_id, model, self.sign)

    def give_up(self) -> None:
        """Refused for good (bad credentials, not authorized, TLS): no more redials."""
        if not self.finished:
            self.finished = True
            self.tally.refused += 1

    def _maybe_finish(self) -> None:
        if self.rounds is not None and len(self.answered) >= self.rounds and not self.update_mids:
            self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.tally.finished += 1

    def _status(self, status: str, round_: int | None = None, reason: str = "") -> bytes:
        return signals.encode_status(
            status, self.device_id, round_=round_, capabilities=CAPABILITIES, reason=reason
        )

    def say_offline(self) -> mqtt.MQTTMessageInfo | None:
        """Leaving cleanly fires no will: say it, as an agent stopping does."""
        if not self.is_connected:
            return None
        return self.client.publish(
            self.topics.status(self.device_id), self._status("offline"), 1, True
        )
