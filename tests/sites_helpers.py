"""Test helpers for sites: a site's broker bridged to a root federation (and, from
fedmq/forwarder.py, a TCP forwarder to put on the uplink and cut)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from aggregator.service import Aggregator
from aggregator.upstream import Upstream
from fedmq.forwarder import Forwarder  # noqa: F401 (re-exported for tests)
from tests.helpers import Federation, join

AGGREGATOR = "fedmq-aggregator"


def make_site(
    root: Federation,
    path: Path,
    name: str,
    account: str,
    devices: list[str],
    *,
    bridge_to: str | None = None,
) -> Federation:
    """A started site broker of federation ``name`` whose bridge logs in to ``root`` as its
    device ``account`` (added to the root here), with ``devices`` of its own."""
    site = root.add_site(path, name, account, devices, bridge_to=bridge_to, cls=Federation)
    site.threads = []
    site.start_broker()
    return site


def site_upstream(site: Federation) -> Upstream:
    """The site aggregator's link to the root, connected to the site's broker."""
    upstream = site.upstream()
    upstream.start()
    return upstream


def agents(fed: Federation, data: dict, devices: list[str], timeout: float = 120):
    """Agents of ``devices`` in threads, each leaving when the run is done."""
    return [
        fed.in_thread(fed.agent(d, data[d], exit_when_done=True).run, timeout=timeout)
        for d in devices
    ]


def run_sites(
    sites: list[Federation],
    root_thread: threading.Thread,
    start: Callable[[Federation, Upstream], Aggregator],
    data: dict,
    *,
    timeout: float = 150,
    root_timeout: float = 170,
) -> tuple[list[Aggregator], list[Upstream]]:
    """Each site's link to the root, its aggregator (``start(site, upstream)``) and its
    devices' agents, until the root's run ends; then the sites' brokers and links close."""
    upstreams: list[Upstream] = []
    site_aggs: list[Aggregator] = []
    threads = []
    try:
        for site in sites:
            upstreams.append(site_upstream(site))
            site_aggs.append(start(site, upstreams[-1]))
            threads.append(site.in_thread(site_aggs[-1].run, timeout=timeout))
            threads += agents(site, data, site.devices, timeout)
        assert join(root_thread, root_timeout) == 0
        for t in threads:
            assert join(t, 30) == 0
    finally:
        for site in sites:
            site.close()
        for upstream in upstreams:
            upstream.stop()
    return site_aggs, upstreams
