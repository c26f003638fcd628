"""The aggregator process: the round engine. Plan, announce, collect, aggregate, persist.

The paho network thread only queues messages. This module's loop decodes and
validates each update (codec + ``rounds.admit``), writes its fate to the round's
journal (the accepted payloads with it) and only then acknowledges it to the
broker (manual acks), so a crash at any moment loses nothing and counts nothing
twice: unacknowledged updates are redelivered to the persistent session, and
the journal recognises the ones already accounted for.

A round is a sequence of phases (``aggregator/phases.py``); the engine knows no
strategy's math: the strategy (``aggregator/strategies/``) plans the round and
turns its accepted updates, read back from the journal, into the next model.

At a site (``AggregatorConfig.upstream``, ``aggregator/upstream.py``) each round starts
with an ``upstream`` phase that waits for the root's model and takes the root's round
number, and a closed round's result goes up to the root as one partial result instead
of becoming the site's next model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from aggregator import rounds, strategies
from aggregator.checkpoint import RunDir, RunSpec
from aggregator.device_table import STATE_DEVICE_ROWS, DeviceBook
from aggregator.fedavg import WeightedMetrics
from aggregator.inbox import Inbound, Inbox
from aggregator.journal import RoundJournal, payload_digest
from aggregator.phases import Phase, load_plan, round_phases, save_plan
from aggregator.round_updates import HeldUpdates, JournalUpdates, ListUpdates
from aggregator.secure_round import SecureFailure, SecureRound
from aggregator.secure_settings import secure_settings
from aggregator.strategies.base import RoundPlan, Strategy, Update
from aggregator.upstream import Upstream, check_site_task
from broker import codec, compression, compression_settings, messages, signals, zoo
from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import CodecError, ConfigError, FedmqError
from broker.retained import read_retained
from broker.retained_mirror import RetainedMirror, read_on_every_node
from broker.secagg import wire as secagg_wire
from broker.secagg.plan import MIN_ROSTER, SecurePlan
from broker.task import TaskSpec
from broker.topics import Topics

log = logging.getLogger("fedmq.aggregator")

PRESENT = rounds.PRESENT
RECONNECT_GRACE = 30.0  # seconds a device whose "offline" came with a broker restart is awaited
# updates the broker may send before we ack: bounds the payloads held in memory (and a batch)
RECEIVE_MAXIMUM = 64
INBOX_BYTES = 256 * 1024 * 1024  # payload bytes waiting in memory, whatever their number
# ... and no more than about one model's worth (memory during a round: a few models over
# the idle process, whatever the number of devices), but room for a full batch of small
# updates (64 of the 4,810-parameter MLP's are 1.3 MB): see inbox_budget
INBOX_FLOOR = 4 * 1024 * 1024
MAX_RECORDS_PER_DEVICE = 32  # journal lines one device may cause per round; the rest: "flood"
MAX_TRACKED_DEVICES = 100_000  # device statuses kept; more ids are refused "too_many_devices"
CONNECT_TIMEOUT = 30.0  # seconds to reach the broker at start-up before giving up
HEARTBEAT = 10.0  # seconds between re-publications of the presence and state
FINAL_PUBLISH_TIMEOUT = 300.0  # seconds to keep trying to publish the final model
# seconds after start-up a sampled round waits for the devices' retained statuses before
# drawing (later rounds draw at once: a device that comes up meanwhile joins the next),
# and a round resumed with its quorum already journaled before closing: until the statuses
# are in, no device looks present, and "every present device reported" would hold at once
SELECT_SETTLE = 1.0
AVAILABLE = ("online", "training", "skipped")  # devices a round may sample


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
    # without both keys the aggregator refuses to start, unless this is set (logged loudly)
    insecure: bool = False
    plot: bool = True
    inbox_bytes: int = INBOX_BYTES
    final_publish_timeout: float = FINAL_PUBLISH_TIMEOUT
    # architectures registered on this machine beyond the zoo's built-ins (name -> factory)
    architectures: zoo.Registry | None = None
    # a site's edge aggregator: rounds follow the root's, results go up as partials
    upstream: Upstream | None = None
    # the federation's devices (its device_keys): on a cluster (connection.cluster, where
    # RabbitMQ sends no retained message to status/+) their statuses are read one by one
    devices: tuple[str, ...] = ()


@dataclass
class _Round:
    number: int
    model_hash: str
    journal: RoundJournal
    phases: tuple[Phase, ...]
    plan: RoundPlan | None = None  # drawn in the "select" phase, or at "train"
    model_payload: bytes | None = None  # made (with the plan) when the model is announced
    phase_index: int = 0
    opened: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    flooding: set[str] = field(default_factory=set)  # devices over their journal bound
    secure: SecureRound | None = None  # the secure-aggregation session, in its phases
    phase_seconds: dict[str, float] = field(default_factory=dict)  # closed phases' durations
    held: HeldUpdates = field(default_factory=HeldUpdates)  # a small round's, decoded
    replayed: int = 0  # updates its journal held when it was opened (a resumed round)

    @property
    def accepted(self) -> int:
        if self.secure is not None:
            return len(self.secure.metrics)  # masked inputs summed
        return self.journal.accepted_count()

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    @property
    def selected(self) -> tuple[str, ...] | None:
        return None if self.plan is None else self.plan.selected


@dataclass(frozen=True)
class RoundResult:
    """What a closed round computed: a function of its set of accepted updates only."""

    weights: dict[str, torch.Tensor]
    devices: list[str]  # sorted
    samples: int
    metrics: dict[str, float]  # sample-weighted means of the devices' metrics
    device_rows: list[dict]
    carried: int | None = None  # devices behind the updates, when sites sent partials


def aggregate_round(
    strategy: Strategy, current: dict[str, torch.Tensor], updates: JournalUpdates
) -> RoundResult:
    """The strategy's next model from the round's accepted updates, read back from the
    journal in device-id order, and the devices' metrics beside it.

    A float sum depends on the order of its terms; reading in a canonical order makes the
    result a function of the set of updates alone, so a run resumed after a crash (whose
    updates arrived in another order) ends with exactly the model of an uninterrupted one."""
    weights = strategy.aggregate(current, updates)
    means, rows, samples = WeightedMetrics(), [], 0
    summaries = updates.summaries()
    partials = getattr(updates, "partials", {})  # read with the summaries
    for device, num_samples, metrics, trained_for in summaries:
        means.fold(metrics, num_samples)
        samples += num_samples
        row = {"device": device, "num_samples": num_samples, "metrics": metrics}
        if trained_for != updates.round:  # fedbuff: a stale update, trained on an older model
            row["staleness"] = updates.round - trained_for
        if device in partials:  # a site's partial result: how many devices it holds
            row["partial_devices"] = partials[device]
        rows.append(row)
    carried = sum(partials.get(row["device"], 1) for row in rows) if partials else None
    return RoundResult(
        weights=weights,
        devices=[row["device"] for row in rows],
        samples=samples,
        metrics=means.means(),
        device_rows=rows,
        carried=carried,
    )


def aggregate_secure(
    strategy: Strategy, current: dict[str, torch.Tensor], secure: SecureRound
) -> RoundResult:
    """The strategy's next model from a secure round's unmasked sum: to the strategy it is
    one update, the survivors' weighted mean, carrying their summed weight. The devices'
    metrics came in the clear beside their masked inputs; their sample counts did not,
    so the round's metrics are plain means."""
    mean, samples = secure.result()
    summed = getattr(strategy, "inner", strategy)  # DP: the devices clipped and noised
    update = Update(
        device="(secure sum)",
        num_samples=max(1, round(samples)),
        tensors=mean,
        round=secure.round,
        base=current,
    )
    weights = summed.aggregate(current, ListUpdates([update], current, round_=secure.round))
    if summed is not strategy:  # DP in shares: the noise is in the sum
        from aggregator.strategies.private import nonnegative_variances

        weights = nonnegative_variances(weights)
    means, rows = WeightedMetrics(), []
    for device in sorted(secure.metrics):
        means.fold(secure.metrics[device], 1)
        rows.append({"device": device, "num_samples": None, "metrics": secure.metrics[device]})
    return RoundResult(
        weights=weights,
        devices=list(secure.survivors),
        samples=round(samples),
        metrics=means.means(),
        device_rows=rows,
    )


class Aggregator:
    def __init__(
        self, config: AggregatorConfig, on_event: Callable[[str, dict], None] | None = None
    ):
        self.config = config
        if not config.insecure and (config.verify_update is None or config.sign_model is None):
            raise ConfigError(
                "the aggregator needs its signing key and the device-key directory "
                "(--signing-key, --device-keys, or --config with both); "
                "to run without signatures pass --insecure"
            )
        self.topics = Topics(config.federation)
        self.run_dir = RunDir(config.run_dir)
        self.on_event = on_event or (lambda kind, info: None)
        self._inbox = Inbox(RECEIVE_MAXIMUM, config.inbox_bytes)
        # the last batch's commit (its fsync's future, None if it wrote nothing) and the
        # (mid, qos) it will make durable: acked by _ack_durable
        self._unacked: tuple[Future | None, list[tuple[int, int]]] | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._watch: ConnectionWatch | None = None  # made by run(): says why the link failed
        self._superseded: str | None = None  # an older aggregator of this federation runs
        # when each device was last seen going offline, and when our own link dropped and
        # came back: an "offline" that came with a broker restart is given time to recover
        self._offline_at: dict[str, float] = {}
        self._link_lost_at: float | None = None
        self._relinked_at: float | None = None
        self.status: dict[str, str] = {}
        # last seen, last accepted round and its metrics, for the state's device table
        self.devices = DeviceBook(status=self.status)
        self.phase = "starting"
        self._last_state_pub = 0.0
        self._last_heartbeat = 0.0
        self._state_dirty = True
        self._last_metrics: dict = {}
        self.current: _Round | None = None
        self._reannounce = threading.Event()
        # updates accepted in the previous round: a copy re-sent after the round closed
        # (a device re-sends when it sees a round's model again) is not news, not "late"
        self._previous_digests: set[str] = set()
        # messages refused outside the round journal (status, control, floods), by reason
        self._refused: Counter = Counter()

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
            self.strategy = strategies.build(self.spec.task.strategy, self.spec.task.privacy)
            self.strategy.load_state(self.run_dir.strategy_state(self.state.completed_round))
            self.secure = secure_settings(self.spec.task.secure_aggregation, self.strategy)
        else:
            if config.task is None:
                raise FedmqError("a new run needs a task (--task FILE)")
            # refuse a bad [strategy] or [privacy] before writing anything
            self.strategy = strategies.build(config.task.strategy, config.task.privacy)
            self.secure = secure_settings(config.task.secure_aggregation, self.strategy)
            spec = RunSpec(
                federation=config.federation,
                task_json=config.task.to_json(),
                rounds=config.rounds or 10,
                min_devices=config.min_devices or 1,
                run_id=secrets.token_hex(8),
            )
            self.weights = initial_weights(config.task, config.architectures)
            self.state = self.run_dir.create(spec, self.weights)
            self.spec = spec
        if self.strategy.needs_secret:
            self.strategy.use_secret(self.run_dir.secret())
        self._refused.update(self.state.totals.get("refused_messages", {}))
        if self.strategy.min_updates > self.spec.min_devices:
            log.warning(
                "%s needs %d updates a round: rounds wait for %d devices (min_devices is %d)",
                self.strategy.describe(),
                self.strategy.min_updates,
                self.strategy.min_updates,
                self.spec.min_devices,
            )
        self.task = self.spec.task
        if config.upstream is not None:
            check_site_task(self.task, secure_at_site=True)
            config.upstream.partials_dir = self.run_dir.path / "partials"
        self._task_json = self.task.to_json()
        self.compressed = compression_settings.parse(self.task.compression)  # checked on load
        self._model_hashes: dict[int, str] = {}  # round -> hash of the model it trained from
        self._bases: dict[int, dict] = {}  # round -> that model (fedbuff's stale updates)
        self._removing: Future | None = None  # the last committed round's journal, deleting
        self.schema = codec.schema_of(self.weights)
        self._inbox.max_bytes = inbox_budget(config.inbox_bytes, _nbytes(self.weights))
        metrics = self.run_dir.metrics()
        self._last_metrics = metrics[-1] if metrics else {}
        self.presence = signals.Presence(
            status="online",
            instance=secrets.token_hex(8),
            run_id=self.spec.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.time(),
        )

        self.client = make_client(
            config.connection,
            client_id=f"fedmq-aggregator-{config.federation}",
            manual_ack=True,
            will=(self.topics.aggregator, self.presence.encode(status="offline")),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # a cluster that keeps retained messages node-local: copy them to every node
        self._mirror = RetainedMirror(
            config.connection,
            f"fedmq-aggregator-{config.federation}",
            log,
            will=(self.topics.aggregator, self.presence.encode(status="offline")),
            throttle={self.topics.state: HEARTBEAT},
        )
        self._mirror.attach(self.client)

    @property
    def instance(self) -> str:
        return self.presence.instance

    # -- network thread ---------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # the ConnectionWatch of run() says why
            return
        client.subscribe(
            [
                (self.topics.updates_filter, mqtt.SubscribeOptions(qos=1)),
                (self.topics.status_filter, mqtt.SubscribeOptions(qos=1)),
                (self.topics.control, mqtt.SubscribeOptions(qos=1)),
                (self.topics.aggregator, mqtt.SubscribeOptions(qos=1)),
                (self.topics.secagg_filter, mqtt.SubscribeOptions(qos=1)),
            ]
        )
        self._publish_presence()
        if self._link_lost_at is not None:  # a reconnect, not the first connection
            self._relinked_at = time.monotonic()
            # a restarted broker may have lost the retained model. Not on the first
            # connection: run() may already have announced round 1 (the ConnectionWatch's
            # callback, which lets run() go on, runs before this one), and every device
            # would get the model twice
            self._reannounce.set()
        self._connected.set()
        self._state_dirty = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            self._link_lost_at, self._relinked_at = time.monotonic(), None
        if was_connected and not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(Inbound(msg.topic, msg.payload, msg.mid, msg.qos), self._loop_over)

    def _loop_over(self) -> bool:
        """Nothing takes from the inbox any more (the run is done, stopped or failed): the
        network thread must not wait for room, or the acks that the last publications wait
        for (the final model, the presence) are never read. The message stays unacked."""
        return self._stop.is_set() or self.phase in ("done", "stopped", "failed")

    # -- main loop --------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> int:
        """Run until the last round completes (0), ``stop`` (0), or a fatal short round (1).

        Bad credentials, a failed TLS verification or an ACL refusal raise BrokerError
        at once (later on, they stop the loop); an unreachable broker is logged as a
        warning and, at start-up, raises after CONNECT_TIMEOUT with the reason."""
        if self.config.insecure:
            log.warning(
                "running WITHOUT signatures (--insecure): models go out unsigned and "
                "updates are accepted without checking who sent them"
            )
        self.run_dir.lock()
        try:
            self._refuse_if_another_is_running()
            self._watch = watch = ConnectionWatch(
                self.client, self.config.connection, log, on_fatal=lambda exc: self.stop()
            )
            connect_async(
                self.client,
                self.config.connection,
                persistent=True,
                receive_maximum=RECEIVE_MAXIMUM,
            )
            self.client.loop_start()
            self._mirror.start()
            try:
                if not watch.wait_connected(CONNECT_TIMEOUT, stopped=self._stop.is_set):
                    self.phase = "stopped"  # SIGTERM or Ctrl-C before the broker answered
                    return 0
                self._read_cluster_statuses()
                code = self._loop(timeout)
                watch.raise_if_fatal()
                return code
            finally:
                self._leave()
        finally:
            if self._removing is not None:
                self._removing.result()  # no committed round's journal outlives the run
            self.run_dir.unlock()

    def _leave(self) -> None:
        """Whatever ended the run: last state, presence offline, disconnect, then the plots
        (seconds of matplotlib that nobody waiting for the final model should wait for)."""
        try:
            self._say_goodbye()
        finally:
            if self.config.plot:
                self._plot()  # done, stopped, interrupted or failed: the plot of what was done

    def _say_goodbye(self) -> None:
        if self.phase not in ("done", "stopped"):
            failed = self._watch.fatal is not None or self._superseded is not None
            self.phase = "failed" if failed else "stopped"
        if self._superseded is not None:  # the state and presence topics are the other's
            self._stop.set()
            self.client.disconnect()
            self.client.loop_stop()
            self._mirror.stop(timeout=0)
            return
        self._publish_state(force=True)
        if self._connected.is_set():
            self._publish(self.topics.aggregator, self.presence.encode(status="offline"), 5)
        self._stop.set()  # from here on a disconnect is ours, not a lost link
        self.client.disconnect()
        self.client.loop_stop()
        self._mirror.stop()

    def stop(self) -> None:
        self._stop.set()

    def _refuse_if_another_is_running(self) -> None:
        """One aggregator per federation: read the retained presence before taking the session."""
        found = read_retained(
            self.config.connection,
            [self.topics.aggregator],
            client_prefix=f"fedmq-aggregator-{self.config.federation}-probe",
            timeout=CONNECT_TIMEOUT,
            log=log,
            stopped=self._stop.is_set,  # SIGTERM while the broker is unreachable
        )
        try:
            other = signals.parse_presence(found.get(self.topics.aggregator, b""))
        except CodecError:
            other = None
        reason = signals.running_elsewhere(other, self.presence, time.time(), _pid_alive, HEARTBEAT)
        if reason:
            raise FedmqError(
                f"another aggregator is running federation {self.config.federation!r} "
                f"({reason}); stop it first (`fedmq aggregator stop`)"
            )

    def _read_cluster_statuses(self) -> None:
        """On a cluster, the known devices' retained statuses from every node (a device's
        is on the node it dials). Nodes that disagree (a device moved): offline wins."""
        if not self.config.connection.cluster or not self.config.devices:
            return
        topics = [self.topics.status(d) for d in self.config.devices]
        merged: dict[str, bytes] = {}
        try:  # ~4 ms a topic on RabbitMQ 3.10 here: give big fleets the time they need
            nodes = read_on_every_node(
                self.config.connection,
                topics,
                client_prefix=f"fedmq-aggregator-{self.config.federation}-status",
                timeout=max(CONNECT_TIMEOUT, len(topics) / 100),
                log=log,
            )
        except FedmqError as exc:
            log.warning(
                "could not read the devices' retained statuses from the cluster (%s); a "
                "device is known from its next status",
                exc,
            )
            return
        for found in nodes:
            for topic, payload in found.items():
                if topic not in merged or _says_offline(payload):
                    merged[topic] = payload
        for topic, payload in merged.items():
            self._handle_status(Inbound(topic, payload, 0, 0))
        log.info(
            "clustered broker: read %d retained device statuses from %d nodes",
            len(merged),
            len(self.config.connection.cluster),
        )

    def _loop(self, timeout: float | None) -> int:
        self._loop_started = time.monotonic()
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self._open_round(self.state.completed_round + 1)
        while True:
            self.current = current
            self._watch.raise_if_fatal()
            if self._superseded is not None:
                raise FedmqError(self._superseded)
            if current is None:
                return 0
            if self._stop.is_set():
                self._ack_durable()  # on disk already: no need for the broker to resend it
                self.phase = "stopped"
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise FedmqError("aggregator timed out")
            self._process_batch(current)
            if self._reannounce.is_set():
                self._announce(current)
            if self.phase == current.phase.state:  # not paused, not aggregating
                current = getattr(self, f"_phase_{current.phase.name}")(current)
            self._heartbeat()
            self._publish_state()
            self.current = current

    def _open_round(self, number: int) -> _Round | None:
        upstream = self.config.upstream is not None
        if number > self.spec.rounds and not upstream:  # a site ends when its root does
            self._finish()
            return None
        journal = RoundJournal.open(self.run_dir.path, number)
        phases = round_phases(
            self.strategy,
            self.config.deadline,
            None if self.secure is None else self.secure.phase_deadline,
        )
        if upstream:
            phases = (Phase("upstream", deadline=None, state="waiting"), *phases)
        current = _Round(
            number,
            "",  # known once the model is encoded, at announcement (no update can match before)
            journal,
            phases,
            plan=load_plan(journal.directory),  # a restarted round tells the devices the same
        )
        current.replayed = current.accepted
        if current.plan is not None and not upstream:  # drawn before the crash: to training
            current.phase_index = 1 if current.phases[0].name == "select" else 0
        self.on_event("round_open", {"round": number, "replayed": current.accepted})
        self._enter_phase(current)
        return current

    def _enter_phase(self, current: _Round) -> None:
        current.phase_started = time.monotonic()
        self.phase = current.phase.state
        self._state_dirty = True
        if current.phase.name in ("train", "keys"):  # announce the model with the plan
            if current.plan is None:  # no sample drawn (that one is saved as it is drawn):
                # the plan follows from the task alone, so a restart makes the same one;
                # not written, which kept the close's critical path four disk waits longer
                current.plan = self.strategy.plan(current.number, (), self.task.seed)
            secure = None
            if current.phase.name == "keys":  # a fresh session for every attempt
                secure = self.secure.plan(len(current.selected))
            current.model_payload, current.model_hash = self._encode_model(
                current.number, plan=current.plan, secure=secure
            )
            if secure is not None:
                current.secure = SecureRound(
                    plan=secure,
                    round=current.number,
                    model_hash=current.model_hash,
                    selected=current.selected,
                    template=self.weights,
                    federation=self.config.federation,
                    run_id=self.spec.run_id,
                    sign=self.config.sign_model,
                )
            self._model_hashes[current.number] = current.model_hash
            self._announce(current)
            log.info(
                "round %d: announced model %s (%d bytes)%s",
                current.number,
                current.model_hash[:12],
                len(current.model_payload),
                "" if current.selected is None else f" to {len(current.selected)} devices",
            )

    def _next_phase(self, current: _Round) -> None:
        elapsed = time.monotonic() - current.phase_started
        current.phase_seconds[current.phase.name] = round(elapsed, 3)
        current.phase_index += 1
        self._enter_phase(current)

    def _model_hash(self, number: int) -> str:
        """The hash of round ``number``'s model (the checkpoint of the round before)."""
        if number not in self._model_hashes:  # an earlier run's round, after a resume
            self._model_hashes[number] = messages.model_hash(
                self._base_of(number),
                number,
                self._task_json,
                federation=self.config.federation,
                run_id=self.spec.run_id,
            )
        return self._model_hashes[number]

    def _base_of(self, number: int) -> dict[str, torch.Tensor]:
        """The model that round ``number``'s devices trained from."""
        if number == self.state.completed_round + 1:
            return self.weights
        if self.current is not None and number == self.current.number:
            return self.weights  # a site that took up the root's round after a gap
        if number not in self._bases:
            self._bases[number] = self.run_dir.checkpoint(number - 1)  # cleared at close
        return self._bases[number]

    def _stale_window(self, current: _Round) -> dict[int, str] | None:
        """Earlier rounds whose updates still count (fedbuff), with their models' hashes."""
        oldest = max(1, current.number - self.strategy.max_staleness)
        if oldest >= current.number:
            return None
        return {r: self._model_hash(r) for r in range(oldest, current.number)}

    def _encode_model(
        self,
        number: int,
        final: bool = False,
        plan: RoundPlan | None = None,
        secure: SecurePlan | None = None,
    ) -> tuple[bytes, str]:
        plan_json = None if plan is None else plan.to_json()
        if secure is not None:
            plan_json = {**plan_json, "secure": secure.to_json()}
        return messages.encode_model(
            self.weights,
            number,
            self.task,
            final=final,
            federation=self.config.federation,
            run_id=self.spec.run_id,
            plan=plan_json,
            sign=self.config.sign_model,
        )

    def _announce(self, current: _Round) -> None:
        """(Re)publish the round's model, retained: after a reconnect, devices that trained
        already re-send their update (counted once), the others start training. Before the
        round's plan is drawn there is nothing new to announce."""
        self._reannounce.clear()
        if current.model_payload is None:
            return
        self.client.publish(self.topics.model, current.model_payload, qos=1, retain=True)
        self.on_event("announce", {"round": current.number})

    def _phase_upstream(self, current: _Round) -> _Round | None:
        """A site: wait for the root's model for this round. The root may be further on (the
        site started late or was away): the site's round takes the root's number, as its
        devices' training seeds do. The root's final model ends the site's run."""
        model = self.config.upstream.model_for(current.number, self.state.completed_round)
        if model is None:
            return current
        if model.final or model.round != current.number:
            if current.accepted:
                log.warning(
                    "round %d: the root moved on to %s; dropping the site's %d updates",
                    current.number,
                    "its end" if model.final else f"round {model.round}",
                    current.accepted,
                )
            current.journal.remove()
            self.weights = model.tensors
            if model.final:
                self._finish(model.round)  # the root's final model goes to the site's devices
                return None
            return self._open_round(model.round)
        self.weights = model.tensors  # the site's devices train the root's model
        self._next_phase(current)
        return current

    def _statuses_settling(self) -> bool:
        """Whether the devices' retained statuses may still be arriving (start-up)."""
        return time.monotonic() - self._loop_started < SELECT_SETTLE

    def _phase_select(self, current: _Round) -> _Round:
        """Client sampling: once enough devices are known to be up, draw the round's sample."""
        available = sorted(d for d, s in self.status.items() if s in AVAILABLE)
        needed = max(self.spec.min_devices, self.strategy.min_selected)
        if self.secure is not None:
            needed = max(needed, MIN_ROSTER)
        waited = time.monotonic() - current.phase_started
        if len(available) < needed or (self._statuses_settling() and waited < SELECT_SETTLE):
            return current
        current.plan = self.strategy.plan(current.number, available, self.task.seed)
        if current.plan.selected is None:  # secure aggregation names every device it sums
            current.plan = RoundPlan(selected=tuple(available), train=current.plan.train)
        save_plan(current.journal.directory, current.plan)
        log.info(
            "round %d: selected %d of %d available devices: %s",
            current.number,
            len(current.selected),
            len(available),
            ", ".join(current.selected),
        )
        self.on_event("selected", {"round": current.number, "devices": list(current.selected)})
        self._next_phase(current)
        return current

    def _process_batch(self, current: _Round, limit: int = 256) -> None:
        """Handle what has arrived, make its fate durable with one commit, then ack it all.

        While more is waiting, the commit's fsync runs in the background and its acks wait
        (``_unacked``) until the next batch has been handled: the disk and the loop work at
        once. Nothing is acked before it is on disk; with nothing waiting, the acks go out
        as soon as it is."""
        batch = self._inbox.take(limit, timeout=0 if self._unacked else 0.1)
        if not batch:
            self._ack_durable()
            return
        handled, deferred = [], []
        for item in batch:
            if self._buffer_full(current) and self.topics.kind_of(item.topic) == "updates":
                deferred.append(item)  # the next buffer's: neither handled nor acked yet
                continue
            self._dispatch(item, current)
            handled.append(item)
        # group commit: one fsync for the whole batch, once the previous batch's is done
        syncing = current.journal.commit_later()
        self._ack_durable()  # the previous batch: on disk before this batch's fsync began
        self._unacked = (syncing, [(i.mid, i.qos) for i in handled if i.qos > 0])
        self._inbox.done(handled)  # written to the OS: the payloads' room is free
        if syncing is None or not len(self._inbox):
            self._ack_durable()  # nothing to do meanwhile: ack as soon as it is on disk
        if deferred:
            self._inbox.put_back(deferred)
            if not handled:  # paused with a full buffer: do not spin on what must wait
                time.sleep(0.05)

    def _ack_durable(self) -> None:
        """Wait for the last commit's fsync, then ack what it made durable (an OSError from
        the disk propagates: nothing is acked)."""
        if self._unacked is None:
            return
        (syncing, acks), self._unacked = self._unacked, None
        if syncing is not None:
            syncing.result()
        for mid, qos in acks:
            self.client.ack(mid, qos)  # only now: its fate is on disk

    def _buffer_full(self, current: _Round) -> bool:
        """FedBuff's round takes the first ``buffer_size`` accepted updates and closes:
        an update handled in the same batch after that waits for the next round."""
        size = self.strategy.buffer_size
        return size is not None and current.phase.name == "train" and current.accepted >= size

    def _dispatch(self, item: Inbound, current: _Round) -> None:
        """Route one message; whatever goes wrong with it costs that message, not the loop."""
        kind = self.topics.kind_of(item.topic)
        try:
            if kind == "updates":
                self._handle_update(item, current)
            elif kind == "secagg":
                self._handle_secure(item, current)
            elif kind == "status":
                self._handle_status(item)
            elif kind == "control":
                self._handle_control(item)
            elif kind == "aggregator":
                self._handle_presence(item)
        except OSError:
            raise  # the disk: nothing we can account for, and acking now would lose it
        except Exception as exc:  # a bug a hostile message found: count it, keep going
            device = self.topics.device_of(item.topic)
            log.exception("error handling a %s message from %s: %r", kind, device, exc)
            self._count_refused(kind or "other", "internal_error")

    def _count_refused(self, kind: str, reason: str) -> None:
        self._refused[f"{kind}:{reason}"] += 1
        self._state_dirty = True

    def _handle_status(self, item: Inbound) -> None:
        device_id = self.topics.device_of(item.topic)
        if device_id is None:
            return
        try:
            parsed = signals.parse_status(item.payload)
            status = parsed.status
        except CodecError as exc:
            log.warning("refused a status message from %s: %s (%s)", device_id, exc.reason, exc)
            self._count_refused("status", exc.reason)
            return
        if device_id not in self.status and len(self.status) >= MAX_TRACKED_DEVICES:
            self._count_refused("status", "too_many_devices")
            return
        self.devices.seen(device_id, time.time())
        if self.devices.reasons.get(device_id, "") != parsed.reason:
            self.devices.reasons[device_id] = parsed.reason  # e.g. "CPU at 81.0 °C, ..."
            self._state_dirty = True
        previous = self.status.get(device_id)
        if previous != status:
            self.status[device_id] = status
            self._state_dirty = True
            if status == "offline":
                self._offline_at[device_id] = time.monotonic()
            if status == "offline" and previous in PRESENT:
                log.info("device %s went offline", device_id)
            self.on_event("device", {"device": device_id, "status": status})

    def _handle_presence(self, item: Inbound) -> None:
        """Another aggregator of this federation got past the start-up check (both started at
        once, say): they would take the session from each other for ever. The younger stops;
        the older says so and re-asserts its presence."""
        try:
            other = signals.parse_presence(item.payload)
        except CodecError:
            return  # only aggregators may write this topic; nothing to count
        alive = signals.running_elsewhere(other, self.presence, time.time(), _pid_alive, HEARTBEAT)
        if not alive:  # ours, offline, or the retained one of a killed predecessor
            return
        where = f"pid {other.pid} on {other.host}"
        if signals.yields_to(self.presence, other) and self._still_retained(other):
            self._superseded = (
                f"another aggregator of federation {self.config.federation!r} ({where}) "
                "started earlier and runs; this one stops"
            )
            self._stop.set()
        else:
            log.warning("a second aggregator (%s) connected; it should stop", where)
            self._publish_presence()

    def _still_retained(self, other: signals.Presence) -> bool:
        """Whether ``other``'s presence is still the retained one: a live message may be a
        late copy from a node of a cluster (broker/retained_mirror.py) that reached this
        session's queue after ``other`` had already left, and said offline."""
        if not self.config.connection.cluster:
            return True
        try:
            found = read_retained(
                self.config.connection,
                [self.topics.aggregator],
                client_prefix=f"fedmq-aggregator-{self.config.federation}-probe",
                timeout=5,
            )
            now = signals.parse_presence(found.get(self.topics.aggregator, b""))
        except (CodecError, FedmqError):
            return True  # cannot tell: yield, as without a cluster
        return now is not None and now.instance == other.instance and now.status == "online"

    def _handle_control(self, item: Inbound) -> None:
        try:
            control = signals.parse_control(item.payload)
        except CodecError as exc:
            log.warning("ignored a control message: %s (%s)", exc.reason, exc)
            self._count_refused("control", exc.reason)
            return
        command = control.command
        why_not = signals.control_is_for(control, self.instance)
        if why_not:
            log.warning("ignored control command %r: %s", command, why_not)
            self._count_refused("control", "not_for_us")
            return
        if command == "pause" and self.phase in ("collecting", "selecting"):
            self.phase = "paused"
        elif command == "resume" and self.phase == "paused":
            self.phase = self.current.phase.state if self.current else "collecting"
        elif command == "stop":
            self._stop.set()
        else:
            log.warning("ignored control command %r in phase %s", command, self.phase)
            return
        log.info("control: %s", command)
        self._state_dirty = True
        self.on_event("control", {"command": command})

    def _handle_update(self, item: Inbound, current: _Round) -> None:
        topic_device = self.topics.device_of(item.topic)
        if topic_device and (topic_device in self.status or len(self.status) < MAX_TRACKED_DEVICES):
            self.devices.seen(topic_device, time.time())
        digest = payload_digest(item.payload)
        if current.journal.seen(digest) or digest in self._previous_digests:
            return  # redelivered or re-sent: already accounted for
        if current.journal.records_of(topic_device) >= MAX_RECORDS_PER_DEVICE:
            if topic_device not in current.flooding:
                current.flooding.add(topic_device)
                log.warning(
                    "round %d: %s sent more than %d distinct updates; ignoring the rest "
                    "of its updates this round",
                    current.number,
                    topic_device,
                    MAX_RECORDS_PER_DEVICE,
                )
            self._count_refused("updates", "flood")
            return
        checked = False  # decoded and signature-checked
        try:
            update = messages.decode_update(
                item.payload,
                schema=self.schema,
                max_payload=self.config.max_payload,
                max_samples=self.config.max_samples,
                compression=self.compressed,
                copy=False,  # only read here; the journal keeps the payload itself
            )
            verdict = rounds.admit(
                topic_device=topic_device or "",
                meta_device=update.device_id,
                update_round=update.round,
                base_hash=update.base_hash,
                current_round=current.number,
                current_hash=current.model_hash,
                accepted_devices=current.journal.accepted_view(),
                binding=(update.federation, update.run_id),
                expected_binding=(self.config.federation, self.spec.run_id),
                selected=current.selected,
                stale_window=self._stale_window(current),
            )
            if verdict.reason != "wrong_device" and self.config.verify_update is not None:
                # before any accounting: an unsigned or forged copy is nobody's report
                self.config.verify_update(update.device_id, update.tensors, update.metadata)
            if verdict.outcome == rounds.ACCEPTED and self.compressed.active:
                # a delta finite on its own may not be on its base: refuse it now, not later
                base = self._base_of(update.round)
                compression.finite(compression.decode(update.tensors, self.compressed, base))
            checked = True
        except CodecError as exc:
            verdict = rounds.Verdict(rounds.REJECTED, exc.reason)
            detail = f" ({exc})"
        else:  # a late one says which round it was for (the audit matches it to its claim)
            detail = (
                f" (trained for round {update.round})" if verdict.outcome == rounds.LATE else ""
            )
        if verdict.outcome == rounds.ACCEPTED:
            current.journal.record_accepted(digest, topic_device, item.payload)
            current.held.add(topic_device, update, len(item.payload))
        else:
            current.journal.record(
                digest,
                topic_device,
                verdict.outcome,
                verdict.reason,
                reports=checked and verdict.reports,
            )
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
                "accepted": current.accepted,
            },
        )

    def _phase_train(self, current: _Round) -> _Round | None:
        """Close the round when the strategy's close rule holds, retry or stop when short."""
        present = self._present()
        if current.selected is not None:
            present &= set(current.selected)
        quorum = self._quorum(current)
        decision = rounds.close_decision(
            accepted=current.accepted,
            min_devices=quorum,
            present=present,
            reporters=current.journal.reporters(),
            elapsed=time.monotonic() - current.phase_started,
            deadline=current.phase.deadline,
            buffer_size=self.strategy.buffer_size,
        )
        resumed = current.replayed and self.strategy.buffer_size is None
        if decision == rounds.CLOSE and resumed and self._statuses_settling():
            return current  # the devices' retained statuses may not be in yet
        if decision == rounds.WAIT:
            return current
        if decision == rounds.SHORT:
            why = ""
            if quorum == self.strategy.min_updates and quorum > self.spec.min_devices:
                why = f" ({self.strategy.describe()} needs {quorum} updates a round)"
            return self._short(
                current,
                f"round {current.number}: {current.accepted} of the {quorum} devices needed"
                f"{why} reported within {current.phase.deadline:g}s",
            )
        try:
            return self._complete(current)
        except strategies.StrategyError as exc:  # e.g. Bulyan with fewer than 4f+3 updates
            self.phase = current.phase.state
            return self._short(current, f"round {current.number}: {exc}")

    # -- secure aggregation (aggregator/secure_round.py) ----------------------------------
    def _handle_secure(self, item: Inbound, current: _Round) -> None:
        """One device's secure-aggregation message: checked, signed, for this session."""
        device = self.topics.device_of(item.topic) or ""
        secure = current.secure
        try:
            if secure is None:
                raise CodecError("no secure round is open", reason="wrong_phase")
            msg = secagg_wire.decode(
                item.payload,
                max_payload=self.config.max_payload,
                length=secure.length,
            )
            if msg.device_id != device:
                raise CodecError("device_id is not the topic's device", reason="wrong_device")
            if self.config.verify_update is not None:
                self.config.verify_update(device, msg.tensors, msg.metadata)
            step = {
                "keys": secure.take_keys,
                "shares": secure.take_shares,
                "reveal": secure.take_reveal,
            }.get(msg.kind)
            if msg.kind == "masked":
                fresh = secure.take_masked(msg, len(item.payload))
            elif step is not None:
                fresh = step(msg)
            else:
                raise CodecError(f"a device may not send {msg.kind}", reason="wrong_phase")
        except CodecError as exc:
            log.warning(
                "round %d: refused a secure message from %s: %s (%s)",
                current.number,
                device,
                exc.reason,
                exc,
            )
            self._count_refused("secagg", exc.reason)
            return
        if fresh:
            self.devices.seen(device, time.time())
            self._state_dirty = True
            self.on_event("secure", {"round": current.number, "device": device, "kind": msg.kind})

    def _secure_close(self, current: _Round, expected: tuple[str, ...], done: set[str]) -> str:
        """WAIT, CLOSE or SHORT for a secure phase: every present expected device reported
        (and the quorum), or the phase's deadline."""
        present = self._present() & set(expected)
        return rounds.close_decision(
            accepted=len(done),
            min_devices=max(self._quorum(current), MIN_ROSTER),
            present=present,
            reporters=done,
            elapsed=time.monotonic() - current.phase_started,
            deadline=current.phase.deadline,
        )

    def _secure_short(self, current: _Round, what: str, have: int) -> _Round:
        needed = max(self._quorum(current), MIN_ROSTER)
        return self._short(
            current,
            f"round {current.number}: secure aggregation: {have} device(s) {what} within "
            f"{current.phase.deadline:g}s, {needed} needed",
        )

    def _secure_step(
        self,
        current: _Round,
        expected: tuple[str, ...],
        done: set[str],
        what: str,
        close: Callable[[SecureRound], None],
    ) -> _Round:
        """A secure phase: wait for the expected devices, retry or stop when short, else
        ``close`` it (publish what the next phase needs) and move on."""
        decision = self._secure_close(current, expected, done)
        if decision == rounds.WAIT:
            return current
        if decision == rounds.SHORT:
            return self._secure_short(current, what, len(done))
        close(current.secure)
        self._next_phase(current)
        return current

    def _phase_keys(self, current: _Round) -> _Round:
        def roster(secure: SecureRound) -> None:
            self.client.publish(self.topics.round, secure.roster_message(), qos=1, retain=True)
            log.info(
                "round %d: secure aggregation roster of %d devices (threshold %d)",
                current.number,
                len(secure.roster),
                secure.threshold,
            )

        secure = current.secure
        return self._secure_step(
            current, secure.selected, set(secure.advertised), "advertised keys", roster
        )

    def _phase_shares(self, current: _Round) -> _Round:
        def deliver(secure: SecureRound) -> None:
            for device, payload in secure.deliveries().items():
                self.client.publish(self.topics.inbox(device), payload, qos=1)

        secure = current.secure
        return self._secure_step(
            current, secure.roster, set(secure.sealed), "shared their keys", deliver
        )

    def _phase_masked(self, current: _Round) -> _Round:
        def ask_to_unmask(secure: SecureRound) -> None:
            self.client.publish(self.topics.round, secure.unmask_message(), qos=1, retain=True)
            log.info(
                "round %d: %d masked inputs summed, %d devices dropped; unmasking",
                current.number,
                len(secure.survivors),
                len(secure.dropped),
            )

        secure = current.secure
        return self._secure_step(
            current, secure.sharers, set(secure.metrics), "sent masked inputs", ask_to_unmask
        )

    def _phase_unmask(self, current: _Round) -> _Round | None:
        secure = current.secure
        if secure.missing():
            waited = time.monotonic() - current.phase_started
            # once every survivor has revealed, no share can still come: short at once
            answered = set(secure.revealed) >= set(secure.survivors)
            if waited < current.phase.deadline and not answered:
                return current
            return self._short(current, f"round {current.number}: {secure.failure()}")
        try:
            return self._complete(current)
        except SecureFailure as exc:  # a bad share no spare could step around
            self.phase = current.phase.state
            return self._short(current, f"round {current.number}: {exc}")

    def _present(self) -> set[str]:
        return rounds.present_devices(
            self.status,
            self._offline_at,
            link_lost_at=self._link_lost_at,
            relinked_at=self._relinked_at,
            now=time.monotonic(),
            grace=RECONNECT_GRACE,
        )

    def _quorum(self, current: _Round) -> int:
        """Accepted updates a round needs: the run's quorum (no more than were selected),
        and at least what the strategy needs (Krum 2f+3, Bulyan 4f+3)."""
        quorum = self.spec.min_devices
        if current.selected is not None:
            quorum = min(quorum, len(current.selected))
        return max(quorum, self.strategy.min_updates)

    def _short(self, current: _Round, message: str) -> _Round:
        """At the deadline without enough updates: stop, or start the round over (a sampled
        round draws its sample again, from the devices up now)."""
        if self.config.on_short == "stop":
            raise FedmqError(message + "; stopping (resume with --resume)")
        log.warning("%s; announcing the round again", message)
        self.on_event("retry", {"round": current.number})
        current.opened = time.monotonic()
        if current.phases[0].name == "select" and current.phase_index > 0:
            current.phase_index, current.plan, current.model_payload = 0, None, None
            current.secure = None
            (current.journal.directory / "plan.json").unlink(missing_ok=True)
            self._enter_phase(current)
        else:
            current.phase_started = time.monotonic()
            self._announce(current)
        return current

    def _complete(self, current: _Round) -> _Round | None:
        self._ack_durable()  # every accepted update acked before the round's result
        self.phase = "aggregating"
        if current.secure is not None:
            result = aggregate_secure(self.strategy, self.weights, current.secure)
        else:
            updates = JournalUpdates(
                current.journal,
                self.weights,
                self._base_of,
                current.number,
                self.compressed,
                held=current.held,
            )
            result = aggregate_round(self.strategy, self.weights, updates)
        self.weights = result.weights
        counts = current.journal.counts()
        totals = self.state.totals
        for outcome, n in counts["outcomes"].items():
            if outcome != rounds.REJECTED:
                totals[outcome] = totals.get(outcome, 0) + n
        rejected = Counter(totals.get("rejected", {}))
        rejected.update(counts["rejected"])
        totals["rejected"] = dict(rejected)
        totals["refused_messages"] = dict(self._refused)
        row = {
            "round": current.number,
            "devices": len(result.devices),
            "contributors": result.devices,
            "samples": result.samples,
            "seconds": round(time.monotonic() - current.opened, 3),
            "update_bytes": (
                current.journal.accepted_bytes()
                if current.secure is None
                else current.secure.masked_bytes
            ),
            "model_bytes": len(current.model_payload or b""),
            "rejected": dict(counts["rejected"]),
            "metrics": result.metrics,
            "strategy": self.strategy.name,
        }
        if current.selected is not None:
            row["selected"] = list(current.selected)
        if result.carried is not None:  # sites' partial results: the devices behind them
            row["devices_behind_partials"] = result.carried
        if current.secure is not None:
            current.phase_seconds["unmask"] = round(time.monotonic() - current.phase_started, 3)
            row["secure_aggregation"] = {
                "roster": len(current.secure.roster),
                "dropped": list(current.secure.dropped),
                "threshold": current.secure.threshold,
                "phase_seconds": current.phase_seconds,
                "unmask_compute_seconds": round(current.secure.unmask_seconds, 3),
            }
        if current.secure is not None and current.secure.plan.noise > 0:
            row["secure_aggregation"]["noise_multiplier"] = self.strategy.note_secure_round(
                current.number, len(current.secure.survivors), len(current.secure.selected)
            )
        privacy = getattr(self.strategy, "privacy_report", None)  # (epsilon, delta) so far
        if privacy is not None:
            row["privacy"] = privacy(current.number)
        chosen = getattr(self.strategy, "last_selected", None)  # Krum's pick, say
        if chosen is not None:
            row["chosen"] = list(chosen)
        if self.config.upstream is not None:
            # one partial result for the root's round, saved and sent before the checkpoint:
            # a crash before it replays the journal into the same result, sent again (the
            # root counts a site's second update of a round as a duplicate)
            row["partial_bytes"] = self.config.upstream.forward(
                current.number,
                result.weights,
                samples=result.samples,
                devices=len(result.devices),
                metrics=result.metrics,
            )
        device_rows = [{"round": current.number, **r} for r in result.device_rows]
        self.devices.accepted(device_rows)
        self.run_dir.commit(
            self.state,
            current.number,
            self.weights,
            row,
            device_rows,
            strategy_state=self.strategy.state(),
        )
        self._previous_digests = {
            e["digest"] for e in current.journal.entries if e["outcome"] == rounds.ACCEPTED
        }
        self._last_metrics = row
        self._bases.clear()
        log.info(
            "round %d: aggregated %d updates (%s)",
            current.number,
            len(result.devices),
            self.strategy.name,
        )
        self.on_event("round_done", row)
        if self.config.stop_after is not None and current.number >= self.config.stop_after:
            current.journal.remove()
            self._stop.set()
            return current
        following = self._open_round(current.number + 1)
        # the committed round's journal is no longer needed: removed once the next model is
        # out, in the background (a crash before it is gone leaves a directory nothing reads)
        self._removing = current.journal.remove_later()
        return following

    def _finish(self, number: int | None = None) -> None:
        """Publish the final model (round one past the last: ``number`` at a site, the
        root's own final round)."""
        payload, _ = self._encode_model(number or self.spec.rounds + 1, final=True)
        self.phase = "done"
        if not self._publish(self.topics.model, payload, self.config.final_publish_timeout):
            log.error(
                "could not publish the final model within %gs (broker unreachable); it is in %s",
                self.config.final_publish_timeout,
                self.run_dir.checkpoint_path(self.spec.rounds),
            )
        self.on_event("done", {"rounds": self.spec.rounds})  # plots: in _leave, after the state

    def _publish(self, topic: str, payload: bytes, timeout: float) -> bool:
        """Publish retained and wait for the broker's ack, across reconnects; never raises."""
        deadline = time.monotonic() + timeout
        warned = False
        while time.monotonic() < deadline and self._watch.fatal is None:
            if not self._connected.wait(timeout=1.0):
                if not warned:
                    log.warning("broker unreachable; waiting to publish %s", topic)
                    warned = True
                continue
            info = self.client.publish(topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, min(10.0, deadline - time.monotonic())))
            except (RuntimeError, ValueError):  # the link dropped under us: try again
                continue
            if info.is_published():
                return True
        return False

    def _plot(self) -> None:
        try:
            from aggregator.run_plots import plot_run

            if self.run_dir.metrics():  # metrics.png, devices.png, bytes.png
                plot_run(self.run_dir.path)
        except FedmqError as exc:
            log.warning("no plot: %s", exc)

    # -- presence and state topics -------------------------------------------------------
    def _publish_presence(self) -> None:
        self._last_heartbeat = time.monotonic()
        payload = self.presence.encode(heartbeat=time.time())
        self.client.publish(self.topics.aggregator, payload, qos=1, retain=True)

    def _heartbeat(self) -> None:
        if self._connected.is_set() and time.monotonic() - self._last_heartbeat >= HEARTBEAT:
            self._publish_presence()
            self._state_dirty = True

    def state_snapshot(self) -> dict:
        """Run totals so far, the round in progress included."""
        totals = {
            k: v for k, v in self.state.totals.items() if k not in ("rejected", "refused_messages")
        }
        rejected = Counter(self.state.totals.get("rejected", {}))
        if self.current is not None and self.phase != "done":
            counts = self.current.journal.counts()
            for outcome, n in counts["outcomes"].items():
                if outcome != rounds.REJECTED:
                    totals[outcome] = totals.get(outcome, 0) + n
            rejected.update(counts["rejected"])
        totals["rejected"] = dict(rejected)
        totals["rejected_total"] = sum(rejected.values())
        totals["refused_messages"] = dict(self._refused)
        online = sorted(d for d, s in self.status.items() if s in PRESENT)
        table, unlisted = self.devices.table()  # the most recently seen; bounded
        return {
            "federation": self.config.federation,
            "run_id": self.spec.run_id,
            "instance": self.instance,
            "round": self.state.completed_round + (0 if self.phase == "done" else 1),
            # a site follows its root's rounds, however many they are
            "rounds": self.spec.rounds if self.config.upstream is None else None,
            "upstream": None if self.config.upstream is None else self.config.upstream.describe(),
            "completed_rounds": self.state.completed_round,
            "phase": self.phase,
            "strategy": self.strategy.name,
            "round_phase": self.current.phase.name if self.current is not None else None,
            "selected": None if self.current is None else self.current.selected,
            "min_devices": self.spec.min_devices,
            "devices": {
                "seen": len(self.status),
                "online_count": len(online),
                "online": online[:STATE_DEVICE_ROWS],  # bounded, like the table
                "table": table,
                "unlisted": unlisted,
            },
            "round_progress": {
                "accepted": self.current.accepted if self.current is not None else 0,
                "reported": len(self.current.journal.reporters()) if self.current else 0,
                "quorum": self._quorum(self.current) if self.current is not None else None,
            },
            "totals": totals,
            "last_metrics": self._last_metrics,
            "privacy": self._last_metrics.get("privacy"),
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
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                log.warning("could not publish the final state (broker unreachable)")
        self._last_state_pub = now
        self._state_dirty = False


def inbox_budget(limit: int, model_bytes: int) -> int:
    """Payload bytes the inbox may hold: about one model, at least INBOX_FLOOR, at most
    ``limit``. The messages the loop is handling count against it too, and the network
    thread holds one more message (twice, in paho's buffers) while it waits for room, so
    updates in memory stay near three models; the rest wait at the broker (TCP pushes
    back), not in this process."""
    return min(limit, max(INBOX_FLOOR, model_bytes))


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def initial_weights(
    task: TaskSpec, architectures: zoo.Registry | None = None
) -> dict[str, torch.Tensor]:
    model = zoo.build_model(task.model, seed=task.seed, registry=architectures)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _says_offline(status: bytes) -> bool:
    try:
        return signals.parse_status(status).status == "offline"
    except CodecError:
        return False
