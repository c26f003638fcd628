"""Chaos: train a federation while killing and restarting its parts at random moments.

    python scripts/chaos.py [--devices 4] [--rounds 6] [--faults 8] [--seed 0]

Runs the same task twice on this machine: once without faults (the reference),
once with seeded faults injected at random moments: SIGKILL of the aggregator
(restarted with --resume), SIGKILL of an agent (restarted), a clean broker
restart (SIGTERM) and a broker SIGKILL (restarted). Every part is a real
process on a real mosquitto. At the end it prints the faults and whether the
final global model is bit-identical to the reference, and exits 1 if not.
"""

from __future__ import annotations

import argparse
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
from aggregator.service import Aggregator
from broker.task import TaskSpec
from fedmq.local import LocalFederation
from fedmq.synthetic import blobs_task, write_blobs

FAULTS = ("kill_aggregator", "kill_agent", "restart_broker", "kill_broker")


def reference(work: Path, devices: list[str], files: dict, task: Path, rounds: int) -> dict:
    with LocalFederation.create(work / "ref-broker", "chaos", devices) as fed:
        for d in devices:
            fed.spawn_agent(d, files[d], "--exit-when-done")
        config = fed.aggregator_config(
            work / "ref-run",
            TaskSpec.load(task),
            rounds=rounds,
            min_devices=len(devices),
            deadline=None,
            plot=False,
        )
        agg = Aggregator(config)
        agg.run(timeout=600)
        return agg.weights


def completed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_round"]
    except (OSError, ValueError, KeyError):
        return 0


def chaos_run(
    work: Path,
    devices: list[str],
    files: dict,
    task: Path,
    rounds: int,
    faults: int,
    rng: random.Random,
    console: Console,
) -> tuple[dict, list, float]:
    run_dir, logs = work / "run", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    injected = []
    started = time.monotonic()
    with LocalFederation.create(work / "broker", "chaos", devices) as fed:

        def spawn_aggregator(resume: bool):
            args = ["--run-dir", str(run_dir), "--deadline", "0"]
            if resume:
                args.append("--resume")
            else:
                args += [
                    "--task",
                    str(task),
                    "--rounds",
                    str(rounds),
                    "--min-devices",
                    str(len(devices)),
                ]
            return fed.spawn_aggregator(*args, log=logs / "aggregator.log")

        def spawn_agent(d):
            return fed.spawn_agent(d, files[d], "--exit-when-done", log=logs / f"{d}.log")

        aggregator = spawn_aggregator(resume=False)
        agents = {d: spawn_agent(d) for d in devices}
        # spread the faults over the rounds: each strikes at a random moment of a random round
        targets = sorted(rng.randint(1, rounds) for _ in range(faults))
        for n, target_round in enumerate(targets):
            while completed(run_dir) + 1 < target_round and aggregator.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))  # chaos picks the moment; nothing waits on it
            if aggregator.poll() is not None:
                break
            fault = rng.choice(FAULTS)
            at_round = completed(run_dir) + 1
            target = ""
            if fault == "kill_aggregator":
                aggregator.send_signal(signal.SIGKILL)
                aggregator.wait()
                aggregator = spawn_aggregator(resume=True)
            elif fault == "kill_agent":
                target = rng.choice(devices)
                agents[target].send_signal(signal.SIGKILL)
                agents[target].wait()
                agents[target] = spawn_agent(target)
            elif fault == "restart_broker":
                fed.restart_broker()
            else:
                fed.broker.proc.send_signal(signal.SIGKILL)
                fed.broker.proc.wait()
                fed.home.pid_path.unlink(missing_ok=True)
                fed.start_broker()
            injected.append((n + 1, fault, target, at_round))
            console.print(f"fault {n + 1}: {fault} {target} during round {at_round}")
        code = aggregator.wait(timeout=600)
        if code != 0:
            console.print((logs / "aggregator.log").read_text()[-3000:])
            raise SystemExit(f"aggregator exited with {code}")
    return RunDir(run_dir).load()[2], injected, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples",
        type=int,
        default=4000,
        help="samples per device (more: longer rounds, faults land mid-round)",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and run dirs here")
    args = parser.parse_args()
    console = Console(soft_wrap=True)  # the summary stays one line in logs and pipes
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedmq-chaos-"))
    devices = [f"dev{i}" for i in range(1, args.devices + 1)]
    files = write_blobs(work / "data", devices, samples=args.samples, seed=args.seed)
    task = blobs_task(work)

    with console.status("fault-free reference run..."):
        expected = reference(work, devices, files, task, args.rounds)
    got, injected, seconds = chaos_run(
        work, devices, files, task, args.rounds, args.faults, random.Random(args.seed), console
    )

    table = Table(title=f"chaos: {args.devices} devices, {args.rounds} rounds, seed {args.seed}")
    for col in ("#", "fault", "target", "round"):
        table.add_column(col)
    for n, fault, target, at_round in injected:
        table.add_row(str(n), fault, target, str(at_round))
    console.print(table)
    metrics = RunDir(work / "run").metrics()
    per_round = [m["devices"] for m in metrics]
    identical = set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    lost = sum(args.devices - n for n in per_round if n < args.devices)
    extra = sum(n - args.devices for n in per_round if n > args.devices)
    console.print(
        f"faults injected {len(injected)}; rounds completed {len(metrics)}/{args.rounds}; "
        f"updates per round {per_round}; lost {lost}; double-counted {extra}; "
        f"final model {'IDENTICAL to' if identical else 'DIFFERENT from'} the fault-free run; "
        f"{seconds:.0f}s; logs in {work}"
    )
    return 0 if identical and len(metrics) == args.rounds and not lost and not extra else 1


if __name__ == "__main__":
    sys.exit(main())
