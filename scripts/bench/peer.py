"""Peer benchmark: one federated workload run by fedmq, Flower's simulation and a plain loop.

    python scripts/bench/peer.py [--reps 3] [--rounds 20] [--clients 10]
                                 [--flower-venv /var/tmp/fedmq-flower-venv] [--skip-flower]

The workload (``workload.py``): scikit-learn's digits, 80/20 split (seed 42), 10 IID
clients, MLP 64-64-10 (4,810 parameters, the same initial weights everywhere), SGD lr 0.1,
batch 16, one local epoch, FedAvg, 20 rounds. Three systems run it, interleaved (each
repetition runs all three, in a rotated order), ``--reps`` times:

- fedmq: a real run on this machine: ``fedmq.local.LocalFederation`` (a secured mosquitto:
  TLS, an account and ACL per device, signed models and updates), one ``fedmq agent run``
  process per client reading its CSV, and the aggregator as a process (``fedmq aggregator
  start``, via ``spawn_aggregator``). The processes are forked from the federation's
  zygote (``fedmq/zygote.py``), which imports torch once for all of them, inside the clock;
  a device imports it on its own CPU at boot (``agent_costs.py`` measures that cold start).
  Provisioning the accounts and keys happens before the clock starts; the command runs
  from the broker's start until every process has exited (the aggregator's final plot
  included). Rounds end when ``metrics.jsonl`` gets their line. Its devices skip the
  federated evaluation of each round's model (``[train] evaluate = false``), as Flower
  runs no client-side evaluation; ``--fedmq-evaluate`` keeps it.
- Flower 1.42's simulation (``flower_app.py``: ``flwr.simulation.run_simulation``, FedAvg,
  every client every round, the Ray backend), run with the python of its own venv, which
  this script creates and fills on first use (``flwr[simulation]==1.42.0`` and CPU torch
  ``$TORCH_VERSION``, default 2.13.0, as scripts/setup.sh installs it; set
  ``FEDMQ_TORCH_INDEX`` to an index of CPU wheels where plain pip would bring CUDA).
- the in-process loop (``inprocess_loop.py``): plain PyTorch FedAvg in one process.

Printed per system (medians over the repetitions): steady round (median of the gaps between
the ends of rounds 2..R), CPU per steady round (user + system of every process of the
system, between the end of round 1 and the end of round R, over R - 1), first round (start
of the command to the end of round 1), whole command, final accuracy (the global model on
the test split) and peak memory (the largest sum of the processes' RSS, sampled every 0.2
s); then the ratios fedmq/Flower and fedmq/in-process beside the goals of fedmq issue 12.
Each run's line also splits fedmq's command: start-up (broker start to the aggregator's
initial checkpoint), round 1 after that, rounds 2..R, the plots after the last round, and
the exits after the plots.
The machine is whatever this runs on: say if it was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repository: fedmq, broker, aggregator

import proctree  # noqa: E402
import workload  # noqa: E402

SYSTEMS = ("fedmq", "flower", "inprocess")
TITLES = {"fedmq": "fedmq", "flower": "Flower simulation", "inprocess": "in-process loop"}
FLOWER_VERSION = "1.42.0"
DEFAULT_FLOWER_VENV = Path("/var/tmp/fedmq-flower-venv")
RUN_TIMEOUT = 900.0


@dataclass
class Run:
    """One system's run: when its rounds ended, and what its processes used."""

    system: str
    start: float = 0.0
    end: float = 0.0
    round_ends: dict[int, float] = field(default_factory=dict)  # round -> time.time()
    round_cpu: dict[int, float] = field(default_factory=dict)  # round -> CPU s of the tree
    peak_rss: int = 0
    accuracy: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return max(self.round_ends, default=0)

    def figures(self) -> dict[str, float]:
        last = self.rounds
        if last < 1 or sorted(self.round_ends) != list(range(1, last + 1)):
            raise RuntimeError(f"{self.system}: rounds seen {sorted(self.round_ends)}")
        gaps = [self.round_ends[r] - self.round_ends[r - 1] for r in range(2, last + 1)]
        cpu = (self.round_cpu[last] - self.round_cpu[1]) / (last - 1) if last > 1 else float("nan")
        return {
            "steady_round_s": statistics.median(gaps) if gaps else float("nan"),
            "cpu_per_round_s": cpu,
            "first_round_s": self.round_ends[1] - self.start,
            "whole_command_s": self.end - self.start,
            "accuracy": self.accuracy,
            "peak_memory_mb": self.peak_rss / 2**20,
        }


class Watcher:
    """Follows a run's events file (one JSON line with "round" per finished round) and
    samples the CPU and RSS of a process tree: at each round's end, and every 0.2 s."""

    def __init__(self, run: Run, events: Path, root: int, include_root: bool) -> None:
        self.run, self.events, self.root, self.include_root = run, events, root, include_root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._pids: list[int] = []
        self._offset = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()
        self._poll()  # a line written just before the end

    def _refresh(self) -> None:
        pids = proctree.descendants(self.root)
        self._pids = [self.root, *pids] if self.include_root else pids
        self.run.peak_rss = max(self.run.peak_rss, proctree.rss_bytes(self._pids))

    def _poll(self) -> None:
        try:
            if self.events.stat().st_size <= self._offset:
                return
            with open(self.events, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        now = time.time()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            round_ = json.loads(line)["round"]
            if round_ not in self.run.round_ends:
                self.run.round_ends[round_] = now
                self.run.round_cpu[round_] = proctree.cpu_seconds(self._pids)

    def _loop(self) -> None:
        last_refresh = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_refresh >= 0.2:
                self._refresh()
                last_refresh = time.monotonic()
            self._poll()
            time.sleep(0.005)


# -- the three systems ---------------------------------------------------------------------


def run_fedmq(work: Path, data: Path, rounds: int, clients: int, evaluate: bool = False) -> Run:
    """A real fedmq run: secured mosquitto, an agent process per client, the aggregator
    process. The processes are this one's children; this process only watches.
    ``evaluate``: the devices' federated evaluation each round (fedmq's default; off here
    by default, as Flower runs with ``fraction_evaluate=0``)."""
    from aggregator.checkpoint import RunDir
    from broker import codec
    from fedmq.local import LocalFederation

    task = data / "task.toml"
    if not evaluate:
        task = work / "task.toml"
        task.write_text(workload.TASK.replace("[train]", "[train]\nevaluate = false"))
    names = workload.client_names(clients)
    provisioned = time.perf_counter()
    fed = LocalFederation.create(work / "broker", "peer", names)
    run = Run("fedmq", extra={"provision_s": time.perf_counter() - provisioned})
    run_dir, logs = work / "run", work / "logs"
    logs.mkdir(parents=True)
    watcher = Watcher(run, run_dir / "metrics.jsonl", os.getpid(), include_root=False)
    run.start = time.time()
    watcher.start()
    try:
        fed.start_broker()
        for name in names:
            fed.spawn_agent(name, data / f"{name}.csv", "--exit-when-done", log=logs / name)
        aggregator = fed.spawn_aggregator(
            *("--task", str(task), "--rounds", str(rounds)),
            *("--min-devices", str(clients), "--deadline", "300", "--on-short", "stop"),
            *("--run-dir", str(run_dir)),
            log=logs / "aggregator",
        )
        code = aggregator.wait(RUN_TIMEOUT)
        for proc in fed.procs:
            proc.wait(60)
        run.end = time.time()
    finally:
        watcher.stop()
        fed.close()
    if code != 0:
        raise RuntimeError(f"fedmq aggregator exited {code}: {(logs / 'aggregator').read_text()}")
    runs = RunDir(run_dir)
    rows = runs.metrics()
    run.extra.update(fedmq_phases(runs, rows[-1]["round"], run.start, run.end))
    run.extra["metrics_seconds_median"] = statistics.median(r["seconds"] for r in rows[1:])
    payload = runs.checkpoint_path(rows[-1]["round"]).read_bytes()
    tensors = codec.decode(payload, max_payload=len(payload)).tensors
    model = workload.build_model()
    model.load_state_dict(tensors)
    run.accuracy = workload.accuracy(model, *workload.load_test(data))
    return run


def fedmq_phases(runs, last: int, start: float, end: float) -> dict[str, float]:
    """Where a fedmq command's time went, from the files its aggregator writes once:
    start-up (until the initial model's checkpoint), round 1 after that, the rounds after
    round 1, the plots after the last round, and the exits after the plots."""
    ready = runs.checkpoint_path(0).stat().st_mtime
    first = runs.checkpoint_path(1).stat().st_mtime
    final = runs.checkpoint_path(last).stat().st_mtime
    plots = max((p.stat().st_mtime for p in runs.path.glob("*.png")), default=final)
    return {
        "startup_s": ready - start,
        "round1_after_startup_s": first - ready,
        "rounds_2_to_R_s": final - first,
        "plots_s": plots - final,
        "exit_after_plots_s": end - plots,
    }


def run_command(system: str, command: list[str], events: Path) -> Run:
    """A system that is one command (plus whatever it starts): its tree is watched."""
    run = Run(system)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run.start = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    watcher = Watcher(run, events, proc.pid, include_root=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        run.end = time.time()
    finally:
        watcher.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{system} exited {proc.returncode}:\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    run.accuracy = result["accuracy"]
    return run


def run_system(
    system: str, work: Path, data: Path, rounds: int, clients: int, flower_python, evaluate=False
):
    work.mkdir(parents=True)
    if system == "fedmq":
        return run_fedmq(work, data, rounds, clients, evaluate)
    events = work / "events.jsonl"
    common = [str(data), "--rounds", str(rounds), "--events", str(events)]
    if system == "inprocess":
        return run_command(
            system, [sys.executable, str(HERE / "inprocess_loop.py"), *common], events
        )
    return run_command(system, [str(flower_python), str(HERE / "flower_app.py"), *common], events)


# -- Flower's venv -------------------------------------------------------------------------


def flower_ready(python: Path) -> bool:
    check = f"import flwr, ray, torch, sys; sys.exit(flwr.__version__ != {FLOWER_VERSION!r})"
    return (
        python.exists()
        and subprocess.run([python, "-c", check], capture_output=True).returncode == 0
    )


def ensure_flower_venv(venv: Path) -> Path:
    """The python of a venv holding Flower's simulation and CPU torch; made if missing."""
    python = venv / "bin" / "python"
    if flower_ready(python):
        return python
    print(
        f"installing flwr[simulation]=={FLOWER_VERSION} and CPU torch into {venv} ...", flush=True
    )
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    torch_spec = f"torch=={os.environ.get('TORCH_VERSION', '2.13.0')}"
    index = os.environ.get("FEDMQ_TORCH_INDEX")  # as scripts/install-agent.sh: CPU wheels
    subprocess.run([*pip, torch_spec, *(["--extra-index-url", index] if index else [])], check=True)
    subprocess.run([*pip, f"flwr[simulation]=={FLOWER_VERSION}"], check=True)
    if not flower_ready(python):
        raise SystemExit(f"{venv}: flwr {FLOWER_VERSION}, ray or torch still missing")
    return python


# -- the table -----------------------------------------------------------------------------

ROWS = (
    ("steady_round_s", "steady round (rounds 2..R)", "{:.3f} s"),
    ("cpu_per_round_s", "CPU per steady round, all processes", "{:.3f} s"),
    ("first_round_s", "first round (from the command's start)", "{:.1f} s"),
    ("whole_command_s", "whole command", "{:.1f} s"),
    ("accuracy", "final accuracy (test split)", "{:.3f}"),
    ("peak_memory_mb", "peak memory (sum of RSS)", "{:.0f} MB"),
)
GOALS = {  # figure -> (other system, the largest fedmq/other ratio that meets it)
    "steady_round_s": (("flower", 0.5), ("inprocess", 1.5)),
    "whole_command_s": (("flower", 0.5),),
}


def summarize(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Median of each figure over a system's runs."""
    by_system: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_system.setdefault(run.system, []).append(run.figures())
    return {
        system: {key: statistics.median(f[key] for f in figs) for key in figs[0]}
        for system, figs in by_system.items()
    }


def goal_lines(summary: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    fed = summary.get("fedmq")
    if fed is None:
        return lines
    for key, goals in GOALS.items():
        for other, limit in goals:
            if other in summary:
                ratio = fed[key] / summary[other][key]
                verdict = "met" if ratio <= limit else "NOT met"
                lines.append(
                    f"goal: fedmq {key} <= {limit}x {TITLES[other]}: {ratio:.2f}x ({verdict})"
                )
    for other in ("flower", "inprocess"):
        if other in summary:
            gap = fed["accuracy"] - summary[other]["accuracy"]
            verdict = "met" if abs(gap) <= 0.01 else "NOT met"
            lines.append(
                f"goal: same accuracy as {TITLES[other]} (within 1 point): "
                f"{100 * gap:+.1f} points ({verdict})"
            )
    return lines


def table(summary: dict[str, dict[str, float]], reps: int) -> str:
    systems = [s for s in SYSTEMS if s in summary]
    ratios = [o for o in ("flower", "inprocess") if o in summary and "fedmq" in summary]
    head = ["", *(TITLES[s] for s in systems), *(f"fedmq / {TITLES[o]}" for o in ratios)]
    lines = [
        f"medians of {reps} interleaved repetition(s)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key, label, fmt in ROWS:
        cells = [fmt.format(summary[s][key]) for s in systems]
        cells += [f"{summary['fedmq'][key] / summary[o][key]:.2f}x" for o in ratios]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines + goal_lines(summary))


def benchmark(
    work: Path,
    *,
    rounds: int = 20,
    clients: int = 10,
    reps: int = 3,
    systems: tuple[str, ...] = SYSTEMS,
    flower_python: Path | None = None,
    evaluate: bool = False,
    say=print,
) -> tuple[list[Run], dict[str, dict[str, float]]]:
    """Run every system ``reps`` times, interleaved; the runs and their medians."""
    if rounds < 2:
        raise SystemExit("--rounds must be at least 2 (the steady round starts at round 2)")
    data = work / "data"
    info = workload.prepare(data, clients)
    say(
        f"workload: digits, {info['train']} training samples in {clients} IID clients, "
        f"{info['test']} test samples, {rounds} rounds; files in {data}; fedmq's devices "
        + ("evaluate" if evaluate else "do not evaluate (evaluate = false)")
        + " the round's model on their data"
    )
    runs = []
    for rep in range(reps):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for system in order:
            run = run_system(
                system, work / f"{rep}-{system}", data, rounds, clients, flower_python, evaluate
            )
            runs.append(run)
            figs = run.figures()
            detail = ", ".join(f"{k} {v:.3f}" for k, v in figs.items())
            extra = ", ".join(
                f"{k} {v:.3f}"
                for k, v in {"cpu_until_round1_s": run.round_cpu[1], **run.extra}.items()
            )
            say(f"rep {rep + 1} {system}: {detail}" + (f" ({extra})" if extra else ""))
    return runs, summarize(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each system")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--flower-venv",
        type=Path,
        default=DEFAULT_FLOWER_VENV,
        help="venv for Flower (created and filled if missing)",
    )
    parser.add_argument("--skip-flower", action="store_true", help="fedmq and the loop only")
    parser.add_argument("--work", type=Path, help="directory for data, runs and logs")
    parser.add_argument(
        "--fedmq-evaluate",
        action="store_true",
        help="keep fedmq's federated evaluation on (its default; Flower here runs none)",
    )
    args = parser.parse_args()

    systems = tuple(s for s in SYSTEMS if not (args.skip_flower and s == "flower"))
    python = None if args.skip_flower else ensure_flower_venv(args.flower_venv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedmq-peer-"))
    started = time.time()
    _, summary = benchmark(
        work,
        rounds=args.rounds,
        clients=args.clients,
        reps=args.reps,
        systems=systems,
        flower_python=python,
        evaluate=args.fedmq_evaluate,
    )
    print(f"\nmachine: {os.cpu_count()} cores; benchmark took {time.time() - started:.0f} s")
    print(table(summary, args.reps))


if __name__ == "__main__":
    main()
