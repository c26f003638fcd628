"""Fixtures: a real, secured mosquitto on free loopback ports, started and stopped per test.

No mock broker: every test that talks MQTT talks to mosquitto, configured by
fedmq's own ``BrokerHome`` (passwords, ACL, TLS), exactly as ``fedmq broker up``.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import Federation


def pytest_configure(config):
    if shutil.which("mosquitto") is None and not __import__("os").path.exists(
        "/usr/sbin/mosquitto"
    ):
        raise pytest.UsageError("mosquitto is not installed: run `make test` (it installs it)")
    # In-process agents and aggregators train and average with one torch thread, as the
    # processes fedmq.local spawns do (--threads 1) and as every test after test_demo.py did
    # anyway (run_demo sets it for the process). Two intra-op threads on a busy 2-core
    # machine made a small training 10x slower: a broker stop meant to last one training
    # outlasted a 60 s wait.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    from broker.rabbit_cluster import rabbit_installed

    if rabbit_installed():
        return
    skip = pytest.mark.skip(
        reason="rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
    )
    for item in items:
        if "rabbitmq" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def federation(tmp_path):
    """Factory: ``federation(devices=[...])`` -> a started, secured broker for that fleet."""
    started: list[Federation] = []

    def make(devices=("bob", "alice"), name="test", **kwargs) -> Federation:
        fed = Federation.start(tmp_path / f"fed-{len(started)}", name, list(devices), **kwargs)
        started.append(fed)
        return fed

    yield make
    for fed in started:
        fed.close()
