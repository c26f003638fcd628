"""``fedmq demo``: a whole federation on this machine, on real smartwatch data.

1. cut seglearn's watch recordings into one ``.npz`` per device (whole subjects
   per device) and a held-out test set (other subjects; with more devices than
   training subjects, the last 20 % in time of every recording);
2. start a secured mosquitto (passwords, per-device ACL, TLS, signed models and
   updates) on free loopback ports;
3. start one ``fedmq agent run`` process per device and the aggregator, which
   combines the updates with the task's ``[strategy]`` (``--strategy``);
4. show the rounds live, then compare the federated model with the same model
   trained centrally on the pooled data, both on the held-out test set.

With ``--attack`` a fraction of the devices (chosen from the seed) are attackers:
real agent processes with valid keys that train honestly and then send a poisoned
update (``device_agent/attacks.py``), so one sees what each strategy does under attack.

Everything stays in the run directory: data, broker home and log, agent logs,
checkpoints, ``metrics.jsonl`` and ``metrics.png``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aggregator.service import Aggregator
from broker import compression_settings, zoo
from broker.errors import FedmqError
from broker.task import TaskSpec
from fedmq.demo.attacks import AttackPlan
from fedmq.local import LocalFederation
from fedmq.progress import RoundProgress

FEDERATION = "demo"


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    rounds: int
    federated_accuracy: float
    centralized_accuracy: float
    seconds: float
    strategy: str = "fedavg"
    attack: str = "clean"  # or the attack's description
    attackers: tuple[str, ...] = ()
    privacy: dict | None = None  # the last round's (epsilon, delta) report, with DP
    secure: dict | None = None  # the last round's secure aggregation report
    plain_accuracy: float | None = None  # plain FedAvg on the same data, beside DP/secure
    encoding: str = ""  # the [compression]'s label ("": plain float weights)
    bytes_per_update: float = 0.0  # mean over the rounds of metrics.jsonl's update_bytes / devices

    @property
    def gap_points(self) -> float:
        return 100 * (self.centralized_accuracy - self.federated_accuracy)


def run_demo(
    *,
    devices: int,
    rounds: int | None,
    seed: int,
    run_dir: Path | None,
    console: Console | None = None,
    strategy: dict | None = None,
    privacy: dict | None = None,
    attack: AttackPlan | None = None,
    centralized: bool = True,
    secure: dict | None = None,
    compression: dict | None = None,
    plain_beside: bool = True,
    deadline: float = 120,
) -> DemoResult:
    """The whole demo; ``strategy`` is the task's ``[strategy]`` table (None: FedAvg) and
    ``attack`` says which devices (indices) poison their updates, and how.
    ``centralized=False`` skips the centralised baseline (its accuracy is then NaN);
    ``plain_beside=False`` skips plain FedAvg in one process beside DP, secure aggregation
    or compression. ``deadline``: seconds a round waits for every device."""
    from aggregator.strategies import build
    from fedmq.demo import watch_data

    console = console or Console()
    started = time.monotonic()
    # one thread: on small convolutions torch's intra-op threads cost far more than they
    # save (measured: one epoch 2.7 s on one thread, 40 s on two, on a 2-core machine)
    torch.set_num_threads(1)
    rounds = rounds or watch_data.DEFAULT_ROUNDS
    run_dir = Path(run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    if (run_dir / "run.json").exists():
        raise FedmqError(f"{run_dir} already holds a run: choose another --run-dir")

    built = build(strategy, privacy)  # a bad [strategy] fails before anything starts
    described = built.describe()
    if secure:
        from aggregator.secure_settings import secure_settings
        from broker.secagg.plan import MIN_ROSTER

        secure_settings(secure, built)  # refused with median, Krum, ...: before anything starts
        if devices < MIN_ROSTER:
            raise FedmqError(f"secure aggregation needs at least {MIN_ROSTER} devices")
        described += " with secure aggregation (SecAgg+)"
    with console.status("preparing the watch data set..."):
        data = watch_data.prepare(
            run_dir / "data",
            devices=devices,
            seed=seed,
            strategy=strategy,
            privacy=privacy,
            secure=secure,
            compression=compression,
        )
    names = [f"watch-{k}" for k in range(devices)]
    attackers = tuple(names[k] for k in attack.attackers) if attack else ()
    _show_split(console, data, attackers)
    task = TaskSpec.load(data.task_path)
    console.print(f"strategy: {described} (\\[strategy] in {data.task_path})")
    encoding = compression_settings.parse(task.compression).label
    if encoding:
        console.print(f"compression: devices send their deltas as {encoding} (\\[compression])")
    if attack is not None:
        console.print(
            f"[bold red]attack[/]: {len(attackers)} of {devices} devices "
            f"({', '.join(attackers) or 'none'}) train honestly, then send {attack.describe()}"
            " (delta = trained - global), signed with their valid keys"
        )

    with LocalFederation.create(run_dir / "broker", FEDERATION, names) as fed:
        console.print(
            f"mosquitto on 127.0.0.1:{fed.tls_port} (TLS, one account and ACL per device, "
            "signed models and updates)"
        )
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name, path in zip(names, data.device_files):
            extra = ["--exit-when-done"]
            if name in attackers:
                extra += ["--attack", attack.kind, "--attack-scale", repr(attack.scale)]
            fed.spawn_agent(name, path, *extra, log=logs / f"{name}.log")
        config = fed.aggregator_config(
            run_dir, task, rounds=rounds, min_devices=devices, deadline=deadline, on_short="stop"
        )
        aggregator = Aggregator(config)
        failure = _watch_agents(fed, names, logs, aggregator)
        logging.getLogger("fedmq.aggregator").setLevel(logging.WARNING)  # the progress shows it
        with RoundProgress(aggregator) as progress:
            aggregator.on_event = progress.event
            aggregator.run()
        if failure:
            raise FedmqError(failure[0])
        for proc in fed.procs:
            proc.wait(timeout=30)

    with console.status("training the same model centrally on the pooled data..."):
        X_test, y_test = watch_data.load_npz(data.test_file)
        federated = zoo.build_model(task.model)
        federated.load_state_dict(aggregator.weights)
        fed_acc = watch_data.accuracy(federated, X_test, y_test)
        central_acc = math.nan
        if centralized:
            central = watch_data.train_centralized(task, data.device_files, rounds)
            central_acc = watch_data.accuracy(central, X_test, y_test)

        title = "fedmq demo: 7 shoulder exercises from smartwatch motion"
        if strategy or attack:
            title += f"\n{described}"
        if attack:
            title += f", {len(attackers)} of {devices} devices sending {attack.describe()}"
        _plot_with_held_out(run_dir, task, X_test, y_test, central_acc, title)

    plain = None
    if plain_beside and (
        privacy or secure or compression
    ):  # what it costs: plain FedAvg, same data and rounds
        from fedmq.demo import inprocess

        with console.status("running plain FedAvg on the same data, in one process..."):
            sim = inprocess.Simulation.from_demo(data).with_strategy(strategy)
            plain = inprocess.run(sim, rounds=rounds).final
    rows = aggregator.run_dir.metrics()
    last = (rows or [{}])[-1]
    sizes = [r["update_bytes"] / r["devices"] for r in rows if r.get("devices")]

    result = DemoResult(
        run_dir,
        rounds,
        fed_acc,
        central_acc,
        time.monotonic() - started,
        strategy=described,
        attack="clean" if attack is None else attack.describe(),
        attackers=attackers,
        privacy=last.get("privacy"),
        secure=last.get("secure_aggregation"),
        plain_accuracy=plain,
        encoding=encoding,
        bytes_per_update=sum(sizes) / len(sizes) if sizes else 0.0,
    )
    _show_result(console, result, data)
    return result


def _plot_with_held_out(
    run_dir: Path, task, X_test, y_test, central_acc: float, title: str
) -> None:
    """Redraw metrics.png with each round's global model scored on the held-out people
    (``demo-metrics.jsonl``: metrics.jsonl plus ``test_accuracy``) and the centralized line."""
    from aggregator.checkpoint import RunDir
    from aggregator.plot import plot_metrics
    from broker import codec
    from fedmq.demo import watch_data

    runs = RunDir(run_dir)
    model = zoo.build_model(task.model)
    rows = []
    for row in runs.metrics():
        payload = runs.checkpoint_path(row["round"]).read_bytes()
        model.load_state_dict(codec.decode(payload, max_payload=len(payload)).tensors)
        rows.append({**row, "test_accuracy": watch_data.accuracy(model, X_test, y_test)})
    path = run_dir / "demo-metrics.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    plot_metrics(
        path,
        runs.plot_png,
        title,
        baseline_accuracy=central_acc,
    )


def _watch_agents(fed, names, logs, aggregator) -> list[str]:
    """Stop the aggregator if an agent process dies with an error (and say why)."""
    failure: list[str] = []

    def watch() -> None:
        while aggregator.phase not in ("done", "stopped"):
            for name, proc in zip(names, fed.procs):
                code = proc.poll()
                if code not in (None, 0):
                    tail = (logs / f"{name}.log").read_text(errors="replace").strip()
                    failure.append(f"agent {name} exited with code {code}:\n{tail[-2000:]}")
                    aggregator.stop()
                    return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return failure


def _show_split(console: Console, data, attackers: tuple[str, ...] = ()) -> None:
    what = "whole subjects each"
    if data.test_tail:
        what += f", the first {100 * (1 - data.test_tail):.0f}% in time of their recordings"
    console.print(f"devices: {what} (non-IID)")
    table = Table()
    table.add_column("device")
    table.add_column("subjects")
    table.add_column("windows", justify="right")
    if attackers:
        table.add_column("role")
    for k, (subjects, size) in enumerate(zip(data.device_subjects, data.device_sizes)):
        name = f"watch-{k}"
        role = ["[bold red]ATTACKER[/]" if name in attackers else "honest"] if attackers else []
        table.add_row(name, ", ".join(map(str, subjects)), str(size), *role)
    held_out = "last 20% of every recording" if data.test_tail else ""
    table.add_row(
        "held out",
        held_out or ", ".join(map(str, data.test_subjects)),
        str(data.test_size),
        *([""] if attackers else []),
        style="dim",
    )
    console.print(table)
    if data.test_tail:
        console.print(
            f"test set: {data.held_out}, cut before windowing: it measures later "
            "repetitions by people the model learned from, not new people"
        )


def _show_result(console: Console, result: DemoResult, data) -> None:
    table = Table(title=f"accuracy on {data.held_out}", title_justify="left")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    attack = ""
    if result.attackers:
        attack = f"; {len(result.attackers)} attackers sending {result.attack}"
    table.add_row(
        f"federated ({result.rounds} rounds over MQTT, {result.strategy}{attack})",
        f"{100 * result.federated_accuracy:.1f}%",
    )
    if result.plain_accuracy is not None:
        table.add_row(
            "plain FedAvg (same data and rounds, in one process, no privacy)",
            f"{100 * result.plain_accuracy:.1f}%",
        )
    if not math.isnan(result.centralized_accuracy):
        table.add_row(
            "centralized (pooled data, same epochs)", f"{100 * result.centralized_accuracy:.1f}%"
        )
    console.print(table)
    if result.privacy:
        p = result.privacy
        console.print(
            f"differential privacy: epsilon = {p['epsilon']:.2f} at delta = {p['delta']:g} "
            f"after {p['rounds']} rounds (noise_multiplier {p['noise_multiplier']:g}, "
            f"clip_norm {p['clip_norm']:g}, sampling rate {p['sampling_rate']:g}; RDP accountant)"
        )
    if result.secure:
        s = result.secure
        console.print(
            f"secure aggregation: each round the aggregator saw only the sum of the masked "
            f"inputs ({s['roster']} devices, threshold {s['threshold']}, "
            f"{len(s['dropped'])} dropped in the last round); unmasking took "
            f"{s['unmask_compute_seconds']:.3f}s"
        )
    console.print(
        f"updates: {result.bytes_per_update:,.0f} bytes each on average"
        f" ({result.encoding or 'float32 weights'})"
    )
    console.print(
        f"gap: {result.gap_points:+.1f} points; {result.seconds:.0f}s in all; "
        f"run directory: {result.run_dir} (checkpoints/, metrics.jsonl, metrics.png, logs/)"
    )
