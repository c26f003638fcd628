"""The attack table: what each aggregation strategy does under each attack, on the demo.

    python scripts/attack_table.py                  # real `fedmq demo` runs (slow: ~35 runs)
    python scripts/attack_table.py --inprocess      # the same rounds in one process (minutes)

Every cell is the final held-out accuracy of one run of the smartwatch demo with 10
devices (one person each; the test set is the last 20 % of every recording), a fraction
``--attackers`` of them (chosen from the seed) sending poisoned updates of the column's
kind at its default scale (``device_agent/attacks.py``). Real runs are ``run_demo``: a
secured mosquitto, one ``fedmq agent run`` process per device (attackers included, with
valid keys) and the aggregator with the row's ``[strategy]``; each leaves its run
directory under ``--out``. ``--inprocess`` runs ``fedmq/demo/inprocess.py``: the same
training, poisoning and aggregation math, without MQTT.

The robust strategies are told how many attackers to expect (``robust_defaults``:
trimmed_mean's beta, krum / multi_krum / bulyan's f), in the clean column too, so that
each row compares one configuration with and without attack; ``--own-defaults`` leaves
them at the strategies' defaults (f = 1, beta = 0.1). Prints a markdown table of
accuracies, then the seconds each row took.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from aggregator.strategies import STRATEGIES
from broker.errors import FedmqError
from fedmq.demo.attacks import (
    DEFAULT_FRACTION,
    KINDS,
    attacker_count,
    plan_attack,
    strategy_table,
)

ORDER = ("fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inprocess", action="store_true", help="no broker: the rounds in --workers processes"
    )
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attackers", type=float, default=DEFAULT_FRACTION)
    parser.add_argument(
        "--strategies", default=",".join(s for s in ORDER if s in STRATEGIES), metavar="A,B"
    )
    parser.add_argument("--attacks", default=",".join(("clean", *KINDS)), metavar="A,B")
    parser.add_argument(
        "--attack-scale", type=float, default=None, help="S for every attack [default: per kind]"
    )
    parser.add_argument(
        "--own-defaults",
        action="store_true",
        help="leave f and beta at the strategies' own defaults instead of the attackers' count",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for --inprocess")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directories (real runs) [default: a temp dir]"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    strategies = args.strategies.split(",")
    attacks = args.attacks.split(",")
    count = attacker_count(args.devices, args.attackers)
    unknown = [s for s in strategies if s not in STRATEGIES]
    unknown += [a for a in attacks if a != "clean" and a not in KINDS]
    if unknown:
        parser.error(f"unknown strategy or attack: {', '.join(unknown)}")

    out = args.out or Path(tempfile.mkdtemp(prefix="fedmq-attack-table-"))
    expect = 0 if args.own_defaults else count
    tables = {name: strategy_table(name, {}, args.devices, expect) for name in strategies}
    plans = {
        a: None
        if a == "clean"
        else plan_attack(a, args.devices, args.attackers, args.attack_scale, args.seed)
        for a in attacks
    }
    grid = [(name, attack) for name in strategies for attack in attacks]
    run = _in_process if args.inprocess else _real_demo
    accuracy, seconds, stopped = run(args, out, [(tables[n], plans[a]) for n, a in grid])
    cell = {
        key: f"{100 * acc:.1f}%" + (f" (stopped: {why})" if why else "")
        for key, acc, why in zip(grid, accuracy, stopped)
    }
    row_seconds = {name: 0.0 for name in strategies}
    for (name, _), spent in zip(grid, seconds):
        row_seconds[name] += spent

    attackers = plan_attack(KINDS[0], args.devices, args.attackers, None, args.seed).attackers
    how = "in-process rounds (no broker)" if args.inprocess else "real `fedmq demo` runs"
    print(f"$ {' '.join(shlex.quote(a) for a in ['python', *sys.argv])}\n")
    print(
        f"{how}: {args.devices} devices, {count} attackers "
        f"(watch-{', watch-'.join(map(str, attackers))}), {args.rounds} rounds, seed {args.seed}; "
        "final held-out accuracy\n"
    )
    header = ["strategy", *(_column(a, plans[a]) for a in attacks), "seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|")
    for name in strategies:
        cells = [cell[name, a] for a in attacks]
        label = _label(tables[name])
        print(f"| {label} | " + " | ".join(cells) + f" | {row_seconds[name]:.0f} |")
    return 0


def _label(table: dict) -> str:
    params = " ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in table.items()
        if k != "name"
    )
    return table["name"] + (f" ({params})" if params else "")


def _column(attack: str, plan) -> str:
    return "clean" if plan is None else f"{attack} S={plan.scale:g}"


def _in_process(args, out: Path, jobs):
    """The grid in two processes of ``fedmq/demo/inprocess.py`` rounds."""
    from fedmq.demo import inprocess, watch_data

    data = watch_data.prepare(out / "data", devices=args.devices, seed=args.seed)
    results = inprocess.run_many(
        data,
        [inprocess.Job(table, plan) for table, plan in jobs],
        rounds=args.rounds,
        seed=args.seed,
        workers=args.workers,
    )
    for result in results:
        print(
            f"{result.strategy:>24} {result.attack:>28}: {100 * result.final:5.1f}%",
            file=sys.stderr,
        )
    return (
        [r.final for r in results],
        [r.seconds for r in results],
        [r.stopped for r in results],
    )


def _real_demo(args, out: Path, jobs):
    """One real ``fedmq demo`` run per cell (``run_demo``: mosquitto, agent processes, the
    aggregator), one after the other; each run's output goes to ``<out>/<name>.txt``. A run
    that stops (a round short of devices at its deadline) scores its last checkpoint."""
    from fedmq.demo.run import run_demo

    accuracy, seconds, stopped = [], [], []
    for table, plan in jobs:
        name = f"{table['name']}-{plan.kind if plan else 'clean'}"
        started = time.monotonic()
        why = None
        with open(out / f"{name}.txt", "w") as log, contextlib.redirect_stdout(log):
            try:
                result = run_demo(
                    devices=args.devices,
                    rounds=args.rounds,
                    seed=args.seed,
                    run_dir=out / name,
                    console=Console(file=log, width=120),
                    strategy=table,
                    attack=plan,
                    centralized=False,
                )
                final = result.federated_accuracy
            except FedmqError as exc:
                print(f"stopped: {exc}", file=log)
                why = str(exc).split(";")[0]
                final = _last_checkpoint_accuracy(out / name)
        accuracy.append(final)
        seconds.append(time.monotonic() - started)
        stopped.append(why)
        print(
            f"{name:>28}: {100 * final:5.1f}% ({seconds[-1]:.0f}s){' ' + why if why else ''}",
            file=sys.stderr,
        )
    return accuracy, seconds, stopped


def _last_checkpoint_accuracy(run_dir: Path) -> float:
    """The held-out accuracy of a run directory's newest checkpoint."""
    from aggregator.checkpoint import RunDir
    from broker import codec, zoo
    from broker.task import TaskSpec
    from fedmq.demo import watch_data

    runs = RunDir(run_dir)
    last = max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*"))
    payload = runs.checkpoint_path(last).read_bytes()
    model = zoo.build_model(TaskSpec.load(run_dir / "data" / "task.toml").model)
    model.load_state_dict(codec.decode(payload, max_payload=len(payload)).tensors)
    return watch_data.accuracy(model, *watch_data.load_npz(run_dir / "data" / "test.npz"))


if __name__ == "__main__":
    sys.exit(main())
