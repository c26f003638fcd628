"""``fedmq simulate``: a fleet of virtual devices against a running broker and aggregator."""

from __future__ import annotations

from pathlib import Path

import click

from fedmq.cli_common import fedmq_errors


@click.command(short_help="Run thousands of virtual devices (each a real MQTT client).")
@click.option(
    "--home",
    "home_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FEDMQ_BROKER_HOME",
    default=Path("fedmq-broker"),
    show_default=True,
    help="Broker home whose device accounts the virtual devices use. [env FEDMQ_BROKER_HOME]",
)
@click.option(
    "--devices",
    "count",
    type=click.IntRange(min=1),
    help="How many devices: the first N (in id order) of the home's devices named PREFIX*. "
    "[default: all of them]",
)
@click.option("--prefix", default="", help="Only devices whose id starts with this.")
@click.option(
    "--provision",
    is_flag=True,
    help="First add the missing devices PREFIX00000 ... to the home in one pass (needs "
    "--devices and --prefix) and reload the broker.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Worker processes; each drives its share of devices from one event loop.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=300,
    show_default=True,
    help="New connections per second, all workers together (0: as fast as possible).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    help="Leave after answering this many rounds. [default: follow rounds until the "
    "aggregator publishes its final model]",
)
@click.option(
    "--broker",
    help="HOST:PORT to dial instead of the address in the credentials files.",
)
@click.option(
    "--subscribe-state",
    is_flag=True,
    help="Also subscribe to the aggregator's state topic, as agents did before: the "
    "broker copies every state update (up to 4 a second) to every device. To measure "
    "what that costs.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    help="Give up after this many seconds (exit code 1).",
)
@fedmq_errors
def simulate(
    home_dir,
    count,
    prefix,
    provision,
    processes,
    rate,
    rounds,
    broker,
    subscribe_state,
    timeout,
) -> None:
    """Connect many light virtual devices to the federation's broker and take part in
    its rounds like agents do, without training.

    \b
    Each device is a real MQTT client with its own account, password and TLS
    (from its credentials file in the broker home), a persistent session and an
    `offline` last will. It checks the aggregator's signature on every model,
    answers each announced round with one update signed by its own key, and
    leaves at the final model (or after --rounds). Its update is the announced
    model plus a fixed pseudorandom delta of its own, so the exact FedAvg of a
    round is known (fedmq.secagg_fleet.expected_fedavg; a device's index is
    its place in id order). Devices are spread over --processes workers, each
    driving thousands of clients from one event loop, and connect at --rate
    per second.

    \b
    Example, 10,000 devices:
      fedmq broker init ./home --federation sim
      fedmq broker add-devices --prefix sim --count 10000 --home ./home
      fedmq broker up --home ./home &
      fedmq aggregator start --config ./home/credentials/fedmq-aggregator.toml \\
          --task task.toml --rounds 2 --min-devices 10000 --run-dir runs/sim &
      fedmq simulate --home ./home --devices 10000 --processes 4
    """
    from broker.errors import ConfigError
    from broker.home import BrokerHome
    from fedmq import simulate as sim

    home = BrokerHome(home_dir)
    if provision:
        if not (count and prefix):
            raise ConfigError("--provision needs --devices N and --prefix NAME")
        added, seconds = sim.provision(home, count, prefix)
        click.echo(f"provisioned {added:,} devices in {seconds:.1f} s")
    devices = sim.fleet(home, count, prefix)
    click.echo(
        f"simulating {len(devices):,} devices of federation {home.federation!r} in "
        f"{min(processes, len(devices))} processes, connecting at "
        f"{'full speed' if not rate else f'{rate:g}/s'}"
    )
    with _Progress(len(devices)) as progress:
        report = sim.run(
            devices,
            processes=processes,
            rate=rate,
            rounds=rounds,
            broker=broker,
            timeout=timeout,
            subscribe_state=subscribe_state,
            on_tally=progress.update,
        )
    for line in summary(report):
        click.echo(line)
    if report.interrupted:
        raise SystemExit(130)
    if not report.complete:
        first = report.errors[0] if report.errors else "not every device finished"
        more = f" (and {len(report.errors) - 1} more errors)" if len(report.errors) > 1 else ""
        raise click.ClickException(f"{first}{more}")


def summary(report) -> list[str]:
    t = report.totals
    rate = report.connections_per_second
    lines = [
        f"devices: {report.devices:,}; connected {t.get('ever_connected', 0):,} "
        + (f"in {report.connect_seconds:.1f} s ({rate:.0f}/s)" if rate else "")
        + f"; reconnects {t.get('reconnects', 0):,}",
        f"updates: {t.get('published', 0):,} sent, {t.get('acked', 0):,} acknowledged; "
        f"rounds answered {t.get('rounds', {})}; finished {t.get('finished', 0):,}",
    ]
    models, acks = t.get("model_times", {}), t.get("ack_times", {})
    for r in sorted(models):
        if r not in acks:
            continue  # the final model's round: nothing to answer
        first, last = models[r]
        line = f"round {r}: model reached the devices over {last - first:.1f} s"
        if r in acks:
            line += f", updates acknowledged by the broker until +{acks[r][1] - first:.1f} s"
        lines.append(line)
    for w in report.workers:
        if "cpu_seconds" in w:
            lines.append(
                f"worker {w['worker']}: {len(w['first_connack']):,} devices, "
                f"{w['cpu_seconds']:.1f} s CPU, peak {w['peak_rss_mb']:.0f} MB"
            )
    if t.get("state_messages"):
        lines.append(
            f"state messages received: {t['state_messages']:,} ({t['state_bytes'] / 2**20:.1f} MiB)"
        )
    if t.get("retried"):
        notes = [n for w in report.workers for n in w.get("tally", {}).get("retry_notes", [])]
        lines.append(f"dials retried: {t['retried']:,} (first: {notes[0] if notes else '?'})")
    if t.get("models_refused"):
        lines.append(f"models refused: {t['models_refused']:,}")
    lines.append(f"took {report.seconds:.1f} s; errors: {t.get('error_count', 0):,}")
    return lines


class _Progress:
    """A rich live view of the fleet: connected, online, updates sent and acknowledged."""

    def __init__(self, devices: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.fields[label]:<10}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        self.connected = self.progress.add_task("", total=devices, label="connected")
        self.acked = self.progress.add_task("", total=devices, label="updates")

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, totals: dict) -> None:
        rounds = totals.get("rounds") or {}
        latest = max(rounds) if rounds else None
        self.progress.update(
            self.connected,
            completed=totals.get("ever_connected", 0),
            description=f"{totals.get('connected', 0):,} now, {totals.get('online', 0):,} "
            f"online, {totals.get('reconnects', 0):,} reconnects",
        )
        self.progress.update(
            self.acked,
            completed=rounds.get(latest, 0) if latest else 0,
            description=(
                f"round {latest}: {totals.get('acked', 0):,} acked in all, "
                f"{totals.get('finished', 0):,} devices finished"
                if latest
                else "waiting for the aggregator's model"
            ),
        )
