"""Audit a run against an independent record: what each agent says it published.

The aggregator's own figures (``devices`` per round, its journal) cannot show a
lost update: they count what the aggregator received. The agents' logs can:
each ``round N: trained on S samples, loss L, published B bytes`` line is a
device's own statement that it handed an update for round N to the broker, and
nothing the aggregator does can write or erase it. Every such claim for a
round the run completed is then exactly one of

- **aggregated**: the device is among that round's ``contributors``
  (``metrics.jsonl``);
- **late**: not aggregated, and the aggregator refused an update from that
  device as ``late`` in a later round, or the update was still queued for the
  aggregator when the run ended: it arrived after its round had closed, which
  is legitimate once a round may close without a device (the device looked
  offline, or the deadline passed with the quorum);
- **died with its agent**: not aggregated, and it was the last update of an
  agent process that was then SIGKILLed: the agent logs its publish right after
  handing it to its MQTT client, so the bytes may have died with the process;
- **lost**: none of these.

The other direction is checked too: a device aggregated twice in a round (in
``contributors``, in ``devices.jsonl`` or in the ``devices`` count) is
**double-counted**; an aggregated update whose sample count differs from what
its agent logged, or that no agent log claims at all, is **unclaimed**.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

PUBLISHED = re.compile(r"round (\d+): trained on (\d+) samples, loss \S+, published \d+ bytes")
LATE = re.compile(r"round \d+: late update from (\S+) \(trained for round (\d+)\)")

Key = tuple[int, str]  # (round, device)


@dataclass(frozen=True)
class Claim:
    """One ``published`` line of an agent's log."""

    round: int
    device: str
    samples: int


def claims_in_log(device: str, text: str) -> list[Claim]:
    """The updates ``device``'s agent says it published, in the order it logged them."""
    return [Claim(int(m.group(1)), device, int(m.group(2))) for m in PUBLISHED.finditer(text)]


def late_in_log(text: str) -> list[Key]:
    """(round it was trained for, device) of every update the aggregator's log calls late."""
    return [(int(m.group(2)), m.group(1)) for m in LATE.finditer(text)]


@dataclass
class Audit:
    published: list[Key] = field(default_factory=list)  # distinct claims for completed rounds
    aggregated: list[Key] = field(default_factory=list)
    late: list[Key] = field(default_factory=list)
    died: list[Key] = field(default_factory=list)
    lost: list[Key] = field(default_factory=list)
    double: list[Key] = field(default_factory=list)
    unclaimed: list[Key] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double or self.unclaimed)

    def summary(self) -> str:
        return (
            f"published {len(self.published)} (from the agents' logs); "
            f"aggregated {len(self.aggregated)}; late {len(self.late)}; "
            f"died with their agent {len(self.died)}; lost {len(self.lost)}; "
            f"double-counted {len(self.double)}; unclaimed {len(self.unclaimed)}"
        )


def audit(
    claims: Iterable[Claim],
    rows: list[dict],
    device_rows: list[dict] = (),
    *,
    late: Iterable[Key] = (),
    unprocessed: Iterable[Key] = (),
    died: Iterable[Claim] = (),
) -> Audit:
    """Check a run's ``metrics.jsonl`` ``rows`` (and ``devices.jsonl`` ``device_rows``)
    against the agents' ``claims``.

    ``late``: (round it was trained for, device) of each update the aggregator refused
    as late: it accounts for that very claim (a late copy of an update that was
    aggregated, a re-send after a restart, accounts for nothing);
    ``unprocessed``: (round, device) of updates still queued for the aggregator after
    the run (see ``unprocessed_updates``): each accounts for that very claim;
    ``died``: the last claim of each agent process that was SIGKILLed.
    """
    claims = list(claims)
    samples: dict[Key, set[int]] = {}
    for c in claims:
        samples.setdefault((c.round, c.device), set()).add(c.samples)
    result = Audit()
    contributors: dict[int, list[str]] = {}
    for row in rows:
        if "contributors" not in row:
            raise ValueError(f"metrics row of round {row.get('round')} has no 'contributors'")
        contributors[row["round"]] = list(row["contributors"])
        named = Counter(row["contributors"])
        for device, n in sorted(named.items()):
            result.double += [(row["round"], device)] * (n - 1)
        uncounted = row.get("devices", len(row["contributors"])) - len(row["contributors"])
        result.double += [(row["round"], "?")] * max(0, uncounted)  # folded, not even named
    per_device_rows = Counter((r["round"], r["device"]) for r in device_rows)
    for key, n in sorted(per_device_rows.items()):
        result.double += [key] * (n - 1)
        if key[0] in contributors and key[1] not in contributors[key[0]]:
            result.unclaimed.append(key)  # a device row for an update not aggregated
    for r in device_rows:
        key = (r["round"], r["device"])
        if key in samples and r.get("num_samples") not in samples[key]:
            result.unclaimed.append(key)  # aggregated with samples its agent never claimed

    died_keys = {(c.round, c.device) for c in died}
    unaggregated = []
    for key in sorted(samples):
        round_, device = key
        if round_ not in contributors:
            continue  # the run did not complete that round: nothing to say
        result.published.append(key)
        if device in contributors[round_]:
            result.aggregated.append(key)
        else:
            unaggregated.append(key)
    excused = (set(unprocessed) | set(late)) & set(unaggregated)
    for key in unaggregated:
        if key in excused:
            result.late.append(key)
        elif key in died_keys:
            result.died.append(key)
        else:
            result.lost.append(key)
    for round_, devices in sorted(contributors.items()):
        for device in sorted(set(devices)):
            if (round_, device) not in samples:
                result.unclaimed.append((round_, device))
    return result


def read_jsonl(path) -> list[dict]:
    """The rows of a ``.jsonl`` file (none if it does not exist)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audit_run(
    run_dir,
    agent_logs: dict,
    aggregator_log=None,
    *,
    unprocessed: Iterable[Key] = (),
    died: Iterable[Claim] = (),
) -> Audit:
    """Audit ``run_dir`` against the agents' log files (``{device: [paths]}``) and the
    aggregator's log (for the updates it called late)."""
    from pathlib import Path

    claims = [
        claim
        for device, paths in agent_logs.items()
        for path in paths
        for claim in claims_in_log(device, Path(path).read_text())
    ]
    late = late_in_log(Path(aggregator_log).read_text()) if aggregator_log else []
    return audit(
        claims,
        read_jsonl(Path(run_dir) / "metrics.jsonl"),
        read_jsonl(Path(run_dir) / "devices.jsonl"),
        late=late,
        unprocessed=unprocessed,
        died=died,
    )


def replay(task_path, files: dict, rows: list[dict]) -> dict:
    """The fault-free run of these rounds, without MQTT: each round's ``contributors``
    train from the previous global model exactly as an agent does (same code, same
    per-round seed, one thread), and FedAvg folds them in device order."""
    import torch

    from aggregator.fedavg import FoldedSum
    from aggregator.service import initial_weights
    from broker import zoo
    from broker.task import TaskSpec
    from device_agent.data import open_data
    from device_agent.trainer import evaluate, train_local, training_seed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agents fedmq.local spawns (--threads 1)
    try:
        task = TaskSpec.load(task_path)
        weights = initial_weights(task)
        model = zoo.build_model(task.model)
        data = {d: open_data(f).dataset(task.data.label) for d, f in files.items()}
        for row in rows:
            folded = FoldedSum(weights)
            for device in sorted(row["contributors"]):
                model.load_state_dict(weights, strict=True)
                d = data[device]
                evaluate(model, d.X, d.y, task.train, str(d.path))
                seed = training_seed(task.seed, row["round"], device)
                result = train_local(model, d.X, d.y, task.train, seed, str(d.path))
                tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
                folded.fold(tensors, result.num_samples)
            weights = folded.average()
        return weights
    finally:
        torch.set_num_threads(threads)


def unprocessed_updates(settings, federation: str, timeout: float = 10.0) -> list[Key]:
    """(round, device) of every update the broker still holds for the aggregator's
    persistent session once the aggregator has left: each arrived after its round
    closed (the run finished, or the aggregator never took it). Logs in as that
    session, so call it only when no aggregator runs; the messages are consumed."""
    import threading

    import paho.mqtt.client as mqtt

    from broker import messages
    from broker.connection import connect_async, make_client
    from broker.errors import CodecError
    from broker.topics import Topics

    topics = Topics(federation)
    client = make_client(settings, client_id=f"fedmq-aggregator-{federation}", persistent=True)
    found: list[Key] = []
    synced = threading.Event()

    def on_message(c, userdata, msg) -> None:
        if topics.kind_of(msg.topic) != "updates":
            return
        try:
            update = messages.decode_update(msg.payload, max_payload=len(msg.payload))
        except CodecError:
            return
        found.append((update.round, update.device_id))

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        # the session's queued messages come right after CONNACK, before this SUBACK
        c.subscribe([(topics.state, mqtt.SubscribeOptions(qos=1))])

    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = lambda *args: synced.set()
    connect_async(client, settings, persistent=True)
    client.loop_start()
    try:
        if not synced.wait(timeout):
            raise TimeoutError("could not read the aggregator's session")
    finally:
        client.disconnect()
        client.loop_stop()
    return found
