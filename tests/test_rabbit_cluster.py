"""fedmq on a clustered broker: RabbitMQ 3.10's MQTT plugin, three nodes on this machine.

One cluster for the module (booting three Erlang nodes takes ~20-30 s here):
federation "rabbit", bob, alice and 100 synthetic devices spread over the nodes,
the aggregator on the first node with retained copies on the others
(``broker/retained_mirror.py``). What RabbitMQ does differently from mosquitto,
each checked here on the real thing: MQTT 3.1.1 only (fedmq falls back and says
so), retained messages kept on the node that received them, '.' a topic level.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from broker import connection, messages, signals
from broker.connection import ConnectionWatch, connect_async, make_client
from broker.errors import ConfigError
from broker.rabbit_cluster import RabbitCluster, check_rabbit_name, topic_permissions
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.loadgen import expected_average, publish_all, signed_update
from tests.helpers import blobs_task, join, publish_as, wait_for
from tests.rabbit import RabbitFederation
from tests.test_bob_and_alice import EXAMPLE, centralized_gd

pytestmark = pytest.mark.mosquitto  # and each test on the cluster: rabbitmq
SYNTHETIC = [f"d{i:03d}" for i in range(100)]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    fed = RabbitFederation.start(
        tmp_path_factory.mktemp("rabbit"), "rabbit", ["bob", "alice", *SYNTHETIC], nodes=3
    )
    yield fed
    fed.close()


def model_from(fed: RabbitFederation, account: str, run_id: str, timeout: float = 30):
    """The retained model of run ``run_id`` as ``account`` sees it on its own node."""
    topic = Topics(fed.name).model
    node = fed.node_of(account)

    def current():
        payload = fed.retained_on(node, [topic], account).get(topic)
        model = messages.decode_model(payload) if payload else None
        return model if model is not None and model.run_id == run_id else None

    return wait_for(current, timeout, f"the model of run {run_id} on {node.name}")


@pytest.mark.rabbitmq
def test_the_cluster_has_three_nodes_and_spreads_the_devices(rabbit):
    status = rabbit.cluster.ctl(rabbit.cluster.nodes[0], "cluster_status")
    for node in rabbit.cluster.nodes:
        assert node.name in status
    spread = {n.name: 0 for n in rabbit.cluster.nodes}
    for device in rabbit.devices:
        spread[rabbit.node_of(device).name] += 1
    assert sorted(spread.values()) == [34, 34, 34]
    assert rabbit.node_of("bob") != rabbit.node_of("alice")


@pytest.mark.rabbitmq
def test_retained_messages_stay_on_the_node_that_received_them(rabbit):
    """Why the aggregator copies its retained messages: RabbitMQ does not replicate them."""
    a, b, _ = rabbit.cluster.nodes
    topic = Topics(rabbit.name).round
    settings = replace(rabbit.settings("fedmq-aggregator"), port=a.mqtt_port, cluster=())
    client = make_client(settings, "test-node-local", persistent=False)
    watch = ConnectionWatch(client, settings, logging.getLogger("test"), patient=False)
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        watch.wait_connected(15)
        client.publish(topic, b"node-local", qos=1, retain=True).wait_for_publish(10)
        assert rabbit.retained_on(a, [topic]) == {topic: b"node-local"}
        assert rabbit.retained_on(b, [topic]) == {}
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear it
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.rabbitmq
def test_mqtt5_refused_falls_back_to_311_and_says_so_once(rabbit, monkeypatch, caplog):
    monkeypatch.setattr(connection, "_speaks_311", set())
    monkeypatch.setattr(connection, "_told", set())
    settings = rabbit.settings("bob")
    assert settings.mqtt_version is None  # nothing asked for 3.1.1: found out
    got: queue.Queue = queue.Queue()
    clients = []
    with caplog.at_level(logging.INFO, logger="fedmq.connection"):
        for i in range(2):
            client = make_client(settings, f"test-fallback-{i}", persistent=True)
            client.on_connect = lambda c, u, f, rc, p: got.put((c, rc.is_failure))
            watch = ConnectionWatch(client, settings, logging.getLogger("t"), patient=False)
            connect_async(client, settings, persistent=True, receive_maximum=5)
            client.loop_start()
            clients.append(client)
            watch.wait_connected(15)
    try:
        results = [got.get(timeout=5) for _ in clients]
        assert [failure for _, failure in results] == [False, False]
        assert all(not c.mqtt5 for c in clients)
        lines = [r.getMessage() for r in caplog.records if "MQTT 3.1.1" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "does not speak MQTT 5" in lines[0] and "no receive maximum" in lines[0]
        assert settings.address in connection._speaks_311  # the second client started 3.1.1
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


@pytest.mark.rabbitmq
def test_the_fallback_probe_tells_rabbitmq_from_a_mosquitto_that_restarts(rabbit, federation):
    """A socket closed before CONNACK makes a client fall back only if a fresh MQTT 5
    CONNECT is closed unanswered too: mosquitto answers it (not authorized, no credentials),
    so a mosquitto that was restarting or full keeps its clients on MQTT 5."""
    assert connection.probe_mqtt5(rabbit.settings("bob")) == "closed"
    fed = federation(devices=["bob"])
    assert connection.probe_mqtt5(fed.settings("bob")) == "answered"
    fed.stop_broker()
    assert connection.probe_mqtt5(fed.settings("bob")) == "unknown"


@pytest.mark.rabbitmq
def test_mqtt_version_3_asked_for_explicitly(rabbit, monkeypatch, caplog):
    monkeypatch.setattr(connection, "_speaks_311", set())
    monkeypatch.setattr(connection, "_told", set())
    monkeypatch.setenv("FEDMQ_MQTT_VERSION", "3")
    settings = rabbit.settings("alice")
    client = make_client(settings, "test-explicit-311", persistent=False)
    assert not client.mqtt5
    watch = ConnectionWatch(client, settings, logging.getLogger("t"), patient=False)
    with caplog.at_level(logging.INFO, logger="fedmq.connection"):
        connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        watch.wait_connected(10)
        assert any("mqtt_version = 3" in r.getMessage() for r in caplog.records)
    finally:
        client.disconnect()
        client.loop_stop()
    monkeypatch.setenv("FEDMQ_MQTT_VERSION", "4")
    with pytest.raises(ConfigError, match="FEDMQ_MQTT_VERSION is '4'"):
        make_client(settings, "test-bad-version")


def test_names_with_a_dot_are_refused_for_rabbitmq(tmp_path):
    with pytest.raises(ConfigError, match="contains '.'"):
        check_rabbit_name("device id", "bob.pi")
    with pytest.raises(ConfigError, match="device id 'bob.pi'"):
        RabbitCluster.create(tmp_path / "c", "f", ["bob.pi"], nodes=1)


def test_a_clusters_ports_differ_even_when_the_draw_repeats_one(tmp_path, monkeypatch):
    """epmd and every node's listeners get different ports: a random port drawn twice
    once gave epmd's to node b's MQTT listener, and node b died with eaddrinuse."""
    import socket

    from broker import rabbit_cluster

    held = [socket.socket() for _ in range(7)]
    for s in held:
        s.bind(("127.0.0.1", 0))
    free = [s.getsockname()[1] for s in held]  # seven different ports, free once closed
    for s in held:
        s.close()

    class Repeating:  # the draw as it happened, and worse: every port twice in a row
        def __init__(self, seed):
            self.draws = iter([p for port in free for p in (port, port)])

        def randrange(self, low, high):
            return next(self.draws)

    monkeypatch.setattr(rabbit_cluster.random, "Random", Repeating)
    assert rabbit_cluster.listen_ports(7) == free
    monkeypatch.undo()
    cluster = RabbitCluster.create(tmp_path / "c", "f", ["bob"], nodes=3)
    ports = [cluster.epmd_port] + [p for n in cluster.nodes for p in (n.mqtt_port, n.dist_port)]
    assert len(set(ports)) == 7


def test_topic_permissions_mirror_the_mosquitto_acl():
    import re

    def allowed(pattern: str, key: str, user: str) -> bool:
        return re.search(pattern.replace("{username}", user), key) is not None

    write, read = topic_permissions("f", "device")
    assert allowed(write, "fedmq.f.updates.bob", "bob")
    assert not allowed(write, "fedmq.f.updates.alice", "bob")
    assert not allowed(write, "fedmq.f.model", "bob")
    assert allowed(read, "fedmq.f.model", "bob") and allowed(read, "fedmq.f.inbox.bob", "bob")
    assert not allowed(read, "fedmq.f.inbox.alice", "bob")
    assert not allowed(read, "fedmq.f.updates.*", "bob")
    write, read = topic_permissions("f", "aggregator")
    assert allowed(read, "fedmq.f.updates.*", "x") and allowed(read, "fedmq.f.status.bob", "x")
    assert not allowed(read, "fedmq.f.#", "x") and not allowed(write, "fedmq.f.control", "x")
    write, read = topic_permissions("f", "operator")
    assert allowed(write, "fedmq.f.control", "x") and not allowed(write, "fedmq.f.model", "x")


@pytest.mark.rabbitmq
def test_the_aggregator_reads_the_retained_statuses_of_every_node(rabbit, tmp_path):
    """RabbitMQ sends no retained message to a wildcard subscription (the aggregator's
    status/+), on any node: devices that came up before the aggregator's first session are
    found by exact topic on every node (before any other aggregator of the module ran)."""
    topics = Topics(rabbit.name)
    early = SYNTHETIC[90:96]  # two on each node
    assert len({rabbit.node_of(d).name for d in early}) == 3
    for device in early:
        status = signals.encode_status("online", device)
        publish_as(rabbit, device, topics.status(device), status, retain=True)
    node = rabbit.node_of(early[0])
    assert rabbit.retained_on(node, [topics.status_filter]) == {}  # the wildcard: nothing
    assert topics.status(early[0]) in rabbit.retained_on(node, [topics.status(early[0])])
    agg = rabbit.aggregator(
        tmp_path / "run",
        TaskSpec.load(blobs_task(tmp_path)),
        rounds=1,
        min_devices=len(rabbit.devices),  # never met: the round stays open
        deadline=None,
    )
    assert set(agg.config.devices) == set(rabbit.devices)
    thread = rabbit.in_thread(agg.run, timeout=60)
    wait_for(lambda: all(agg.status.get(d) == "online" for d in early), 30, "early statuses")
    assert set(agg.status) == set(early)
    agg.stop()
    assert join(thread, 30) == 0
    for device in early:  # cleared: a later round would wait for these devices to report
        publish_as(rabbit, device, topics.status(device), b"", retain=True)
    assert rabbit.retained_on(node, [topics.status(early[0])]) == {}


@pytest.mark.rabbitmq
def test_bob_and_alice_on_different_nodes_equal_centralized_training(rabbit, tmp_path):
    """The seed tutorial, exactly, with the aggregator, bob and alice on three nodes and
    the devices joining after the first model was announced (so each reads it from the
    retained copy on its own node)."""
    nodes = {rabbit.node_of(a).name for a in ("fedmq-aggregator", "bob", "alice")}
    assert len(nodes) == 3
    task = TaskSpec.load(EXAMPLE / "task.toml")
    agg = rabbit.aggregator(tmp_path / "run", task, rounds=5, min_devices=2)
    agg_thread = rabbit.in_thread(agg.run, timeout=120)
    for device in ("bob", "alice"):
        assert model_from(rabbit, device, agg.spec.run_id).round == 1  # the copy landed there
    agents = [
        rabbit.in_thread(
            rabbit.agent(d, EXAMPLE / f"{d}.csv", exit_when_done=True).run, timeout=120
        )
        for d in ("bob", "alice")
    ]
    assert join(agg_thread, 150) == 0
    for t in agents:
        assert join(t, 30) == 0
    central = centralized_gd(task, 5)
    for name in central:
        np.testing.assert_allclose(agg.weights[name].numpy(), central[name].numpy(), atol=1e-5)
    rows = agg.run_dir.metrics()
    assert [r["devices"] for r in rows] == [2] * 5
    # every node holds the final model and the final state, whichever node a reader uses
    topics = Topics(rabbit.name)
    for node in rabbit.cluster.nodes:
        found = rabbit.retained_on(node, [topics.model, topics.state])
        assert messages.decode_model(found[topics.model]).final
        assert b'"phase": "done"' in found[topics.state]


@pytest.mark.rabbitmq
def test_a_round_of_100_devices_spread_over_three_nodes(rabbit, tmp_path):
    agg = rabbit.aggregator(
        tmp_path / "run",
        TaskSpec.load(blobs_task(tmp_path)),
        rounds=1,
        min_devices=len(SYNTHETIC),
        deadline=None,
    )
    agg_thread = rabbit.in_thread(agg.run, timeout=180)
    # each device reads the model where it is connected: its own node's retained copy
    models = {
        n: model_from(rabbit, a, agg.spec.run_id) for n, a in _one_device_per_node(rabbit).items()
    }
    hashes = {m.model_hash for m in models.values()}
    assert len(models) == 3 and len(hashes) == 1
    model = next(iter(models.values()))
    weights = [(0.001 * i, 10 + i) for i in range(len(SYNTHETIC))]
    jobs, sent = [], threading.Semaphore(0)
    for device, (scale, n) in zip(SYNTHETIC, weights):
        device_id, payload = signed_update(
            rabbit.credentials(device), model, num_samples=n, scale=scale
        )
        jobs.append((rabbit.credentials(device), Topics(rabbit.name).update(device_id), payload))
    errors = publish_all(jobs, concurrency=16, on_published=sent.release)
    assert errors == []
    assert join(agg_thread, 120) == 0
    published = sum(1 for _ in iter(lambda: sent.acquire(blocking=False), False))
    assert published == len(SYNTHETIC)  # acknowledged by the broker, one by one
    assert agg.run_dir.metrics()[0]["devices"] == len(SYNTHETIC)
    expected = expected_average(model, weights)
    for name, tensor in agg.weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def _one_device_per_node(fed: RabbitFederation) -> dict:
    out = {}
    for device in SYNTHETIC:
        out.setdefault(fed.node_of(device).name, device)
    return out
