"""The aggregator's serial work, measured in-process: no broker, no network, no waiting.

An ``Aggregator`` is built as ``fedmq aggregator start`` builds it (signing key, device-key
directory, a run directory on disk), but its MQTT client never connects: acks and
publications are counted, not sent. Signed updates are put in its inbox as the network
thread would, and the clock runs only over what its loop does with them:

- ``per_update``: ``_process_batch`` (decode with hash check, admission, signature check,
  journal with group commit, ack) plus the loop's close check, per update;
- ``per_round``: closing a round (aggregate, checkpoint, metrics, state, next model),
  split into its parts.

Used by ``scripts/bench/costs.py`` and ``scripts/bench/ingest.py``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from aggregator import service
from aggregator.inbox import Inbound
from aggregator.service import Aggregator, AggregatorConfig
from broker import codec, messages, signing
from broker.connection import ConnectionSettings
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.signing_hooks import aggregator_hooks
from fedmq.synthetic import mlp_task

FEDERATION = "bench"


# the workload: MLP 64-64-10, 4,810 parameters (about 19 KB an update)
class Bench:
    """An unconnected aggregator and ``devices`` signing keys."""

    def __init__(self, work: Path, devices: int, hidden: int = 64, rounds: int = 1000):
        self.work = work
        keys = work / "device-keys"
        keys.mkdir(parents=True, exist_ok=True)
        (work / "private").mkdir(exist_ok=True)
        self.devices = [f"d{i:05d}" for i in range(devices)]
        self.keys = {
            d: signing.generate_keypair(work / "private" / f"{d}.key", keys / f"{d}.pub")
            for d in self.devices
        }
        signing.generate_keypair(work / "aggregator.key", work / "aggregator.pub")
        sign_model, verify_update = aggregator_hooks(work / "aggregator.key", keys)
        task_path = work / "task.toml"
        task_path.write_text(mlp_task([hidden], out_features=10, batch_size=16, lr=0.1))
        self.topics = Topics(FEDERATION)
        self.acked: list[int] = []
        self.agg = Aggregator(
            AggregatorConfig(
                connection=ConnectionSettings(port=1),  # never connected
                federation=FEDERATION,
                run_dir=work / "run",
                task=TaskSpec.load(task_path),
                rounds=rounds,
                min_devices=devices,
                deadline=None,
                sign_model=sign_model,
                verify_update=verify_update,
                plot=False,
            )
        )
        self.agg.client.ack = lambda mid, qos: self.acked.append(mid)
        self.agg.client.publish = lambda *args, **kwargs: None
        self.agg._loop_started = time.monotonic()
        for d in self.devices:  # every device up, as in a real round
            self.agg.status[d] = "online"
        self.current = self.agg._open_round(1)
        self._mid = 0

    def model(self) -> messages.ModelMessage:
        return messages.decode_model(self.current.model_payload)

    def update(self, model: messages.ModelMessage, device: str, scale: float) -> Inbound:
        tensors = {
            k: (v + scale) if v.is_floating_point() else v.clone() for k, v in model.tensors.items()
        }
        meta = messages.update_metadata(
            round_=model.round,
            device_id=device,
            num_samples=10,
            base_hash=model.model_hash,
            metrics={"train_loss": scale},
            federation=model.federation,
            run_id=model.run_id,
        )
        meta["signature"] = signing.sign(self.keys[device], tensors, meta)
        self._mid += 1
        return Inbound(self.topics.update(device), codec.encode(tensors, meta), self._mid, 1)

    def feed(self, items: list[Inbound], batch: int) -> float:
        """Seconds the loop spends on ``items`` arriving ``batch`` at a time: the batch's
        processing (its one commit and its acks) and the loop's close check after it."""
        spent = 0.0
        agg, current = self.agg, self.current
        for start in range(0, len(items), batch):
            for item in items[start : start + batch]:
                agg._inbox.put(item, lambda: False)
            t0 = time.perf_counter()
            agg._process_batch(current)
            self.current = agg._phase_train(current) or current
            spent += time.perf_counter() - t0
        return spent


def per_update(work: Path, updates: int, batch: int, hidden: int = 64, warm: bool = True) -> dict:
    """ms of serial work per small update, ``updates`` of them arriving ``batch`` at a time,
    in a round after the first (``warm``) or in the first."""
    bench = Bench(work, updates + 1, hidden)  # one device never reports: the round stays open
    if warm:  # a first round, untimed: a steady round's devices have been heard from before
        model = bench.model()
        bench.feed([bench.update(model, d, 0.0) for d in bench.devices[:-1]], 64)
        bench.current = bench.agg._complete(bench.current)
        bench.acked.clear()
        if bench.agg._removing is not None:  # the first round's journal, deleted in the
            bench.agg._removing.result()  # background: not this measurement's work
    model = bench.model()
    items = [bench.update(model, d, 0.001 * (i % 7)) for i, d in enumerate(bench.devices[:-1])]
    seconds = bench.feed(items, batch)
    accepted = bench.current.accepted
    assert accepted == updates and len(bench.acked) == updates, (accepted, len(bench.acked))
    return {
        "updates": updates,
        "batch": batch,
        "round": 2 if warm else 1,
        "update_bytes": len(items[0].payload),
        "ms_per_update": 1000 * seconds / updates,
    }


def per_round(work: Path, devices: int, rounds: int, hidden: int = 64) -> dict:
    """Median ms to close a round of ``devices`` small updates, and its parts."""
    bench = Bench(work, devices, hidden, rounds=rounds + 1)
    agg = bench.agg
    parts: dict[str, list[float]] = {"aggregate": [], "persist": [], "next_model": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name].append(time.perf_counter() - t0)

        return wrapper

    real_aggregate = service.aggregate_round
    service.aggregate_round = timed("aggregate", real_aggregate)
    agg.run_dir.commit = timed("persist", agg.run_dir.commit)
    agg._open_round = timed("next_model", agg._open_round)
    totals = []
    try:
        for r in range(rounds):
            model = bench.model()
            items = [bench.update(model, d, 0.001 * (i % 7)) for i, d in enumerate(bench.devices)]
            current = bench.current
            for item in items:
                agg._inbox.put(item, lambda: False)
            agg._process_batch(current)
            assert current.accepted == devices, current.accepted
            t0 = time.perf_counter()
            bench.current = agg._phase_train(current)
            totals.append(time.perf_counter() - t0)
            assert bench.current.number == r + 2
    finally:
        service.aggregate_round = real_aggregate
    result = {"devices": devices, "rounds": rounds, "ms_close": _median_ms(totals)}
    for name, values in parts.items():
        result[f"ms_{name}"] = _median_ms(values)
    result["ms_rest"] = result["ms_close"] - sum(result[f"ms_{n}"] for n in parts)
    return result


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")
