"""A federation on a RabbitMQ cluster (``broker/rabbit_cluster.py``) for the tests.

The same surface as ``tests.helpers.Federation`` (credentials, settings,
in-process agents and aggregators), with the broker being 2-3 RabbitMQ nodes
and each device's credentials naming the node it dials.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from broker.rabbit_cluster import RabbitCluster, RabbitNode
from broker.retained import read_retained
from tests.helpers import Federation


class RabbitFederation(Federation):
    cluster: RabbitCluster

    @classmethod
    def start(cls, path: Path, name: str, devices: list[str], nodes: int = 3):  # type: ignore[override]
        cluster = RabbitCluster.create(path, name, devices, nodes=nodes)
        fed = cls(cluster.home, name, list(devices))
        fed.cluster = cluster
        fed.threads = []
        cluster.start()
        return fed

    def start_broker(self):  # the cluster is started by ``start``
        raise NotImplementedError("RabbitFederation: use cluster.start()")

    def stop_broker(self) -> None:
        self.cluster.stop()

    def node_of(self, account: str) -> RabbitNode:
        return self.cluster.node_of(account)

    def retained_on(
        self, node: RabbitNode, topics: list[str], account: str = "fedmq-aggregator"
    ) -> dict[str, bytes]:
        """{topic: payload} of the retained messages that ``node`` itself holds."""
        settings = replace(self.settings(account), port=node.mqtt_port, cluster=())
        return read_retained(settings, topics)
