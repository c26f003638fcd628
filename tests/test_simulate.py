"""`fedmq simulate` against a real aggregator on the real mosquitto; bulk provisioning;
mosquitto's open-files limit; the one-loop client driver surviving a broker restart."""

from __future__ import annotations

import os
import queue
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from broker import signals
from broker.errors import ConfigError
from broker.home import BrokerHome, load_credentials
from broker.launcher import free_port, nofile_target, open_files_limit
from broker.passwords import read_password_file, verify_password
from broker.topics import Topics
from fedmq.cli_broker import broker as broker_cli
from fedmq.cli_broker import fd_limit_lines
from fedmq.secagg_fleet import expected_fedavg
from fedmq.sim_device import ModelCache, Tally, VirtualDevice, tls_context
from fedmq.sim_loop import ClientLoop
from fedmq.simulate import fleet
from tests.helpers import join, mqtt_session, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).resolve().parents[1]
DEVICES = 100


def test_a_100_device_simulated_fleet_follows_two_rounds_to_the_exact_fedavg(federation, tmp_path):
    ids = [f"sim{i:05d}" for i in range(DEVICES)]
    fed = federation(devices=["sim00000"])  # --provision adds the other 99 to the live broker
    agg, agg_thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=DEVICES)
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "simulate", "--home", str(fed.home.path)]
        + ["--devices", str(DEVICES), "--prefix", "sim", "--provision", "--processes", "2"]
        + ["--rate", "0", "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert join(agg_thread, 60) == 0
    assert f"provisioned {DEVICES - 1} devices" in proc.stdout
    assert fed.home.devices() == ids
    # the simulator's own count, against the aggregator's independent record
    assert f"updates: {2 * DEVICES} sent, {2 * DEVICES} acknowledged" in proc.stdout
    assert "rounds answered {1: 100, 2: 100}; finished 100" in proc.stdout
    metrics = agg.run_dir.metrics()
    assert [m["devices"] for m in metrics] == [DEVICES, DEVICES]
    assert all(sorted(m["contributors"]) == ids for m in metrics)
    assert all(not m["rejected"] for m in metrics)
    # every round is the exact FedAvg of the devices' synthetic updates (index = id order)
    for r in (1, 2):
        expected = expected_fedavg(agg.run_dir.checkpoint(r - 1), list(range(DEVICES)))
        for name, tensor in agg.run_dir.checkpoint(r).items():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    # each device left as an agent does: its retained status says offline
    statuses: queue.Queue = queue.Queue()
    with mqtt_session(fed.settings("fedmq-aggregator"), "test-status-reader") as client:
        client.on_message = lambda c, u, m: statuses.put((m.topic, m.payload))
        client.subscribe(Topics(fed.name).status_filter, qos=1)
        seen: dict[str, str] = {}
        wait_for(lambda: _drain(statuses, seen) >= DEVICES, 10, "every device's retained status")
    assert set(seen) == set(ids)
    assert set(seen.values()) == {"offline"}


def _drain(inbox: queue.Queue, seen: dict) -> int:
    while True:
        try:
            topic, payload = inbox.get_nowait()
        except queue.Empty:
            return len(seen)
        seen[topic.rsplit("/", 1)[1]] = signals.parse_status(payload).status


def test_a_device_the_broker_refuses_is_named_in_one_line_and_given_up(federation, tmp_path):
    ids = ["sim00000", "sim00001", "sim00002"]
    fed = federation(devices=ids)
    creds = fed.credentials("sim00001")
    creds.write_text(creds.read_text().replace('password = "', 'password = "wrong'))
    _, agg_thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=2)
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "simulate", "--home", str(fed.home.path)]
        + ["--processes", "1", "--rounds", "1", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert error_lines == ["Error: sim00001: broker refused the connection: Not authorized"], (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert "connected 2 " in proc.stdout  # the other two got in, and took part
    assert "rounds answered {1: 2}" in proc.stdout
    assert join(agg_thread, 30) == 0
    missing = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "simulate", "--home", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert missing.returncode == 1 and "is not a fedmq broker home" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_one_loop_redials_every_client_after_a_broker_restart(federation):
    ids = [f"r{i:02d}" for i in range(20)]
    fed = federation(devices=ids)
    tally = Tally(devices=len(ids))
    loop = ClientLoop(
        rate=0, on_error=lambda c, m, permanent: tally.error(m) if permanent else tally.retry(m)
    )
    creds = [load_credentials(fed.credentials(d)) for d in ids]
    context = tls_context(creds[0]["ca_file"], None, None)
    models = ModelCache(None)
    devices = [
        VirtualDevice(i, c, loop=loop, tally=tally, models=models, context=context, rounds=1)
        for i, c in enumerate(creds)
    ]
    for d in devices:
        d.start("127.0.0.1", fed.tls_port)

    def spin_until(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}: {tally}"
            loop.run_once(0.05)

    try:
        spin_until(lambda: tally.connected == len(ids), 20, "all connected")
        first_pid = fed.broker.pid
        fed.restart_broker()  # the fault: every connection drops at once
        assert fed.broker.pid != first_pid
        spin_until(lambda: tally.reconnects == len(ids), 30, "every client redialled")
        spin_until(lambda: tally.connected == len(ids), 10, "all connected again")
        assert tally.ever_connected == len(ids)
        assert loop.dials >= 2 * len(ids)
        assert tally.error_count == 0, tally.errors
    finally:
        for d in devices:
            d.finished = True
            d.client.disconnect()
        loop.close()


def test_a_broker_certificate_that_does_not_verify_is_a_permanent_refusal(federation, tmp_path):
    fed = federation(devices=["t0"])
    stranger = BrokerHome.create(tmp_path / "other", "other")  # another CA altogether
    tally = Tally(devices=1)
    loop = ClientLoop(rate=0)
    device = VirtualDevice(
        0,
        load_credentials(fed.credentials("t0")),
        loop=loop,
        tally=tally,
        models=ModelCache(None),
        context=tls_context(stranger.ca_path, None, None),
        rounds=1,
    )
    loop.on_error = lambda client, message, permanent: (
        tally.error(message),
        device.give_up() if permanent else None,
    )
    device.start("127.0.0.1", fed.tls_port)
    deadline = time.monotonic() + 10
    while tally.refused == 0 and time.monotonic() < deadline:
        loop.run_once(0.05)
    loop.close()
    assert tally.refused == 1 and tally.ever_connected == 0
    assert loop.dials == 1  # given up, not redialled
    assert "certificate does not verify" in tally.errors[0]


def test_bulk_provisioning_gives_each_device_its_own_secrets_in_one_pass(tmp_path):
    home = BrokerHome.create(tmp_path / "home", "bulk")
    ids = [f"b{i:03d}" for i in range(300)]
    paths = home.add_devices(ids)
    assert [p.name for p in paths] == [f"{d}.toml" for d in ids]
    hashes = read_password_file(home.passwd_path)
    assert set(ids) <= set(hashes) and len(hashes) == len(ids) + 2
    creds = [load_credentials(p) for p in paths]
    assert len({c["password"] for c in creds}) == len(ids)
    assert len({c["signing_key"].read_bytes() for c in creds}) == len(ids)
    for c in creds[:5]:
        assert verify_password(c["password"], hashes[c["device_id"]])
        assert c["identity_cert"] and c["registry_key"].is_file()
    assert sorted(home.device_public_keys()) == ids
    # all or nothing: a clash or a repeat adds no one and leaves no files behind
    for bad in (["b000", "new1"], ["new1", "new1"], ["new1", "fedmq-x"]):
        with pytest.raises(ConfigError):
            home.add_devices(bad)
    assert len(home.devices()) == len(ids)
    assert not (home.credentials_dir / "new1.toml").exists()
    # the CLI form
    result = CliRunner().invoke(
        broker_cli, ["add-devices", "--prefix", "c", "--count", "12", "--home", str(home.path)]
    )
    assert result.exit_code == 0, result.output
    assert "added 12 devices (c00000 ... c00011)" in result.output
    assert [d for d, _ in _ids(fleet(home, None, "c"))] == [f"c{i:05d}" for i in range(12)]
    with pytest.raises(ConfigError, match="has 12 devices named c"):
        fleet(home, 13, "c")


def _ids(devices):
    return [(Path(p).stem, i) for i, p in devices]


def test_mosquitto_gets_the_hard_open_files_limit_not_the_inherited_soft_one(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-files limit here is {hard}: nothing to raise to")
    home = BrokerHome.create(tmp_path / "home", "fds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what mosquitto would inherit
    try:
        running = home.start(None, free_port())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        got = open_files_limit(running.pid)
        assert running.fd_limit == got
        assert got is not None and got >= min(hard, 1 << 20) > 1024
        text = Path(f"/proc/{running.pid}/limits").read_text()
        assert f"Max open files            {got}" in text
    finally:
        running.stop()


def test_the_fd_limit_policy_and_what_broker_up_says_about_it():
    assert nofile_target(1024, 4096, privileged=False, ceiling=1 << 20) == (4096, 4096)
    assert nofile_target(1024, 4096, privileged=True, ceiling=1 << 20) == (1 << 20, 1 << 20)
    assert nofile_target(1024, 4096, privileged=True, ceiling=65536) == (65536, 65536)
    assert nofile_target(1024, 1 << 21, privileged=True, ceiling=1 << 20) == (1 << 21, 1 << 21)
    ok = fd_limit_lines(20000, 10_000)
    assert ok == ["  file descriptors: 20,000 (room for about 19,936 clients)"]
    short = fd_limit_lines(1024, 10_000)
    assert len(short) == 2 and "10,000 devices need about 10,066" in short[1]
    assert "connections past 960 will be refused" in short[1]


def test_an_agent_does_not_subscribe_to_the_state_the_aggregator_keeps_republishing(
    federation, tmp_path
):
    """The broker would copy every state update (up to 4 a second) to every device;
    the agent never reads it. The simulated devices subscribe as the agent does."""
    fed = federation(devices=["bob"])
    data = write_blobs(tmp_path / "data", ["bob"])["bob"]
    _, agg_thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=1)
    agent = fed.agent("bob", data, exit_when_done=True)
    topics: list[str] = []
    route = agent.client.on_message

    def record(client, userdata, msg):
        topics.append(msg.topic)
        route(client, userdata, msg)

    agent.client.on_message = record
    assert join(fed.in_thread(agent.run, timeout=60), 90) == 0
    assert join(agg_thread, 30) == 0
    t = Topics(fed.name)
    assert topics.count(t.model) >= 3  # two rounds and the final model
    assert t.state not in topics
    # and the aggregator did publish state meanwhile: a subscriber would have had it
    with mqtt_session(fed.settings("fedmq-operator"), "test-state-reader") as client:
        got: queue.Queue = queue.Queue()
        client.on_message = lambda c, u, m: got.put(m.topic)
        client.subscribe(t.state, qos=1)
        assert got.get(timeout=10) == t.state
