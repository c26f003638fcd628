"""The aggregator process: announce, collect, aggregate, persist, repeat.

The paho network thread only queues messages. This module's loop decodes and
validates each update (codec + ``rounds.admit``), writes its fate to the round's
journal, folds it into the running sum and only then acknowledges it to the
broker (manual acks), so a crash at any moment loses nothing and counts nothing
twice: unacknowledged updates are redelivered to the persistent session, and
the journal recognises the ones already accounted for.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from aggregator import rounds
from aggregator.checkpoint import RunDir, RunSpec
from aggregator.fedavg import FoldedSum, WeightedMetrics
from aggregator.journal import RoundJournal, payload_digest
from broker import codec, messages, zoo
from broker.connection import ConnectionSettings, connect_async, make_client
from broker.errors import CodecError, FedmqError
from broker.task import TaskSpec
from broker.topics import Topics

log = logging.getLogger("fedmq.aggregator")

PRESENT = ("online", "training")
# updates the broker may send before we ack: bounds the payloads held in memory (and a batch)
RECEIVE_MAXIMUM = 64
CONNECT_TIMEOUT = 30.0  # seconds to reach the broker at start-up before giving up


@dataclass(frozen=True)
class AggregatorConfig:
    connection: ConnectionSettings
    federation: str
    run_dir: Path
    task: TaskSpec | None = None  # None when resuming: the run directory has it
    rounds: int | None = None  # None: 10 for a new run, the run's own when resuming
    min_devices: int | None = None  # None: 1 for a new run, the run's own when resuming
    deadline: float | None = 600.0  # seconds a round may stay open; None waits forever
    on_short: str = "retry"  # at the deadline without quorum: "retry" the round or "stop"
    resume: bool = False
    stop_after: int | None = None  # leave (resumably) after completing this round
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    max_samples: int = messages.DEFAULT_MAX_SAMPLES
    # (device_id, tensors, metadata) -> None, raising CodecError: signature check
    verify_update: Callable[[str, dict, dict], None] | None = None
    sign_model: Callable[[dict, dict], str] | None = None
    plot: bool = True
    # architectures registered on this machine beyond the zoo's built-ins (name -> factory)
    architectures: zoo.Registry | None = None


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass
class _Round:
    number: int
    model_hash: str
    model_payload: bytes
    journal: RoundJournal
    folded: FoldedSum
    metrics: WeightedMetrics = field(default_factory=WeightedMetrics)
    opened: float = field(default_factory=time.monotonic)


class Aggregator:
    def __init__(
        self, config: AggregatorConfig, on_event: Callable[[str, dict], None] | None = None
    ):
        self.config = config
        self.topics = Topics(config.federation)
        self.run_dir = RunDir(config.run_dir)
        self.on_event = on_event or (lambda kind, info: None)
        # bounded: when the loop falls behind, the network thread waits here, TCP pushes back,
        # and the broker keeps the rest; memory holds at most this many payloads
        self._inbox: queue.Queue[_Inbound] = queue.Queue(maxsize=RECEIVE_MAXIMUM)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.status: dict[str, str] = {}
        self.phase = "starting"
        self._last_state_pub = 0.0
        self._state_dirty = True
        self._last_metrics: dict = {}
        self.current: _Round | None = None
        self._reannounce = threading.Event()
        # updates accepted in the previous round: a copy re-sent after the round closed
        # (a device re-sends when it sees a round's model again) is not news, not "late"
        self._previous_digests: set[str] = set()

        if config.resume:
            self.spec, self.state, self.weights = self.run_dir.load()
            if self.spec.federation != config.federation:
                raise FedmqError(
                    f"{config.run_dir} belongs to federation {self.spec.federation!r}, "
                    f"not {config.federation!r}"
                )
            changes = {
                k: v
                for k, v in (("rounds", config.rounds), ("min_devices", config.min_devices))
                if v is not None and v != getattr(self.spec, k)
            }
            if changes:  # e.g. more rounds for a finished run
                self.spec = RunSpec(**{**self.spec.__dict__, **changes})
        else:
            if config.task is None:
                raise FedmqError("a new run needs a task (--task FILE)")
            self.spec = RunSpec(
                federation=config.federation,
                task_json=config.task.to_json(),
                rounds=config.rounds or 10,
                min_devices=config.min_devices or 1,
            )
            self.weights = initial_weights(config.task, config.architectures)
            self.state = self.run_dir.create(self.spec, self.weights)
        self.task = self.spec.task
        self.schema = codec.schema_of(self.weights)
        metrics = self.run_dir.metrics()
        self._last_metrics = metrics[-1] if metrics else {}

        self.client = make_client(
            config.connection,
            client_id=f"fedmq-aggregator-{config.federation}",
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- network thread ---------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the aggregator: %s", reason_code)
            return
        client.subscribe(
            [
                (self.topics.updates_filter, mqtt.SubscribeOptions(qos=1)),
                (self.topics.status_filter, mqtt.SubscribeOptions(qos=1)),
                (self.topics.control, mqtt.SubscribeOptions(qos=1)),
            ]
        )
        self._connected.set()
        self._state_dirty = True
        self._reannounce.set()  # a restarted broker may have lost the retained model

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        item = _Inbound(msg.topic, msg.payload, msg.mid, msg.qos)
        while not self._stop.is_set():
            try:
                self._inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # -- main loop --------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> int:
        """Run until the last round completes (0), ``stop`` (0), or a fatal short round (1)."""
        connect_async(
            self.client, self.config.connection, persistent=True, receive_maximum=RECEIVE_MAXIMUM
        )
        self.client.loop_start()
        try:
            if not self._connected.wait(timeout=CONNECT_TIMEOUT):
                raise FedmqError(
                    f"cannot reach the broker at {self.config.connection.address} "
                    "(is it running? are the credentials right?)"
                )
            return self._loop(timeout)
        finally:
            self._publish_state(force=True)
            self._stop.set()  # from here on a disconnect is ours, not a lost link
            self.client.disconnect()
            self.client.loop_stop()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self._open_round(self.state.completed_round + 1)
        while True:
            self.current = current
            if current is None:
                return 0
            if self._stop.is_set():
                self.phase = "stopped"
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise FedmqError("aggregator timed out")
            self._process_batch(current)
            if self._reannounce.is_set():
                self._announce(current)
            if self.phase == "collecting":
                current = self._maybe_close(current)
            self._publish_state()
            self.current = current

    def _open_round(self, number: int) -> _Round | None:
        if number > self.spec.rounds:
            self._finish()
            return None
        payload, digest = messages.encode_model(
            self.weights, number, self.task, sign=self.config.sign_model
        )
        journal = RoundJournal.open(self.run_dir.path, number)
        current = _Round(number, digest, payload, journal, FoldedSum(self.weights))
        for _device, update_payload in journal.accepted():  # resuming mid-round
            update = messages.decode_update(update_payload, max_payload=len(update_payload))
            current.folded.fold(update.tensors, update.num_samples)
            current.metrics.fold(update.metrics, update.num_samples)
        self._announce(current)
        self.phase = "collecting"
        self._state_dirty = True
        log.info("round %d: announced model %s (%d bytes)", number, digest[:12], len(payload))
        self.on_event("round_open", {"round": number, "replayed": current.folded.count})
        return current

    def _announce(self, current: _Round) -> None:
        """(Re)publish the round's model, retained: after a reconnect, devices that trained
        already re-send their update (counted once), the others start training."""
        self._reannounce.clear()
        self.client.publish(self.topics.model, current.model_payload, qos=1, retain=True)

    def _process_batch(self, current: _Round, limit: int = 256) -> None:
        """Handle what has arrived, make its fate durable with one commit, then ack it all."""
        try:
            batch = [self._inbox.get(timeout=0.1)]
        except queue.Empty:
            return
        while len(batch) < limit:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            self._dispatch(item, current)
        current.journal.commit()  # group commit: one fsync for the whole batch
        for item in batch:
            if item.qos > 0:
                self.client.ack(item.mid, item.qos)  # only now: its fate is on disk

    def _dispatch(self, item: _Inbound, current: _Round) -> None:
        kind = self.topics.kind_of(item.topic)
        if kind == "updates":
            self._handle_update(item, current)
        elif kind == "status":
            self._handle_status(item)
        elif kind == "control":
            self._handle_control(item)

    def _handle_status(self, item: _Inbound) -> None:
        device_id = self.topics.device_of(item.topic)
        if device_id is None:
            return
        try:
            status = json.loads(item.payload).get("status", "unknown") if item.payload else "gone"
        except (ValueError, AttributeError):
            status = "unknown"
        if self.status.get(device_id) != status:
            self.status[device_id] = status
            self._state_dirty = True
            self.on_event("device", {"device": device_id, "status": status})

    def _handle_control(self, item: _Inbound) -> None:
        try:
            command = json.loads(item.payload).get("command")
        except (ValueError, AttributeError):
            log.warning("ignored a control message that is not a JSON object")
            return
        if command == "pause" and self.phase == "collecting":
            self.phase = "paused"
        elif command == "resume" and self.phase == "paused":
            self.phase = "collecting"
        elif command == "stop":
            self._stop.set()
        else:
            log.warning("ignored control command %r in phase %s", command, self.phase)
            return
        log.info("control: %s", command)
        self._state_dirty = True
        self.on_event("control", {"command": command})

    def _handle_update(self, item: _Inbound, current: _Round) -> None:
        topic_device = self.topics.device_of(item.topic)
        digest = payload_digest(item.payload)
        if current.journal.seen(digest) or digest in self._previous_digests:
            return  # redelivered or re-sent: already accounted for
        try:
            update = messages.decode_update(
                item.payload,
                schema=self.schema,
                max_payload=self.config.max_payload,
                max_samples=self.config.max_samples,
            )
            verdict = rounds.admit(
                topic_device=topic_device or "",
                meta_device=update.device_id,
                update_round=update.round,
                base_hash=update.base_hash,
                current_round=current.number,
                current_hash=current.model_hash,
                accepted_devices=current.journal.accepted_devices(),
            )
            if verdict.outcome == rounds.ACCEPTED and self.config.verify_update is not None:
                self.config.verify_update(update.device_id, update.tensors, update.metadata)
        except CodecError as exc:
            verdict = rounds.Verdict(rounds.REJECTED, exc.reason)
            detail = f" ({exc})"
        else:
            detail = ""
        if verdict.outcome == rounds.ACCEPTED:
            current.journal.record_accepted(digest, topic_device, item.payload)
            current.folded.fold(update.tensors, update.num_samples)
            current.metrics.fold(update.metrics, update.num_samples)
        else:
            current.journal.record(digest, topic_device, verdict.outcome, verdict.reason)
            level = logging.WARNING if verdict.outcome == rounds.REJECTED else logging.INFO
            log.log(
                level,
                "round %d: %s update from %s%s%s",
                current.number,
                verdict.outcome,
                topic_device,
                f": {verdict.reason}" if verdict.reason else "",
                detail,
            )
        self._state_dirty = True
        self.on_event(
            "update",
            {
                "round": current.number,
                "device": topic_device,
                "outcome": verdict.outcome,
                "reason": verdict.reason,
                "accepted": current.folded.count,
            },
        )

    def _maybe_close(self, current: _Round) -> _Round | None:
        present = {d for d, s in self.status.items() if s in PRESENT}
        decision = rounds.close_decision(
            accepted=current.folded.count,
            min_devices=self.spec.min_devices,
            present=present,
            reporters=current.journal.reporters(),
            elapsed=time.monotonic() - current.opened,
            deadline=self.config.deadline,
        )
        if decision == rounds.WAIT:
            return current
        if decision == rounds.SHORT:
            message = (
                f"round {current.number}: {current.folded.count} of the "
                f"{self.spec.min_devices} devices needed reported within {self.config.deadline:g}s"
            )
            if self.config.on_short == "stop":
                raise FedmqError(message + "; stopping (resume with --resume)")
            log.warning("%s; retrying the round", message)
            self.on_event("retry", {"round": current.number})
            current.opened = time.monotonic()
            return current
        return self._complete(current)

    def _complete(self, current: _Round) -> _Round | None:
        self.phase = "aggregating"
        self.weights = current.folded.average()
        counts = current.journal.counts()
        totals = self.state.totals
        for outcome, n in counts["outcomes"].items():
            if outcome != rounds.REJECTED:
                totals[outcome] = totals.get(outcome, 0) + n
        rejected = Counter(totals.get("rejected", {}))
        rejected.update(counts["rejected"])
        totals["rejected"] = dict(rejected)
        row = {
            "round": current.number,
            "devices": current.folded.count,
            "samples": current.folded.total_weight,
            "seconds": round(time.monotonic() - current.opened, 3),
            "rejected": dict(counts["rejected"]),
            **current.metrics.means(),
        }
        self.run_dir.commit(self.state, current.number, self.weights, row)
        self._previous_digests = {
            e["digest"] for e in current.journal.entries if e["outcome"] == rounds.ACCEPTED
        }
        current.journal.remove()
        self._last_metrics = row
        log.info("round %d: aggregated %d updates", current.number, current.folded.count)
        self.on_event("round_done", row)
        if self.config.stop_after is not None and current.number >= self.config.stop_after:
            self._stop.set()
            return current
        return self._open_round(current.number + 1)

    def _finish(self) -> None:
        final_round = self.spec.rounds + 1
        payload, _ = messages.encode_model(
            self.weights, final_round, self.task, final=True, sign=self.config.sign_model
        )
        self.client.publish(self.topics.model, payload, qos=1, retain=True).wait_for_publish(10)
        self.phase = "done"
        if self.config.plot:
            self._plot()
        self.on_event("done", {"rounds": self.spec.rounds})

    def _plot(self) -> None:
        try:
            from aggregator.plot import plot_metrics

            plot_metrics(self.run_dir.metrics_jsonl, self.run_dir.plot_png)
        except FedmqError as exc:
            log.warning("no plot: %s", exc)

    # -- state topic --------------------------------------------------------------
    def state_snapshot(self) -> dict:
        """Run totals so far, the round in progress included."""
        totals = {k: v for k, v in self.state.totals.items() if k != "rejected"}
        rejected = Counter(self.state.totals.get("rejected", {}))
        if self.current is not None and self.phase != "done":
            counts = self.current.journal.counts()
            for outcome, n in counts["outcomes"].items():
                if outcome != rounds.REJECTED:
                    totals[outcome] = totals.get(outcome, 0) + n
            rejected.update(counts["rejected"])
        totals["rejected"] = dict(rejected)
        totals["rejected_total"] = sum(rejected.values())
        return {
            "federation": self.config.federation,
            "round": self.state.completed_round + (0 if self.phase == "done" else 1),
            "rounds": self.spec.rounds,
            "completed_rounds": self.state.completed_round,
            "phase": self.phase,
            "min_devices": self.spec.min_devices,
            "devices": {
                "seen": len(self.status),
                "online": sorted(d for d, s in self.status.items() if s in PRESENT),
            },
            "totals": totals,
            "last_metrics": self._last_metrics,
            "time": time.time(),
        }

    def _publish_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._state_dirty or now - self._last_state_pub < 0.25):
            return
        if not self._connected.is_set():
            return
        snapshot = self.state_snapshot()
        info = self.client.publish(
            self.topics.state, json.dumps(snapshot).encode(), qos=1, retain=True
        )
        if force:
            info.wait_for_publish(5)
        self._last_state_pub = now
        self._state_dirty = False


def initial_weights(
    task: TaskSpec, architectures: zoo.Registry | None = None
) -> dict[str, torch.Tensor]:
    model = zoo.build_model(task.model, seed=task.seed, registry=architectures)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
