"""The device agent: a small, patient MQTT client that trains when a round starts.

Network callbacks only put messages on a queue; the agent's own thread decodes,
trains and publishes. The session is persistent and reconnects with backoff, so
an update published while the link is down is sent when it comes back; the
retained ``model`` tells a device that rebooted which round is running.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import platform
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from broker import codec, compression, compression_settings, messages, signals, zoo
from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import BrokerError, CodecError, ConfigError, DataError, TaskError
from broker.secagg import wire as secagg_wire
from broker.topics import Topics
from device_agent import resources
from device_agent.data import DataFile, open_data, shape_for
from device_agent.hooks import TrainingHooks
from device_agent.secure_client import Identity, Refused, SecureClient
from device_agent.trainer import evaluate_tensors, tensors_for, train_tensors, training_seed

log = logging.getLogger("fedmq.agent")


@dataclass(frozen=True)
class AgentConfig:
    connection: ConnectionSettings
    federation: str
    device_id: str
    data_path: Path
    exit_when_done: bool = False  # leave once the aggregator publishes its final model
    max_rounds: int | None = None  # leave after training this many rounds (testing, demos)
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    sign: Callable[[dict, dict], str] | None = None  # (tensors, metadata) -> signature
    verify_model: Callable[[dict, dict], None] | None = None  # raises CodecError if unsigned
    threads: int | None = None  # torch threads for training
    # this device's own architectures beyond the zoo's built-ins: name -> factory (or
    # "package.module:function"); a model's task can only name one, never bring code
    architectures: Mapping[str, Callable | str] | None = None
    insecure: bool = False  # allow running without sign / verify_model (logs a warning)
    # demos and tests of robust aggregation only: (global, trained) -> the weights sent
    # instead of the honest ones, e.g. device_agent.attacks.Attacker; signed like any update
    poison: Callable[[dict, dict], dict] | None = None
    # when the owner lets this device train ([limits] of its config file); a round that
    # comes while they forbid it is held back, said in its status, and checked again
    # every ``recheck_seconds`` until it is allowed or a newer model replaces it
    limits: resources.Limits | None = None
    recheck_seconds: float = 30.0
    readings_root: Path = Path("/")  # where /proc and /sys are (tests: a fake tree)
    # secure aggregation: this device's registry-certified key and the registry's public
    # key, to check its peers' advertisements (None: it cannot take part, unless insecure)
    identity: Identity | None = None
    # a round's training is said in status ("training", then "online" with the update)
    # when the last one took at least this long, or there was none yet: for a round
    # trained in milliseconds the two messages cost the fleet more than they tell anyone
    training_status_seconds: float = 1.0


def says_training(last_train_seconds: float | None, threshold: float) -> bool:
    """Whether to say "training" in status before a round's training: when it is the
    first, or the last one took at least ``threshold`` seconds (long enough to be seen)."""
    return last_train_seconds is None or last_train_seconds >= threshold


class Agent:
    def __init__(self, config: AgentConfig, on_event: Callable[[str, dict], None] | None = None):
        self.config = config
        _check_keys(config)
        self.topics = Topics(config.federation)
        self.data: DataFile = open_data(config.data_path)  # fail before connecting
        self.on_event = on_event or (lambda kind, info: None)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._last_update: tuple[str, bytes] | None = None  # (model hash, update payload)
        self.rounds_trained = 0
        self._model_cache: tuple[str, torch.nn.Module] | None = None
        self._tensors: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # per task
        # a selected round the limits hold back: (model, hooks, the reason said in status)
        self._deferred: tuple[messages.ModelMessage, TrainingHooks, str] | None = None
        self._told: tuple[str, str] | None = None  # the last (model hash, reason) deferred
        self._recheck_at = 0.0
        self._secure: _SecureSession | None = None  # the secure round in progress
        # topk's error feedback: (task JSON, what earlier rounds left unsent). In memory
        # only: a restart drops it, i.e. the unsent part of this device's past deltas
        self._residual: tuple[str, torch.Tensor] | None = None
        self.client = make_client(
            config.connection,
            client_id=f"fedmq-device-{config.federation}-{config.device_id}",
            will=(self.topics.status(config.device_id), self._status_payload("offline")),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # says why the broker cannot be reached; credentials, TLS, ACL refusals end the run
        self._watch = ConnectionWatch(
            self.client,
            config.connection,
            log,
            on_fatal=lambda exc: self._inbox.put(("__fatal__", str(exc).encode())),
            log_connect=False,
        )
        self._connected_at: float | None = None  # monotonic time of the first connection
        self._said_connected = False
        # the last status published, from either thread: (status, round, reason)
        self._said: tuple[str, int | None, str] = ("", None, "")
        self._last_train_seconds: float | None = None

    # -- network thread: route only -------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # the ConnectionWatch says why
            return
        # not the aggregator's state: the agent never reads it, and the aggregator
        # republishes it up to 4 times a second, which the broker would copy to every
        # device (3,000 simulated devices received 10.6 GB of it in 95 s)
        client.subscribe(
            [
                (self.topics.model, mqtt.SubscribeOptions(qos=1)),
                (self.topics.round, mqtt.SubscribeOptions(qos=1)),
                (self.topics.inbox(self.config.device_id), mqtt.SubscribeOptions(qos=1)),
            ]
        )
        if self._secure is not None and self._secure.client.neighbours:
            self._watch_receipts(self._secure.client.neighbours)
        deferred = self._deferred  # a round held back says so again, not "online"
        if deferred is None:
            self._publish_status("online")
        else:
            self._publish_status("skipped", round_=deferred[0].round, reason=deferred[2])
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        self._connected.set()
        self.on_event("connected", {})

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((msg.topic, msg.payload))

    # -- agent thread ---------------------------------------------------------------
    def run(self, timeout: float | None = None) -> int:
        """Serve rounds until stopped, done, or ``timeout`` seconds pass. Returns an exit code."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        connect_async(self.client, self.config.connection, persistent=True)
        self.client.loop_start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    return 2
                if self._retry_deferred():
                    return 0
                try:
                    topic, payload = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    self._say_connected(waiting=True)
                    continue
                if topic == "__fatal__":
                    raise BrokerError(payload.decode())
                if topic == self.topics.model:
                    self._say_connected(waiting=False)
                    payload = self._latest_model(payload)
                    if self._handle_model(payload):
                        return 0
                elif self._secure is not None and self._handle_secure(topic, payload):
                    return 0
        finally:
            self.close()
        return 0

    @property
    def connection_problem(self) -> str | None:
        """Why the broker cannot be reached right now, or None."""
        problem = self._watch.problem
        return None if problem is None else problem.message

    def _say_connected(self, waiting: bool) -> None:
        """Once: connected, and (after a second without a retained model) waiting for one."""
        if self._said_connected or self._connected_at is None:
            return
        address = self.config.connection.address
        if not waiting:
            log.info("connected to %s", address)
        elif time.monotonic() - self._connected_at > 1.0:
            log.info(
                "connected to %s; waiting for the aggregator's first model on %s",
                address,
                self.topics.model,
            )
        else:
            return
        self._said_connected = True

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._connected.is_set():
            self._publish_status("offline").wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

    def _latest_model(self, payload: bytes) -> bytes:
        """Several models queued while training: only the newest one matters."""
        others = []
        while True:
            try:
                topic, newer = self._inbox.get_nowait()
            except queue.Empty:
                break
            if topic == self.topics.model:
                payload = newer
            else:
                others.append((topic, newer))
        for item in others:
            self._inbox.put(item)
        return payload

    def _handle_model(self, payload: bytes) -> bool:
        """Train on a new global model. True when the agent should leave."""
        if not payload:
            return False  # retained model cleared
        try:
            model_msg = messages.decode_model(payload, max_payload=self.config.max_payload)
            if self.config.verify_model is not None:
                self.config.verify_model(model_msg.tensors, model_msg.metadata)
            if model_msg.federation != self.config.federation:
                raise CodecError(
                    f"the model belongs to federation {model_msg.federation!r}, "
                    f"not {self.config.federation!r}",
                    reason="wrong_run",
                )
            hooks = TrainingHooks.from_settings(model_msg.train_settings)
        except CodecError as exc:
            log.error("refused a global model (%s): %s", exc.reason, exc)
            self.on_event("model_refused", {"reason": exc.reason})
            return False
        self._deferred = None  # a newer model replaces one the limits held back
        if model_msg.final:  # the final model's round is one past the last one trained
            self.on_event("done", {"round": model_msg.round - 1})
            log.info("the federation finished after round %d", model_msg.round - 1)
            return self.config.exit_when_done
        arch = model_msg.task.model.arch
        try:  # a name lookup only: nothing named by the wire is ever imported
            zoo.resolve(arch, self.config.architectures)
        except TaskError as exc:
            log.error(
                "model names architecture %r which this device does not have: register it in "
                "the [architectures] table of the agent's config file or with "
                "--arch NAME=package.module:function (%s)",
                arch,
                exc,
            )
            self.on_event("model_refused", {"reason": exc.reason, "arch": arch})
            return False
        if model_msg.secure is not None and model_msg.selects(self.config.device_id):
            return self._start_secure(model_msg, hooks)
        if not model_msg.selects(self.config.device_id):
            log.info("round %d: not selected this round; waiting for the next", model_msg.round)
            self._publish_status("skipped", round_=model_msg.round, reason="not selected")
            self.on_event("not_selected", {"round": model_msg.round})
            return False
        if self._last_update is not None and self._last_update[0] == model_msg.model_hash:
            # The same round again: after a reconnect, a broker restart or a retried round.
            # Send the same bytes once more; the aggregator counts a payload only once.
            self.client.publish(
                self.topics.update(self.config.device_id), self._last_update[1], qos=1
            )
            log.info("round %d: model seen again, re-sent the update", model_msg.round)
            return False
        return self._train_if_allowed(model_msg, hooks)

    def _train_if_allowed(self, msg: messages.ModelMessage, hooks: TrainingHooks) -> bool:
        """Train now if the limits allow it, else hold the round back. True: leave."""
        reason = self._why_not()
        if reason is not None:
            self._defer(msg, hooks, reason)
            return False
        self._deferred = None
        self._train_and_publish(msg, hooks)
        self.rounds_trained += 1
        return self.config.max_rounds is not None and self.rounds_trained >= self.config.max_rounds

    def _why_not(self) -> str | None:
        limits = self.config.limits
        if limits is None or not limits.any:
            return None
        readings = resources.read(self.config.readings_root)
        return resources.why_not(limits, readings, dt.datetime.now())

    def _defer(self, msg: messages.ModelMessage, hooks: TrainingHooks, reason: str) -> None:
        """Keep the round to train later. Log why once per model and reason, however often
        the same model arrives (a reconnect, a retried round); say it in status unless the
        status says it already."""
        self._deferred = (msg, hooks, reason)
        self._recheck_at = time.monotonic() + self.config.recheck_seconds
        if self._told != (msg.model_hash, reason):  # not the same model again, or a re-check
            self._told = (msg.model_hash, reason)
            log.info(
                "round %d: not training now: %s; checking again every %gs",
                msg.round,
                reason,
                self.config.recheck_seconds,
            )
            self.on_event("deferred", {"round": msg.round, "reason": reason})
        if self._said != ("skipped", msg.round, reason):
            self._publish_status("skipped", round_=msg.round, reason=reason)

    def _retry_deferred(self) -> bool:
        """The held-back round, once its re-check is due. True: leave."""
        if self._deferred is None or time.monotonic() < self._recheck_at:
            return False
        msg, hooks, _ = self._deferred
        return self._train_if_allowed(msg, hooks)

    def _model_for(self, msg: messages.ModelMessage) -> torch.nn.Module:
        if self._model_cache is None or self._model_cache[0] != msg.task_json:
            self._model_cache = (
                msg.task_json,
                zoo.build_model(msg.task.model, registry=self.config.architectures),
            )
        model = self._model_cache[1]
        model.load_state_dict(msg.tensors, strict=True)
        return model

    def _tensors_for(self, msg: messages.ModelMessage, model: torch.nn.Module):
        """The data as the task's model takes it, checked against it: made once per task
        (the file is read once, at start), not every round."""
        if self._tensors is None or self._tensors[0] != msg.task_json:
            data = self.data.dataset(msg.task.data.label)
            source = str(data.path)
            X = shape_for(data.X, msg.task.model, source)  # flat CSV rows -> cnn1d windows
            self._tensors = (msg.task_json, tensors_for(model, X, data.y, msg.task.train, source))
        return self._tensors[1]

    def _train(self, msg: messages.ModelMessage, hooks: TrainingHooks):
        """Train on the round's model: (weights to send, samples, metrics)."""
        cfg = self.config
        if says_training(self._last_train_seconds, cfg.training_status_seconds):
            self._publish_status("training", round_=msg.round)
        started = time.monotonic()
        model = self._model_for(msg)
        inputs, targets = self._tensors_for(msg, model)
        before = {}  # federated evaluation, unless the task turns it off
        if msg.task.train.evaluate:
            before = evaluate_tensors(model, inputs, targets, msg.task.train)
        seed = training_seed(msg.task.seed, msg.round, cfg.device_id)
        result = train_tensors(model, inputs, targets, msg.task.train, seed, hooks)
        metrics = {"train_loss": result.train_loss, "train_seconds": time.monotonic() - started}
        self._last_train_seconds = metrics["train_seconds"]
        if "loss" in before:
            metrics["eval_loss"] = before["loss"]
        if "accuracy" in before:
            metrics["eval_accuracy"] = before["accuracy"]
        metrics = _finite(metrics, msg.round)
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tensors = hooks.finish(msg.tensors, tensors)  # e.g. clipped for differential privacy
        if cfg.poison is not None:
            tensors = self._poisoned(msg, tensors)
        return tensors, result.num_samples, metrics

    def _train_and_publish(self, msg: messages.ModelMessage, hooks: TrainingHooks) -> None:
        cfg = self.config
        tensors, num_samples, metrics = self._train(msg, hooks)
        meta = messages.update_metadata(
            round_=msg.round,
            device_id=cfg.device_id,
            num_samples=num_samples,
            base_hash=msg.model_hash,
            metrics=metrics,
            federation=msg.federation,
            run_id=msg.run_id,
        )
        tensors = self._compressed(msg, tensors, meta)
        if cfg.sign is not None:
            meta["signature"] = cfg.sign(tensors, meta)  # over the tensors as sent
        payload = codec.encode(tensors, meta)
        self._last_update = (msg.model_hash, payload)
        # QoS 1: if the link is down, paho keeps it and sends it after reconnecting
        info = self.client.publish(self.topics.update(cfg.device_id), payload, qos=1)
        if self._said[0] != "online":  # it said "training", or skipped an earlier round
            self._publish_status("online", round_=msg.round)
        log.info(
            "round %d: trained on %d samples, loss %.4f, published %d bytes",
            msg.round,
            num_samples,
            metrics.get("train_loss", float("nan")),
            len(payload),
        )
        self.on_event("trained", {"round": msg.round, "metrics": metrics, "mid": info.mid})

    def _compressed(self, msg: messages.ModelMessage, tensors: dict, meta: dict) -> dict:
        """The tensors to send under the task's [compression] (broker/compression.py):
        the delta from the round's model, encoded; ``meta`` gets the ``encoding``."""
        settings = compression_settings.parse(msg.task.compression)
        if not settings.active:
            return tensors
        residual = None
        if self._residual is not None and self._residual[0] == msg.task_json:
            residual = self._residual[1]
        generator = torch.Generator().manual_seed(
            training_seed(msg.task.seed, msg.round, self.config.device_id) ^ 0x5EED
        )
        wire, residual = compression.encode(
            tensors, msg.tensors, settings, generator=generator, residual=residual
        )
        self._residual = None if residual is None else (msg.task_json, residual)
        meta["encoding"] = settings.label
        return wire

    # -- secure aggregation (device_agent/secure_client.py) ------------------------------
    def _start_secure(self, msg: messages.ModelMessage, hooks: TrainingHooks) -> bool:
        """A secure round selects this device: advertise keys (or re-send what was sent)."""
        session = self._secure
        if session is not None and session.client.session == msg.secure.session:
            for topic, payload, retain in session.sent:  # the same round seen again
                self.client.publish(topic, payload, qos=1, retain=retain)
            return False
        self._secure = None
        reason = self._why_not()
        if reason is None and self.config.identity is None and not self.config.insecure:
            reason = (
                "secure aggregation needs this device's identity certificate and the "
                "federation's registry key (registry_key, identity_cert in its credentials: "
                "re-issue them with `fedmq broker add-device`)"
            )
        if reason is not None:
            log.warning("round %d: not taking part in secure aggregation: %s", msg.round, reason)
            self._publish_status("skipped", round_=msg.round, reason=reason)
            return False
        identity = self.config.identity or Identity(bytes(32), b"", None)
        client = SecureClient(
            device_id=self.config.device_id,
            plan=msg.secure,
            round=msg.round,
            model_hash=msg.model_hash,
            federation=msg.federation,
            run_id=msg.run_id,
            identity=identity,
            sign=self.config.sign,
        )
        self._secure = _SecureSession(client, msg, hooks)
        self._secure_send(self.topics.secagg(self.config.device_id), client.keys_message())
        log.info("round %d: secure aggregation: advertised keys", msg.round)
        return False

    def _secure_send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._secure.sent.append((topic, payload, retain))
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _watch_receipts(self, neighbours) -> None:
        self.client.subscribe(
            [(self.topics.receipt(v), mqtt.SubscribeOptions(qos=1)) for v in neighbours]
        )

    def _handle_secure(self, topic: str, payload: bytes) -> bool:
        """A message of the secure round in progress. True when the agent should leave."""
        session = self._secure
        me = self.config.device_id
        if self.topics.kind_of(topic) == "receipts":  # a neighbour's word, not the aggregator's
            try:
                msg = secagg_wire.decode(payload, max_payload=secagg_wire.MAX_SMALL)
                if topic == self.topics.receipt(msg.device_id):
                    session.client.on_receipt(msg)
            except CodecError as exc:
                log.warning("ignored a malformed receipt on %s: %s", topic, exc)
            return False
        if topic not in (self.topics.round, self.topics.inbox(me)):
            return False
        try:
            msg = secagg_wire.decode(payload, max_payload=self.config.max_payload)
            if msg.session != session.client.session:
                return False  # another round's, or an earlier attempt's
            if self.config.verify_model is not None:  # the aggregator's own messages
                self.config.verify_model(msg.tensors, msg.metadata)
            if topic == self.topics.round and msg.kind == "roster":
                shares = session.client.on_roster(msg)
                self._watch_receipts(session.client.neighbours)
                self._secure_send(self.topics.secagg(me), shares)
                log.info(
                    "round %d: secure aggregation: shared keys with %d neighbours",
                    msg.round,
                    len(session.client.neighbours),
                )
                session.trained = self._train(session.model, session.hooks)
            elif topic == self.topics.inbox(me) and msg.kind == "deliver":
                session.client.on_deliver(msg)
            elif topic == self.topics.round and msg.kind == "unmask":
                self._secure_send(self.topics.secagg(me), session.client.on_unmask(msg))
                log.info("round %d: secure aggregation: revealed shares", msg.round)
                self.rounds_trained += 1
                limit = self.config.max_rounds
                return limit is not None and self.rounds_trained >= limit
            else:
                return False
        except (CodecError, Refused) as exc:
            log.error("round %d: secure aggregation: %s", session.model.round, exc)
            self._publish_status("skipped", round_=session.model.round, reason=str(exc))
            self._secure = None
            return False
        if session.trained is not None and session.client.sharers and not session.client.sent_input:
            self._send_masked(session)
        return False

    def _send_masked(self, session: _SecureSession) -> None:
        tensors, num_samples, metrics = session.trained
        client = session.client
        vector = client.masked_vector(session.model.tensors, tensors, num_samples)
        me = self.config.device_id
        # the receipt first: a neighbour asked for this device's key must already know
        self._secure_send(self.topics.receipt(me), client.receipt_message(), retain=True)
        payload = client.masked_message(vector, metrics)
        self._secure_send(self.topics.secagg(me), payload)
        self._publish_status("online", round_=session.model.round)
        log.info(
            "round %d: trained on %d samples, loss %.4f, sent a masked input of %d bytes",
            session.model.round,
            num_samples,
            metrics.get("train_loss", float("nan")),
            len(payload),
        )
        self.on_event("trained", {"round": session.model.round, "metrics": metrics})

    def _poisoned(self, msg: messages.ModelMessage, tensors: dict) -> dict:
        """The attacker's update in place of the honest one, trained first like any other."""
        poisoned = self.config.poison(msg.tensors, tensors)
        what = getattr(self.config.poison, "describe", lambda: repr(self.config.poison))()
        log.warning(
            "ATTACKER: round %d: sending a poisoned update (%s) instead of the honest one",
            msg.round,
            what,
        )
        return poisoned

    def _status_payload(self, status: str, round_: int | None = None, reason: str = "") -> bytes:
        capabilities = {"torch": torch.__version__, "machine": platform.machine()}
        return signals.encode_status(
            status,
            self.config.device_id,
            round_=round_,
            capabilities=capabilities,
            reason=reason[: signals.MAX_REASON],
        )

    def _publish_status(
        self, status: str, round_: int | None = None, reason: str = ""
    ) -> mqtt.MQTTMessageInfo:
        self._said = (status, round_, reason)
        return self.client.publish(
            self.topics.status(self.config.device_id),
            self._status_payload(status, round_, reason),
            qos=1,
            retain=True,
        )


@dataclass
class _SecureSession:
    client: SecureClient
    model: messages.ModelMessage
    hooks: TrainingHooks
    trained: tuple | None = None  # (weights, samples, metrics) once trained
    sent: list = field(default_factory=list)  # (topic, payload, retain): re-sent if asked


def _finite(metrics: dict[str, float], round_: int) -> dict[str, float]:
    """The metrics without the non-finite ones, which the aggregator would refuse the whole
    update for. A global model whose BatchNorm running variance went negative (poisoned
    updates do that to FedAvg) evaluates to NaN, yet the device's training, in batch
    statistics, still gives a useful update."""
    broken = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if broken:
        log.warning(
            "round %d: %s not finite (the global model gives NaN or inf on this device's "
            "data); left out of the update's metrics",
            round_,
            ", ".join(f"{k} = {v}" for k, v in broken.items()),
        )
    return {k: v for k, v in metrics.items() if k not in broken}


def _check_keys(config: AgentConfig) -> None:
    """Fail closed: no model key or no signing key only with an explicit ``insecure``."""
    missing = [
        what
        for what, hook in (
            ("model key (models would not be verified)", config.verify_model),
            ("signing key (updates would not be signed)", config.sign),
        )
        if hook is None
    ]
    if not missing:
        return
    if not config.insecure:
        raise ConfigError(
            f"device {config.device_id}: no {' and no '.join(missing)}; give --model-key and "
            "--signing-key (or --config FILE with both), or --insecure to run without them"
        )
    if config.verify_model is None:
        log.warning(
            "insecure: models are not verified (no model key): "
            "whoever can publish one steers this device"
        )
    if config.sign is None:
        log.warning(
            "insecure: updates are not signed (no signing key): "
            "an aggregator that checks signatures refuses them"
        )


__all__ = ["Agent", "AgentConfig", "DataError"]
