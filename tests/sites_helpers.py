"""Test helpers for sites: a site's broker bridged to a root federation (and, from
fedmq/forwarder.py, a TCP forwarder to put on the uplink and cut)."""

from __future__ import annotations

from pathlib import Path

from aggregator.upstream import Upstream
from fedmq.forwarder import Forwarder  # noqa: F401 (re-exported for tests)
from tests.helpers import Federation

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
