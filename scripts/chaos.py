"""Chaos: train a federation while killing and restarting its parts at random moments.

    python scripts/chaos.py [--devices 4] [--rounds 6] [--faults 8] [--seed 0]

Every part is a real process on a real mosquitto. Faults are seeded and land
mid-round (checked, not hoped for): SIGKILL of the aggregator (restarted with
--resume), SIGKILL of an agent (restarted), a clean broker restart (SIGTERM) and
a broker SIGKILL (restarted); each kind comes up once in every four faults. A
fault strikes either as soon as its round is open or once the round has
journaled an update; the script checks that the process it hit was alive and
the run not finished, or exits 1.

Rounds need only ``--min-devices`` (default: all but one) and close at the
``--deadline``, so an update that went missing would *not* block its round: it
would show. At the end the run is audited against an independent record
(``fedmq/audit.py``): what each agent process says in its own log that it
published, against each round's contributors in ``metrics.jsonl``; lost and
double-counted updates are counted there, not taken from the aggregator's
figures. The audit proves it can see a loss by hiding one aggregated update
from a copy of the record. Last, the final model is compared with a fault-free
replay of the same rounds (each contributor's deterministic local training,
FedAvg in device order): it must be bit-identical. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aggregator.checkpoint import RunDir
from fedmq.audit import (
    audit,
    claims_in_log,
    late_in_log,
    read_jsonl,
    replay,
    unprocessed_updates,
)
from fedmq.local import AGGREGATOR, LocalFederation
from fedmq.synthetic import blobs_task, write_blobs

FAULTS = ("kill_aggregator", "kill_agent", "restart_broker", "kill_broker")
MOMENTS = ("round open", "update in")
WAIT = 120.0  # seconds to wait for a round to reach the moment of its fault


def completed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_round"]
    except (OSError, ValueError, KeyError):
        return 0


def accepted_in(run_dir: Path, round_: int) -> int:
    """Updates round ``round_``'s journal has accepted so far (0 once the round is closed)."""
    path = run_dir / "rounds" / f"{round_:06d}" / "journal.jsonl"
    try:
        return path.read_text().count('"outcome": "accepted"')
    except OSError:
        return 0


def uneven_data(work: Path, devices: list[str], samples: int, seed: int) -> dict[str, Path]:
    """Blobs data; the last device holds 4x the samples of the others, so it trains last
    and a round stays open for a while with some of its updates in."""
    files = write_blobs(work / "data", devices, samples=4 * samples, seed=seed)
    for device in devices[:-1]:
        lines = files[device].read_text().splitlines(keepends=True)
        files[device].write_text("".join(lines[: samples + 1]))
    return files


class Chaos:
    def __init__(self, work, devices, files, task, args, rng, console) -> None:
        self.work, self.devices, self.files, self.task = work, devices, files, task
        self.args, self.rng, self.console = args, rng, console
        self.run_dir, self.logs = work / "run", work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.agent_logs: dict[str, list[Path]] = {d: [] for d in devices}
        self.died = []  # last claim of each SIGKILLed agent process
        self.injected: list[tuple] = []
        self.unprocessed: list[tuple[int, str]] = []

    def claims(self) -> list:
        return [
            c
            for d, paths in self.agent_logs.items()
            for p in paths
            for c in claims_in_log(d, p.read_text())
        ]

    def late(self) -> list[tuple[int, str]]:
        """(round it arrived in, device) of updates that came after their round closed."""
        return late_in_log((self.logs / "aggregator.log").read_text())

    def audit(self, rows: list[dict]):
        return audit(
            self.claims(),
            rows,
            read_jsonl(self.run_dir / "devices.jsonl"),
            late=self.late(),
            unprocessed=self.unprocessed,
            died=self.died,
        )

    def spawn_aggregator(self, fed, resume: bool):
        args = ["--run-dir", str(self.run_dir), "--deadline", str(self.args.deadline)]
        if self.args.no_plot:
            args.append("--no-plot")
        if resume:
            args.append("--resume")
        else:
            args += ["--task", str(self.task), "--rounds", str(self.args.rounds)]
            args += ["--min-devices", str(self.args.min_devices)]
        return fed.spawn_aggregator(*args, log=self.logs / "aggregator.log")

    def spawn_agent(self, fed, device: str):
        log = self.logs / f"{device}-{len(self.agent_logs[device]) + 1}.log"
        self.agent_logs[device].append(log)
        return fed.spawn_agent(device, self.files[device], "--exit-when-done", log=log)

    def wait_for_moment(self, aggregator, target: int, moment: str) -> bool:
        """Until round ``target`` (or a later one, if it is past) is at ``moment``."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and aggregator.poll() is None:
            done = completed(self.run_dir)
            if done >= self.args.rounds:
                return False
            if not (self.run_dir / "state.json").exists():
                time.sleep(0.005)  # the aggregator has not created its run yet: no round
                continue
            if done + 1 >= target and (
                moment == "round open" or accepted_in(self.run_dir, done + 1)
            ):
                return True
            time.sleep(0.005)
        return False

    def run(self) -> tuple[dict, float]:
        kinds = [FAULTS[i % len(FAULTS)] for i in range(self.args.faults)]
        self.rng.shuffle(kinds)
        # spread over the rounds; the kind, moment, delay and agent hit are random
        targets = [1 + i * self.args.rounds // len(kinds) for i in range(len(kinds))]
        started = time.monotonic()
        with LocalFederation.create(self.work / "broker", "chaos", self.devices) as fed:
            aggregator = self.spawn_aggregator(fed, resume=False)
            agents = {d: self.spawn_agent(fed, d) for d in self.devices}
            for n, (fault, target) in enumerate(zip(kinds, targets), start=1):
                moment = self.rng.choice(MOMENTS)
                if not self.wait_for_moment(aggregator, target, moment):
                    self.console.print(f"fault {n}: {fault} NOT injected: the run had finished")
                    break
                time.sleep(self.rng.uniform(0.0, 0.05))
                at_round = completed(self.run_dir) + 1
                if at_round > self.args.rounds:
                    self.console.print(f"fault {n}: {fault} NOT injected: the run had finished")
                    break
                updates_in = accepted_in(self.run_dir, at_round)
                target_device = ""
                if fault == "kill_aggregator":
                    aggregator.send_signal(signal.SIGKILL)
                    hit = aggregator.wait() == -signal.SIGKILL  # not: it had exited by itself
                    aggregator = self.spawn_aggregator(fed, resume=True)
                elif fault == "kill_agent":
                    target_device = self.rng.choice(self.devices)
                    agents[target_device].send_signal(signal.SIGKILL)
                    hit = agents[target_device].wait() == -signal.SIGKILL
                    last = claims_in_log(
                        target_device, self.agent_logs[target_device][-1].read_text()
                    )
                    self.died += last[-1:]
                    agents[target_device] = self.spawn_agent(fed, target_device)
                    hit = hit and aggregator.poll() is None
                elif fault == "restart_broker":
                    hit = fed.broker.proc.poll() is None and aggregator.poll() is None
                    fed.restart_broker()
                else:
                    fed.broker.proc.send_signal(signal.SIGKILL)
                    hit = fed.broker.proc.wait() == -signal.SIGKILL and aggregator.poll() is None
                    fed.home.pid_path.unlink(missing_ok=True)
                    fed.start_broker()
                # mid-round: the round it struck had not closed when the fault was in
                hit = hit and at_round <= self.args.rounds
                self.injected.append((n, fault, target_device, at_round, moment, updates_in, hit))
                self.console.print(
                    f"fault {n}: {fault} {target_device} in round {at_round} "
                    f"({moment}, {updates_in} update(s) in){'' if hit else ': MISSED'}"
                )
            code = aggregator.wait(timeout=600)
            if code != 0:
                self.console.print((self.logs / "aggregator.log").read_text()[-3000:])
                raise SystemExit(f"aggregator exited with {code}")
            for proc in agents.values():
                proc.wait(timeout=60)
            # what the aggregator left unprocessed arrived after its round closed
            self.unprocessed = unprocessed_updates(fed.settings(AGGREGATOR), fed.name)
        return RunDir(self.run_dir).load()[2], time.monotonic() - started


def self_check(chaos: Chaos, rows: list[dict]) -> bool:
    """The audit sees a loss: the record with one aggregated update hidden has one more."""
    # the victim must have no other explanation on record: an update the aggregator also
    # called late, still had queued, or that died with its agent would be excused instead
    explained = (
        set(chaos.late()) | set(chaos.unprocessed) | {(c.round, c.device) for c in chaos.died}
    )
    hidden = copy.deepcopy(rows)
    row, device = next(
        (r, d) for r in hidden for d in r["contributors"] if (r["round"], d) not in explained
    )
    row["contributors"] = [d for d in row["contributors"] if d != device]
    row["devices"] = len(row["contributors"])
    return len(chaos.audit(hidden).lost) == len(chaos.audit(rows).lost) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples",
        type=int,
        default=2000,
        help="samples per device, 4x for the last one (more: longer rounds)",
    )
    parser.add_argument(
        "--min-devices", type=int, help="quorum of a round (default: all devices but one)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=20.0,
        help="seconds a round waits for present devices before closing with its quorum",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and run dirs here")
    parser.add_argument(
        "--no-plot", action="store_true", help="the aggregator draws no plots when it ends"
    )
    args = parser.parse_args()
    args.min_devices = args.min_devices or max(1, args.devices - 1)
    console = Console(soft_wrap=True)  # the summary stays one line in logs and pipes
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-chaos-"))
    devices = [f"dev{i}" for i in range(1, args.devices + 1)]
    files = uneven_data(work, devices, args.samples, args.seed)
    task = blobs_task(work)

    chaos = Chaos(work, devices, files, task, args, random.Random(args.seed), console)
    got, seconds = chaos.run()
    rows = read_jsonl(work / "run" / "metrics.jsonl")
    result = chaos.audit(rows)
    expected = replay(task, files, rows)
    identical = set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    checked = self_check(chaos, rows)

    table = Table(title=f"chaos: {args.devices} devices, {args.rounds} rounds, seed {args.seed}")
    for col in ("#", "fault", "target", "round", "moment", "updates in", "mid-round"):
        table.add_column(col)
    for n, fault, target, at_round, moment, updates_in, hit in chaos.injected:
        table.add_row(str(n), fault, target, str(at_round), moment, str(updates_in), str(hit))
    console.print(table)
    missed = [i for i in chaos.injected if not i[-1]]
    console.print(f"audit self-check (one aggregated update hidden -> one more lost): {checked}")
    console.print(
        f"faults injected {len(chaos.injected)} ({len(missed)} missed their round); "
        f"rounds completed {len(rows)}/{args.rounds} (quorum {args.min_devices}, "
        f"deadline {args.deadline:g}s); contributors per round "
        f"{[len(r['contributors']) for r in rows]}; {result.summary()}; "
        f"final model {'IDENTICAL to' if identical else 'DIFFERENT from'} the fault-free "
        f"replay of those rounds; {seconds:.0f}s; logs in {work}"
    )
    for name in ("lost", "double", "unclaimed", "late", "died"):
        if getattr(result, name):
            console.print(f"{name}: {getattr(result, name)}")
    ok = (
        identical
        and result.ok
        and checked
        and not missed
        and len(chaos.injected) == args.faults
        and len(rows) == args.rounds
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
