"""Benchmark: sites with edge aggregators against the flat federation, per round.

    python scripts/bench_sites.py [--devices-per-site 25] [--rounds 3] [--hidden 256,256]

Two sites of N devices each, every site behind its own uplink: a TCP forwarder
(fedmq/forwarder.py) that counts the bytes it carries. Devices are light: each
round every device downloads the global model in its own MQTT session (TLS,
its own account) and publishes one signed synthetic update (fedmq/loadgen.py).

- flat: every device is an account of the root's broker and dials it through
  its site's uplink: n model downloads and n updates cross each uplink a round;
- sites: each site has its own mosquitto (devices dial it locally) bridged to
  the root's through the uplink, and an edge aggregator: one model comes down
  the bridge and one partial result goes up, whatever n.

Prints, per round and setup, the wall time from the model's announcement at the
root to the root's checkpoint and the root's own round time (metrics.jsonl);
then the bytes over both uplinks together (TLS and MQTT included) from the
root aggregator's start to the end of the run, per round, beside the payloads
that make them; then checks that both setups end with the same model (1e-6).
The flat devices open a session for each download and each update (TLS
handshakes included: real devices keep theirs open); the sites' bridges keep
one session open and also bring down the final model.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from aggregator.service import Aggregator
from broker import messages
from broker.home import settings_from_credentials
from broker.retained import read_retained
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.forwarder import Forwarder
from fedmq.loadgen import publish_all, signed_update
from fedmq.local import AGGREGATOR, LocalFederation
from fedmq.synthetic import mlp_task


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def _model(fed: LocalFederation, account: str) -> messages.ModelMessage | None:
    topic = Topics(fed.name).model
    found = read_retained(fed.settings(account), [topic], client_prefix="bench-model")
    return messages.decode_model(found[topic]) if topic in found else None


def _round_model(fed: LocalFederation, number: int) -> messages.ModelMessage:
    def announced():
        model = _model(fed, AGGREGATOR)
        return model if model is not None and model.round == number else None

    return _wait(announced, 60, f"{fed.name}'s model of round {number}")


def _device_round(fed, devices, model, weights, concurrency) -> None:
    """Every device downloads the model in its own session, then publishes its update."""

    def download(device: str) -> None:
        settings = settings_from_credentials(fed.credentials(device))
        topic = Topics(fed.name).model
        got = read_retained(settings, [topic], client_prefix=f"bench-{device}")
        if topic not in got:
            raise RuntimeError(f"{device} got no model")

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(download, devices))
    jobs = []
    for device, (scale, n) in zip(devices, weights):
        _, payload = signed_update(fed.credentials(device), model, num_samples=n, scale=scale)
        jobs.append((fed.credentials(device), Topics(fed.name).update(device), payload))
    errors = publish_all(jobs, concurrency=concurrency)
    if errors:
        raise RuntimeError(f"publishing failed: {errors[:3]}")


def _in_thread(target):
    result: dict = {}

    def run():
        try:
            result["value"] = target()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _weights(devices: list[str]) -> list[tuple[float, int]]:
    """(scale, num_samples) of each device's update: the same device, the same update."""
    return [(0.001 * (int(d[1:]) + 1), 20 + int(d[1:])) for d in devices]


def _bytes(uplinks) -> tuple[int, int]:
    return sum(u.up_bytes for u in uplinks), sum(u.down_bytes for u in uplinks)


def _settle(uplinks) -> tuple[int, int]:
    """The counters once nothing has moved for half a second (the relay drained)."""
    last = _bytes(uplinks)
    while True:
        time.sleep(0.5)
        now = _bytes(uplinks)
        if now == last:
            return now
        last = now


def flat(work: Path, task: TaskSpec, per_site: int, rounds: int, conc: int):
    devices = [f"d{i:03d}" for i in range(2 * per_site)]
    root = LocalFederation.create(work / "flat", "flat", [])
    root.start_broker()
    uplinks = [Forwarder(("127.0.0.1", root.tls_port)) for _ in range(2)]
    try:
        for i, device in enumerate(devices):  # a device dials the root over its site's uplink
            root.home.add_device(device, broker=uplinks[i // per_site].address)
        root.home.reload()
        config = root.aggregator_config(
            work / "run-flat", task, rounds=rounds, min_devices=len(devices), deadline=None
        )
        agg = Aggregator(replace(config, plot=False))
        before = _bytes(uplinks)
        thread, result = _in_thread(agg.run)
        rows = _drive(rounds, agg, [(root, devices)], conc)
        thread.join(60)
        if "error" in result:
            raise result["error"]
        after = _settle(uplinks)
        return rows, (after[0] - before[0], after[1] - before[1]), agg.weights
    finally:
        for uplink in uplinks:
            uplink.close()
        root.close()


def sites(work: Path, task: TaskSpec, per_site: int, rounds: int, conc: int):
    devices = [f"d{i:03d}" for i in range(2 * per_site)]
    root = LocalFederation.create(work / "root", "root", [])
    root.start_broker()
    uplinks = [Forwarder(("127.0.0.1", root.tls_port)) for _ in range(2)]
    site_feds, upstreams, threads = [], [], []
    try:
        for i, name in enumerate(("farm-a", "farm-b")):
            mine = devices[i * per_site : (i + 1) * per_site]
            site = root.add_site(
                work / name, name, f"site-{name[-1]}", mine, bridge_to=uplinks[i].address
            )
            site.start_broker()
            site_feds.append(site)
        _wait(lambda: all(u.open_connections for u in uplinks), 30, "the bridges")
        config = root.aggregator_config(
            work / "run-root", task, rounds=rounds, min_devices=2, deadline=None
        )
        agg = Aggregator(replace(config, plot=False))
        before = _settle(uplinks)
        root_thread, root_result = _in_thread(agg.run)
        for site in site_feds:
            upstream = site.upstream()
            upstream.start()
            upstreams.append(upstream)
            config = site.aggregator_config(
                work / f"run-{site.name}",
                upstream.first_model(60).task,
                min_devices=per_site,
                deadline=None,
                upstream=upstream,
            )
            site_agg = Aggregator(replace(config, plot=False))
            threads.append(_in_thread(site_agg.run))
        rows = _drive(rounds, agg, [(s, s.devices) for s in site_feds], conc)
        root_thread.join(60)
        for thread, _ in threads:
            thread.join(60)
        for result in [root_result, *(r for _, r in threads)]:
            if "error" in result:
                raise result["error"]
        after = _settle(uplinks)
        partial = upstreams[0].forwarded[0][1]
        return rows, (after[0] - before[0], after[1] - before[1]), agg.weights, partial
    finally:
        for upstream in upstreams:
            upstream.stop()
        for site in site_feds:
            site.close()
        for uplink in uplinks:
            uplink.close()
        root.close()


def _drive(rounds, root_agg, groups, conc) -> list[dict]:
    """Play the devices' part round by round; per round: wall time, root's round time."""
    rows = []
    for number in range(1, rounds + 1):
        root_model = _round_model_of_agg(root_agg, number)
        start = time.perf_counter()
        for fed, devices in groups:
            at_site = fed.name != root_agg.config.federation
            model = _round_model(fed, number) if at_site else root_model
            _device_round(fed, devices, model, _weights(devices), conc)
        _wait(lambda n=number: root_agg.state.completed_round >= n, 120, f"round {number}")
        seconds = time.perf_counter() - start
        last = root_agg.run_dir.metrics()[-1]
        rows.append(
            {
                "round": number,
                "wall_seconds": round(seconds, 3),
                "root_seconds": last["seconds"],
                "update_bytes": last["update_bytes"],
                "model_bytes": last["model_bytes"],
                "devices": last["devices"],
            }
        )
    return rows


def _round_model_of_agg(agg: Aggregator, number: int) -> messages.ModelMessage:
    def announced():
        current = agg.current
        if current is None or current.number != number or current.model_payload is None:
            return None
        return messages.decode_model(current.model_payload)

    return _wait(announced, 60, f"the root's model of round {number}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices-per-site", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    hidden = [int(h) for h in args.hidden.split(",")]
    torch.set_num_threads(1)
    n, rounds = args.devices_per_site, args.rounds
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-sites-") as tmp:
        work = Path(tmp)
        (work / "task.toml").write_text(mlp_task(hidden))
        task = TaskSpec.load(work / "task.toml")
        print(f"2 sites x {n} devices, MLP 64-{'-'.join(map(str, hidden))}-8, {rounds} rounds")
        flat_rows, flat_bytes, flat_weights = flat(work, task, n, rounds, args.concurrency)
        site_rows, site_bytes, site_weights, partial = sites(
            work, task, n, rounds, args.concurrency
        )
    print(f"{'setup':<10}{'round':>6}{'wall s':>9}{'root s':>9}")
    for label, rows in (("flat", flat_rows), ("two sites", site_rows)):
        for r in rows:
            print(f"{label:<10}{r['round']:>6}{r['wall_seconds']:>9.3f}{r['root_seconds']:>9.3f}")
    for label, rows in (("flat", flat_rows), ("two sites", site_rows)):
        mean = sum(r["wall_seconds"] for r in rows) / len(rows)
        print(f"{label}: {mean:.3f} s a round (mean wall time)")
    model = flat_rows[0]["model_bytes"]
    update = flat_rows[0]["update_bytes"] // flat_rows[0]["devices"]
    print("bytes over both uplinks a round (measured, TLS and MQTT included):")
    for label, (up, down) in (("flat", flat_bytes), ("two sites", site_bytes)):
        print(f"  {label:<10} up {up // rounds:>12,}   down {down // rounds:>12,}")
    print("payloads a round over both uplinks:")
    print(
        f"  flat       up {2 * n} updates x {update:,} = {2 * n * update:,};"
        f" down {2 * n} models x {model:,} = {2 * n * model:,}"
    )
    print(
        f"  two sites  up 2 partials x {partial:,} = {2 * partial:,};"
        f" down 2 models x {model:,} = {2 * model:,}"
    )
    gap = max((site_weights[k] - v).abs().max().item() for k, v in flat_weights.items())
    print(f"max |two sites - flat| over the final model: {gap:.2e}")
    if not gap <= 1e-6:
        raise SystemExit("the two-site model differs from the flat one")


if __name__ == "__main__":
    main()
