"""``fedmq simulate``: thousands of virtual devices in a few worker processes.

The parent splits the fleet over ``processes`` workers (device ``i`` goes to worker
``i % processes``); each worker runs its devices (``fedmq.sim_device``) on one
selector loop (``fedmq.sim_loop``) and reports its tally twice a second through a
pipe. The parent sums the tallies for the progress display and, at the end, for
the report: connection ramp, updates, errors, and each worker's CPU and peak memory.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.errors import ConfigError, FedmqError

REPORT_EVERY = 0.5  # seconds between a worker's tallies
LEAVE_TIMEOUT = 20.0  # seconds a worker waits for its offline statuses to be acknowledged


@dataclass
class WorkerSpec:
    """What one worker process needs; picklable."""

    worker: int
    devices: list[tuple[int, str]]  # (index in the fleet, credentials file)
    broker: str | None = None  # HOST:PORT instead of the credentials' address
    rate: float = 100.0  # this worker's new connections per second
    rounds: int | None = None  # leave after answering this many rounds (None: the final model)
    subscribe_state: bool = False  # also subscribe to the aggregator's state (its fan-out cost)


@dataclass
class WorkerReport:
    worker: int
    tally: dict
    first_connack: list[float] = field(default_factory=list)
    dial_started: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    dials: int = 0
    dial_failures: int = 0


def _raise_own_fd_limit(needed: int) -> None:
    """One socket per device: soft limit up to the hard one; ConfigError if that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ConfigError(
            f"a worker needs about {needed:,} file descriptors but may open {soft:,}: "
            "use more --processes, or raise `ulimit -n`"
        )


def _own_peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(spec: WorkerSpec, conn) -> None:
    """A worker process: connect its devices, follow rounds, report, leave cleanly."""
    # Ctrl-C reaches the whole process group: the parent tells the workers to stop, so
    # they leave cleanly (offline status, disconnect) instead of dying mid-loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        report = _run_worker(spec, conn)
        conn.send(("done", asdict(report)))
    except FedmqError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:  # told to the parent, which stops the run with it
        conn.send(("error", f"worker {spec.worker}: {type(exc).__name__}: {exc}"))


def _run_worker(spec: WorkerSpec, conn) -> WorkerReport:
    from broker.connection import parse_address
    from broker.home import load_credentials
    from fedmq.signing_hooks import agent_hooks
    from fedmq.sim_device import ModelCache, Tally, VirtualDevice, tls_context
    from fedmq.sim_loop import ClientLoop

    _raise_own_fd_limit(len(spec.devices) + 64)
    tally = Tally(devices=len(spec.devices))
    by_client: dict[int, VirtualDevice] = {}

    def on_error(client, message: str, permanent: bool) -> None:
        device = by_client.get(id(client))
        who = device.device_id if device else "?"
        if not permanent:
            tally.retry(f"{who}: {message}")  # redialled with backoff
            return
        tally.error(f"{who}: {message}")
        if device is not None:
            device.give_up()

    loop = ClientLoop(rate=spec.rate, on_error=on_error)
    contexts: dict[tuple, object] = {}
    verifiers: dict[Path | None, ModelCache] = {}
    devices: list = []
    for index, creds_path in spec.devices:
        creds = load_credentials(creds_path)
        if not creds.get("device_id"):
            raise ConfigError(f"{creds_path}: not a device's credentials (no device_id)")
        address = spec.broker or creds["broker"]
        if not address:
            raise ConfigError(f"{creds_path}: no broker address: pass --broker HOST:PORT")
        host, port = parse_address(address)
        context = None
        if creds.get("ca_file") is not None:
            key = (creds["ca_file"], creds.get("cert_file"), creds.get("key_file"))
            if key not in contexts:
                contexts[key] = tls_context(*key)
            context = contexts[key]
        model_key = creds.get("model_key")
        if model_key not in verifiers:
            verifiers[model_key] = ModelCache(agent_hooks(None, model_key)[1])
        device = VirtualDevice(
            index,
            creds,
            loop=loop,
            tally=tally,
            models=verifiers[model_key],
            context=context,
            rounds=spec.rounds,
            subscribe_state=spec.subscribe_state,
        )
        devices.append((device, host, port))
        by_client[id(device.client)] = device
    # every worker dials from the same moment: the ramp measures connecting, not start-up
    conn.send(("ready", len(devices)))
    if conn.recv() != "go":
        loop.close()
        return WorkerReport(worker=spec.worker, tally=_snapshot(tally))
    dial_started = time.time()
    for device, host, port in devices:
        device.start(host, port)
    devices = [device for device, _, _ in devices]
    next_report = 0.0
    stop = False
    while not stop and tally.finished + tally.refused < len(devices):
        loop.run_once(0.05)
        now = time.monotonic()
        if now >= next_report:
            next_report = now + REPORT_EVERY
            conn.send(("tally", _snapshot(tally)))
        while conn.poll():
            if conn.recv() == "stop":
                stop = True
    _leave(loop, devices)
    return WorkerReport(
        worker=spec.worker,
        tally=_snapshot(tally),
        first_connack=list(tally.first_connack),
        dial_started=dial_started,
        cpu_seconds=time.process_time(),
        peak_rss_mb=_own_peak_rss_mb(),
        dials=loop.dials,
        dial_failures=loop.dial_failures,
    )


def _leave(loop, devices) -> None:
    """Say offline (a clean disconnect fires no will), wait for the acks, disconnect."""
    for d in devices:
        d.finished = True  # no redial from here on
    infos = [i for i in (d.say_offline() for d in devices) if i is not None]
    deadline = time.monotonic() + LEAVE_TIMEOUT
    while time.monotonic() < deadline and not all(i.is_published() for i in infos):
        loop.run_once(0.05)
    loop.stopping = True
    for d in devices:
        if d.client.socket() is not None:
            d.client.disconnect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(d.client.socket() is not None for d in devices):
        loop.run_once(0.05)
    loop.close()


def _snapshot(tally) -> dict:
    out = {k: v for k, v in asdict(tally).items() if k not in ("first_connack",)}
    out["rounds"] = dict(tally.rounds)
    return out


# --------------------------------------------------------------------------- the parent


@dataclass
class SimReport:
    devices: int
    processes: int
    totals: dict
    workers: list[dict]
    seconds: float
    connect_seconds: float | None  # first dial to the last device's first CONNACK
    connections_per_second: float | None
    errors: list[str]
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return (
            not self.interrupted
            and not self.errors
            and self.totals.get("finished", 0) == self.devices
        )


def split(devices: list[tuple[int, str]], processes: int) -> list[list[tuple[int, str]]]:
    """Device ``i`` of the list goes to worker ``i % processes``."""
    return [devices[w::processes] for w in range(processes)]


def sum_tallies(tallies: list[dict]) -> dict:
    totals: dict = {}
    rounds: Counter = Counter()
    for t in tallies:
        for k, v in t.items():
            if k == "rounds":
                rounds.update({int(r): n for r, n in v.items()})
            elif isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    totals["rounds"] = dict(sorted(rounds.items()))
    for key in ("model_times", "ack_times"):
        spans: dict[int, list[float]] = {}
        for t in tallies:
            for r, (first, last) in t.get(key, {}).items():
                span = spans.setdefault(int(r), [first, last])
                span[0], span[1] = min(span[0], first), max(span[1], last)
        totals[key] = dict(sorted(spans.items()))
    return totals


def run(
    devices: list[tuple[int, str]],
    *,
    processes: int = 4,
    rate: float = 300.0,
    rounds: int | None = None,
    broker: str | None = None,
    timeout: float | None = None,
    subscribe_state: bool = False,
    on_start: Callable[[list[int]], None] | None = None,
    on_tally: Callable[[dict], None] | None = None,
) -> SimReport:
    """Run the fleet ``devices`` ((index, credentials file) each) to the end; the report.

    Ends when every device is done (the final model, or ``rounds`` answered), at
    ``timeout`` seconds, or on KeyboardInterrupt (workers leave cleanly either way)."""
    if not devices:
        raise ConfigError("no devices to simulate")
    processes = max(1, min(processes, len(devices)))
    ctx = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    workers = []
    for w, part in enumerate(split(devices, processes)):
        spec = WorkerSpec(
            w,
            part,
            broker=broker,
            rate=rate / processes,
            rounds=rounds,
            subscribe_state=subscribe_state,
        )
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, child_end), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    if on_start is not None:
        on_start([proc.pid for proc, _ in workers])
    tallies: list[dict] = [{} for _ in workers]
    ready = [False for _ in workers]
    reports: list[dict | None] = [None for _ in workers]
    errors: list[str] = []
    interrupted = False
    stop_sent = False

    def stop_all() -> None:
        nonlocal stop_sent
        if not stop_sent:
            stop_sent = True
            for proc, pipe in workers:
                if proc.is_alive():
                    try:
                        pipe.send("stop")
                    except OSError:
                        pass

    try:
        while any(r is None for r in reports):
            for w, (proc, pipe) in enumerate(workers):
                if reports[w] is not None:
                    continue
                try:
                    while pipe.poll():
                        kind, body = pipe.recv()
                        if kind == "ready":
                            ready[w] = True
                            if all(ready) and not stop_sent:
                                for _, other in workers:
                                    other.send("go")
                        elif kind == "tally":
                            tallies[w] = body
                        elif kind == "done":
                            reports[w] = body
                            tallies[w] = body["tally"]
                        else:
                            errors.append(body)
                            reports[w] = {"worker": w, "tally": tallies[w], "failed": True}
                            stop_all()
                except (EOFError, OSError):
                    if reports[w] is None:
                        errors.append(f"worker {w} died (exit code {proc.exitcode})")
                        reports[w] = {"worker": w, "tally": tallies[w], "failed": True}
                        stop_all()
                if reports[w] is None and not proc.is_alive() and not pipe.poll():
                    errors.append(f"worker {w} died (exit code {proc.exitcode})")
                    reports[w] = {"worker": w, "tally": tallies[w], "failed": True}
                    stop_all()
            if on_tally is not None:
                on_tally(sum_tallies(tallies))
            if timeout is not None and time.perf_counter() - started > timeout and not stop_sent:
                errors.append(f"timed out after {timeout:g} s")
                stop_all()
            time.sleep(0.1)
    except KeyboardInterrupt:
        interrupted = True
        stop_all()
        for w, (_proc, pipe) in enumerate(workers):
            if reports[w] is None and pipe.poll(LEAVE_TIMEOUT + 10):
                try:
                    kind, body = pipe.recv()
                    reports[w] = body if kind == "done" else None
                except (EOFError, OSError):
                    pass
    finally:
        for proc, _ in workers:
            proc.join(LEAVE_TIMEOUT + 10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return _report(devices, processes, tallies, reports, errors, interrupted, started)


def _report(devices, processes, tallies, reports, errors, interrupted, started) -> SimReport:
    done = [r for r in reports if r and not r.get("failed")]
    acks = sorted(t for r in done for t in r.get("first_connack", []))
    dial = min((r["dial_started"] for r in done), default=None)
    connect_seconds = (acks[-1] - dial) if acks and dial is not None else None
    totals = sum_tallies(tallies)
    device_errors = [e for r in done for e in r["tally"].get("errors", [])]
    return SimReport(
        devices=len(devices),
        processes=processes,
        totals=totals,
        workers=[r for r in reports if r],
        seconds=time.perf_counter() - started,
        connect_seconds=connect_seconds,
        connections_per_second=(len(acks) / connect_seconds) if connect_seconds else None,
        errors=device_errors + errors,  # the devices' own say why first
        interrupted=interrupted,
    )


def fleet(home, count: int | None, prefix: str = "") -> list[tuple[int, str]]:
    """The first ``count`` devices of a broker home whose ids start with ``prefix``, in id
    order, as (index, credentials file): a device's index is its place in this list."""
    ids = [d for d in home.devices() if d.startswith(prefix)]
    if count is not None:
        if len(ids) < count:
            raise ConfigError(
                f"{home.path} has {len(ids):,} devices{f' named {prefix}*' if prefix else ''}, "
                f"not {count:,}: add them with --provision (or `fedmq broker add-devices`)"
            )
        ids = ids[:count]
    return [(i, str(home.credentials_dir / f"{d}.toml")) for i, d in enumerate(ids)]


def provision(home, count: int, prefix: str) -> tuple[int, float]:
    """Bulk-add ``<prefix>NNNNN`` devices until the home has ``count`` of them; (added, s)."""
    have = {d for d in home.devices() if d.startswith(prefix)}
    width = max(5, len(str(count - 1)))
    wanted = [f"{prefix}{i:0{width}d}" for i in range(count)]
    missing = [d for d in wanted if d not in have]
    if not missing:
        return 0, 0.0
    started = time.perf_counter()
    home.add_devices(missing)
    home.reload()
    return len(missing), time.perf_counter() - started
