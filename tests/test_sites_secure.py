"""Per-site secure sums: each site runs SecAgg+ among its own devices (the edge
aggregator learns only the site's sum) and forwards that sum as its partial result; the
root's FedAvg over the sites equals the flat plain FedAvg within the secure sum's
quantization error."""

from __future__ import annotations

import pytest

from aggregator.upstream import site_task
from broker.errors import ConfigError
from broker.task import TaskSpec
from tests.helpers import blobs_task, join, write_blobs
from tests.sites_helpers import agents, make_site, run_sites

pytestmark = pytest.mark.mosquitto
DEVICES = [f"dev{i}" for i in range(6)]
ROUNDS = 2
SECURE = {"clip_range": 2.0, "phase_deadline": 20}


def test_secure_sums_at_two_sites_end_with_the_flat_fedavg_model(federation, tmp_path):
    files = write_blobs(tmp_path / "data", DEVICES, samples=60)
    task = TaskSpec.load(blobs_task(tmp_path))

    flat = federation(devices=DEVICES, name="flat")
    flat_agg = flat.aggregator(tmp_path / "run-flat", task, rounds=ROUNDS, min_devices=6)
    flat_thread = flat.in_thread(flat_agg.run, timeout=150)
    for t in agents(flat, files, DEVICES, timeout=150):
        assert join(t, 170) == 0
    assert join(flat_thread, 30) == 0

    root = federation(devices=[], name="root")
    root_agg = root.aggregator(tmp_path / "run-root", task, rounds=ROUNDS, min_devices=2)
    root_thread = root.in_thread(root_agg.run, timeout=150)
    sites = [
        make_site(root, tmp_path / "farm-a", "farm-a", "site-a", DEVICES[:3]),
        make_site(root, tmp_path / "farm-b", "farm-b", "site-b", DEVICES[3:]),
    ]

    def start(site, upstream):
        secure_task = site_task(upstream.first_model(30).task, SECURE)
        return site.aggregator(
            tmp_path / f"run-{site.name}", secure_task, upstream=upstream,
            min_devices=3, deadline=60,
        )  # fmt: skip

    site_aggs, _ = run_sites(sites, root_thread, start, files, timeout=150, root_timeout=170)

    diff = max(
        float((root_agg.weights[k].double() - v.double()).abs().max())
        for k, v in flat_agg.weights.items()
    )
    print(f"\nmax |sites with secure sums - flat FedAvg| after {ROUNDS} rounds: {diff:.2e}")
    assert 0 < diff < 1e-5  # quantized at the sites (not identical), within its error
    rows = root_agg.run_dir.metrics()
    assert [r["contributors"] for r in rows] == [["site-a", "site-b"]] * ROUNDS
    assert [r["devices_behind_partials"] for r in rows] == [6] * ROUNDS
    assert [r["samples"] for r in rows] == [r["samples"] for r in flat_agg.run_dir.metrics()]
    for agg, site in zip(site_aggs, sites):
        site_rows = agg.run_dir.metrics()
        assert [r["round"] for r in site_rows] == list(range(1, ROUNDS + 1))
        for r in site_rows:  # the site summed masked inputs: it never saw one update
            assert r["secure_aggregation"]["roster"] == 3 and r["contributors"] == site.devices
    assert root_agg.state.totals["accepted"] == 2 * ROUNDS


def test_the_root_running_secure_aggregation_over_sites_is_refused(tmp_path):
    task = TaskSpec.load(blobs_task(tmp_path))
    secure_root = TaskSpec(**{**task.__dict__, "secure_aggregation": SECURE})
    with pytest.raises(ConfigError, match="run the secure sums at the sites"):
        site_task(secure_root)
    assert site_task(task, SECURE).secure_aggregation == SECURE
    assert site_task(task).secure_aggregation == {}
