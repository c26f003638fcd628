"""Benchmark: a secure-aggregation (SecAgg+) round beside a plain FedAvg round, at scale.

    python scripts/bench_secagg.py [--devices 100 1000] [--dropout 0 0.3] [--hidden 280]

For each number of devices, on one secured mosquitto (TLS, one account per device,
started with the project's config), with the real aggregator (``fedmq aggregator
start`` in a child process) and simulated devices that are real MQTT clients
(``fedmq/secagg_fleet.py``, in ``--procs`` worker processes), it runs:

- a plain round: every device publishes one signed update (base model + its synthetic
  delta), the aggregator checks, journals and averages them;
- a secure round per dropout rate: every device goes through SecAgg+ (keys, roster
  check, shares, delivery, receipt, masked input, reveal); with dropout that fraction
  of the devices goes offline after sharing, before its masked input.

It prints, side by side: each phase's seconds and the round's, the aggregator's
unmasking time (the phase, and its compute alone), each device's upload over the round
against a plain signed update of the same model, the aggregator's peak memory and the
CPU seconds of aggregator, broker and devices; and it checks that each secure model
equals plain FedAvg of the contributing devices' updates within 1e-5 (prints the max
difference).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import tempfile
import threading
import time
from math import comb
from pathlib import Path

from aggregator.checkpoint import RunDir
from broker.secagg import graph
from fedmq.loadgen import memory_mb
from fedmq.local import LocalFederation
from fedmq.secagg_fleet import FleetSpec, expected_fedavg, fleet_process
from fedmq.synthetic import mlp_task

SECURE = """
[secure_aggregation]
clip_range = 1.0
max_weight = 60
phase_deadline = {phase_deadline}
max_dropout = {max_dropout}
"""
TOLERANCE = 1e-5
# paho's network loop uses select(), which takes descriptors below 1024 only, and each
# client holds three (its socket and a wake-up pair): at most ~330 devices per process
DEVICES_PER_PROCESS = 250
CLK_TCK = 100


MAX_DROPOUT = 0.3  # the [secure_aggregation] max_dropout the rounds are sized for


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hypergeom_at_least(population: int, marked: int, draws: int, at_least: int) -> float:
    """P(at least ``at_least`` marked among ``draws`` drawn without replacement)."""
    total = comb(population, draws)
    hits = range(max(at_least, 0), min(marked, draws) + 1)
    return sum(comb(marked, j) * comb(population - marked, draws - j) for j in hits) / total


def expected_lacking(n: int, dropped: int) -> float:
    """Expected secrets that cannot be rebuilt when ``dropped`` of ``n`` devices (at random)
    go away after sharing: a survivor's seed has only its surviving neighbours' shares, so it
    is lost with more than degree - t dropped neighbours; a dropped device's mask key, with
    fewer than t surviving neighbours (each device's k neighbours: ~ a random k of n - 1)."""
    k = graph.degree_for(n, MAX_DROPOUT)
    t = graph.threshold_for(k)
    survivors = n - dropped
    lost_seed = hypergeom_at_least(n - 1, dropped, k, k - t + 1)
    lost_key = hypergeom_at_least(n - 1, dropped - 1, k, k - t + 1) if dropped else 0.0
    return survivors * lost_seed + dropped * lost_key


def raise_open_files() -> int:
    """Soft limit of open files up to the hard one: this process's sockets, and mosquitto's
    (it inherits the limit from us: one descriptor per connected device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_fleets(ctx, fed: LocalFederation, devices, mode: str, drop: set, procs: int):
    """Worker processes, each running a slice of the devices; returns once all are online."""
    workers = []
    for w in range(procs):
        part = [(i, d, str(fed.credentials(d))) for i, d in enumerate(devices) if i % procs == w]
        if not part:
            continue
        spec = FleetSpec(fed.name, mode, part, drop=drop & {d for _, d, _ in part})
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fleet_process, args=(spec, child), daemon=True)
        proc.start()
        workers.append((proc, parent))
    connect = 0.0
    for _, conn in workers:
        if not conn.poll(300):
            raise RuntimeError("a device worker did not connect its devices in 300 s")
        kind, value = conn.recv()
        if kind != "ready":
            raise RuntimeError(f"a device worker failed: {value}")
        connect = max(connect, value)
    return workers, connect


def stop_fleets(workers) -> dict:
    out = {"uploaded": {}, "done": [], "errors": [], "refusals": [], "handler_cpu": 0.0}
    out["process_cpu"] = 0.0
    for _, conn in workers:
        conn.send("stop")
    for proc, conn in workers:
        kind, value = conn.recv() if conn.poll(120) else ("error", "no report")
        if kind == "done":
            out["uploaded"].update(value["uploaded"])
            out["done"] += value["done"]
            out["errors"] += value["errors"]
            out["refusals"] += value["refusals"]
            out["handler_cpu"] += value["handler_cpu"]
            out["process_cpu"] += value["process_cpu"]
        else:
            out["errors"].append(value)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return out


def run_round(fed, ctx, work: Path, args, n: int, dropout: float | None) -> dict:
    """One round (``dropout`` None: plain FedAvg) with the first ``n`` devices."""
    secure = dropout is not None
    name = f"n{n}-" + (f"secure{round(dropout * 100)}" if secure else "plain")
    devices = fed.devices[:n]
    dropped = set(random.Random(n).sample(devices, round(n * dropout))) if secure else set()
    task = work / f"{name}.toml"
    extra = (
        SECURE.format(phase_deadline=args.phase_deadline, max_dropout=MAX_DROPOUT) if secure else ""
    )
    task.write_text(mlp_task([args.hidden, args.hidden]) + extra)
    procs = max(args.procs, -(-n // DEVICES_PER_PROCESS))
    workers, connect = start_fleets(
        ctx, fed, devices, "secure" if secure else "plain", dropped, procs
    )
    run = work / name
    broker_cpu = cpu_seconds(fed.broker.pid)
    started = time.perf_counter()
    proc = fed.spawn_aggregator(
        "--task",
        str(task),
        "--rounds",
        "1",
        "--min-devices",
        str(n - len(dropped)),
        "--deadline",
        str(args.deadline),
        "--on-short",
        "stop",
        "--run-dir",
        str(run),
        log=work / f"{name}.log",
    )
    peak, agg_cpu = [0.0], [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], memory_mb(proc.pid))
            agg_cpu[0] = max(agg_cpu[0], cpu_seconds(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = proc.wait(args.timeout)
    except Exception:
        proc.kill()
        code = "killed after the timeout"
    wall = time.perf_counter() - started
    sampler.join()
    broker_cpu = cpu_seconds(fed.broker.pid) - broker_cpu
    fleet = stop_fleets(workers)
    log_tail = (work / f"{name}.log").read_text(errors="replace")[-3000:]
    if fleet["errors"] and code == 0:
        raise RuntimeError(f"{name}: device errors: {fleet['errors'][:5]}")
    if code != 0:
        if "cannot unmask" not in log_tail:
            raise RuntimeError(f"{name}: the aggregator exited with {code}:\n{log_tail}")
        why = log_tail[log_tail.index("cannot unmask") :].split("; stopping")[0]
        return {
            "name": name,
            "devices": n,
            "secure": True,
            "dropout": dropout,
            "dropped": len(dropped),
            "failed": why,
            "wall_seconds": wall,
            "rss_peak_mb": peak[0],
            "aggregator_cpu": agg_cpu[0],
            "broker_cpu": broker_cpu,
            "devices_cpu": fleet["process_cpu"],
            "connect_seconds": connect,
            "procs": procs,
            "expected_lacking": expected_lacking(n, len(dropped)),
        }
    rundir = RunDir(run)
    row = rundir.metrics()[0]
    survivors = [d for d in devices if d not in dropped]
    if row["contributors"] != survivors:
        raise RuntimeError(f"{name}: contributors are not the survivors: {row['contributors']}")
    base, final = rundir.checkpoint(0), rundir.checkpoint(1)
    index = {d: i for i, d in enumerate(devices)}
    expected = expected_fedavg(base, [index[d] for d in survivors])
    diff = max(float((final[k].double() - expected[k]).abs().max()) for k in expected)
    sent = [sum(fleet["uploaded"][d].values()) for d in survivors]
    by_kind: dict[str, float] = {}
    for d in survivors:
        for kind, b in fleet["uploaded"][d].items():
            by_kind[kind] = by_kind.get(kind, 0) + b / len(survivors)
    secure_row = row.get("secure_aggregation", {})
    phases = secure_row.get("phase_seconds", {})
    return {
        "failed": None,
        "expected_lacking": expected_lacking(n, len(dropped)),
        "name": name,
        "devices": n,
        "secure": secure,
        "dropout": dropout or 0.0,
        "dropped": len(dropped),
        "roster": secure_row.get("roster"),
        "threshold": secure_row.get("threshold"),
        "phases": phases,
        # the round proper: from announcing the model (after the sample is drawn) to the
        # new model; the select phase only waits for statuses (SELECT_SETTLE)
        "round_seconds": (
            sum(v for k, v in phases.items() if k != "select") if secure else row["seconds"]
        ),
        "row_seconds": row["seconds"],
        "unmask_compute": secure_row.get("unmask_compute_seconds"),
        "upload_mean": sum(sent) / len(sent),
        "upload_max": max(sent),
        "upload_by_kind": by_kind,
        "max_diff": diff,
        "rss_peak_mb": peak[0],
        "aggregator_cpu": agg_cpu[0],
        "broker_cpu": broker_cpu,
        "devices_cpu": fleet["process_cpu"],
        "handler_cpu": fleet["handler_cpu"],
        "connect_seconds": connect,
        "wall_seconds": wall,
        "procs": procs,
        "refusals": fleet["refusals"],
    }


def report(results: list[dict]) -> None:
    plain = {r["devices"]: r for r in results if not r["secure"]}
    print()
    head = (
        f"{'devices':>7} {'round':<12} {'keys':>6} {'shares':>6} {'masked':>6} {'unmask':>6} "
        f"{'total s':>7} {'plain s':>7} {'unmask cpu':>10} {'upload KiB':>10} {'x plain':>7} "
        f"{'agg RSS MB':>10} {'max|diff|':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        p = plain.get(r["devices"])
        label = f"secure {r['dropout']:.0%}" if r["secure"] else "plain fedavg"
        if r.get("failed"):
            print(f"{r['devices']:>7} {label:<12} FAILED: {r['failed'][:150]}")
            continue
        ratio = r["upload_mean"] / p["upload_mean"] if p else float("nan")
        ph = r["phases"]

        def cell(key: str, ph=ph) -> str:
            return f"{ph[key]:6.2f}" if key in ph else f"{'-':>6}"

        unmask_cpu = f"{r['unmask_compute']:10.3f}" if r["secure"] else f"{'-':>10}"
        print(
            f"{r['devices']:>7} {label:<12} {cell('keys')} {cell('shares')} {cell('masked')} "
            f"{cell('unmask')} {r['round_seconds']:7.2f} "
            f"{(p['round_seconds'] if p else float('nan')):7.2f} {unmask_cpu} "
            f"{r['upload_mean'] / 1024:10.1f} {ratio:7.3f} {r['rss_peak_mb']:10.0f} "
            f"{r['max_diff']:9.1e}"
        )
    print()
    for r in results:
        if r["secure"]:
            k = graph.degree_for(r["devices"], MAX_DROPOUT)
            print(
                f"{r['name']}: degree {k}, threshold {graph.threshold_for(k)}, dropped "
                f"{r['dropped']}; secrets expected to lack shares: {r['expected_lacking']:.2g}"
            )
        if not r.get("failed"):
            kinds = ", ".join(f"{k} {v / 1024:.1f}" for k, v in sorted(r["upload_by_kind"].items()))
            print(f"    upload KiB per contributing device: {kinds}")
        print(
            f"    CPU s: aggregator {r['aggregator_cpu']:.1f}, broker {r['broker_cpu']:.1f}, "
            f"devices {r['devices_cpu']:.1f}; aggregator peak RSS {r['rss_peak_mb']:.0f} MB; "
            f"wall {r['wall_seconds']:.1f} s from aggregator start"
            + ("" if r.get("failed") else f" (row: {r['row_seconds']:.2f} s from round open)")
            + f"; devices connected in {r['connect_seconds']:.1f} s ({r['procs']} processes)"
        )
        if r.get("refusals"):
            print(f"    devices refused {len(r['refusals'])} steps, e.g. {r['refusals'][0]}")
    done = [r["max_diff"] for r in results if not r.get("failed")]
    worst = max(done) if done else float("nan")
    verdict = "OK" if worst <= TOLERANCE else "FAILED"
    print(f"\nmax |model - FedAvg of the contributors| over the rounds: {worst:.2e} ({verdict})")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--hidden", type=int, default=280, help="MLP width: 280 = 99,128 params")
    parser.add_argument(
        "--procs",
        type=int,
        default=2,
        help=f"device worker processes (at least one per {DEVICES_PER_PROCESS} devices)",
    )
    parser.add_argument(
        "--phase-deadline", type=float, default=120, help="seconds of keys/shares/unmask"
    )
    parser.add_argument(
        "--deadline", type=float, default=120, help="seconds of the masked (training) phase"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds a round may take")
    parser.add_argument("--work", type=Path, default=None, help="directory (default: a temp)")
    args = parser.parse_args(argv)
    if any(not 0 <= d < 1 for d in args.dropout):
        parser.error("--dropout values must be in [0, 1)")

    limit = raise_open_files()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedmq-bench-secagg-"))
    work.mkdir(parents=True, exist_ok=True)
    most = max(args.devices)
    print(f"open files limit {limit}; provisioning {most} devices in {work} ...", flush=True)
    devices = [f"d{i:04d}" for i in range(most)]
    ctx = multiprocessing.get_context("spawn")
    results = []
    with LocalFederation.create(work / "broker", "bench", devices) as fed:
        print(f"mosquitto pid {fed.broker.pid}, TLS {fed.home.tls}", flush=True)
        for n in args.devices:
            for dropout in (None, *args.dropout):
                r = run_round(fed, ctx, work, args, n, dropout)
                if r.get("failed"):
                    print(f"{r['name']}: FAILED: {r['failed']}", flush=True)
                else:
                    print(
                        f"{r['name']}: round {r['round_seconds']:.2f} s, "
                        f"max |diff| {r['max_diff']:.1e}",
                        flush=True,
                    )
                results.append(r)
    (work / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    report(results)
    return results


if __name__ == "__main__":
    main()
