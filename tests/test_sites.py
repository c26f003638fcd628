"""Sites (issue 13 item 2): each site has its own mosquitto bridged to the root's and an
edge aggregator that sends ONE signed partial result a round upstream.

Real mosquittos everywhere: the root's, one per site, the bridges fedmq writes between
them; device agents train in threads. A two-site federation ends with the flat run's
model, and a site whose uplink is cut after its devices reported finishes the round
once the uplink returns."""

from __future__ import annotations

import time

import pytest
import torch

from broker import signals
from broker.errors import FedmqError
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.loadgen import expected_average, publish_all, signed_update
from tests.helpers import (
    blobs_task,
    current_model,
    join,
    publish_as,
    wait_for,
    write_blobs,
)
from tests.sites_helpers import Forwarder, agents, make_site, run_sites, site_upstream

pytestmark = pytest.mark.mosquitto

ROUNDS = 3
DEVICES = ["d1", "d2", "d3", "d4"]


def _site_aggregator(site, tmp_path, upstream, **options):
    """A site's edge aggregator in a thread, on the task it read from the root's model."""
    task = upstream.first_model(30).task
    agg = site.aggregator(tmp_path / f"run-{site.name}", task, upstream=upstream, **options)
    return agg, site.in_thread(agg.run, timeout=120)


def test_two_sites_end_with_the_flat_model(federation, tmp_path):
    # unequal sites (3 devices of 40 samples, 1 of 70): weighting a site by anything but
    # its devices' total samples (its device count, say, or 1) would change the model
    data = write_blobs(tmp_path / "data", DEVICES[:3], samples=40)
    data |= write_blobs(tmp_path / "data-b", DEVICES[3:], samples=70, seed=1)
    task = TaskSpec.load(blobs_task(tmp_path))

    # the flat run: every device on the root's broker
    flat = federation(devices=DEVICES, name="flat")
    flat_agg = flat.aggregator(tmp_path / "run-flat", task, rounds=ROUNDS, min_devices=4)
    flat_thread = flat.in_thread(flat_agg.run, timeout=120)
    flat_agents = agents(flat, data, DEVICES)
    assert join(flat_thread, 150) == 0
    for t in flat_agents:
        assert join(t, 30) == 0

    # two sites of two devices each, bridged to the root, whose devices are the sites
    root = federation(devices=[], name="root")
    sites = [
        make_site(root, tmp_path / "farm-a", "farm-a", "site-a", DEVICES[:3]),
        make_site(root, tmp_path / "farm-b", "farm-b", "site-b", DEVICES[3:]),
    ]
    root_agg = root.aggregator(tmp_path / "run-root", task, rounds=ROUNDS, min_devices=2)
    root_thread = root.in_thread(root_agg.run, timeout=120)
    site_aggs, upstreams = run_sites(
        sites,
        root_thread,
        lambda site, upstream: site.aggregator(
            tmp_path / f"run-{site.name}",
            upstream.first_model(30).task,  # the task the site read from the root's model
            upstream=upstream,
            min_devices=len(site.devices),
        ),
        data,
        timeout=120,
        root_timeout=150,
    )

    for name, tensor in flat_agg.weights.items():
        torch.testing.assert_close(root_agg.weights[name], tensor, rtol=0, atol=1e-6)
    # not vacuous: three rounds moved the model well beyond the tolerance
    moved = max((root_agg.weights[n] - t).abs().max().item() for n, t in initial(task).items())
    assert moved > 1e-2
    gap = max((root_agg.weights[n] - t).abs().max().item() for n, t in flat_agg.weights.items())

    root_rows, flat_rows = root_agg.run_dir.metrics(), flat_agg.run_dir.metrics()
    assert [r["contributors"] for r in root_rows] == [["site-a", "site-b"]] * ROUNDS
    assert [r["samples"] for r in root_rows] == [r["samples"] for r in flat_rows]
    assert [r["devices_behind_partials"] for r in root_rows] == [4] * ROUNDS
    for agg, upstream, site in zip(site_aggs, upstreams, sites):
        rows = agg.run_dir.metrics()
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        assert all(r["devices"] == len(site.devices) and r["partial_bytes"] > 0 for r in rows)
        assert [n for n, _ in upstream.forwarded] == list(range(1, ROUNDS + 1))
        assert agg.phase == "done"
        state = agg.state_snapshot()
        assert state["rounds"] is None and state["upstream"]["partials_sent"] == ROUNDS
    # what the root accepted is exactly what the sites sent: one partial a site a round
    assert root_agg.state.totals["accepted"] == 2 * ROUNDS
    print(
        f"\nmax |two sites - flat| = {gap:.2e}, moved from the initial model by {moved:.3f};",
        "round seconds flat:",
        [r["seconds"] for r in flat_rows],
        "two sites:",
        [r["seconds"] for r in root_rows],
        "partial bytes:",
        [b for _, b in upstreams[0].forwarded],
        "update bytes (flat, 4 devices):",
        [r["update_bytes"] for r in flat_rows],
    )


def initial(task):
    from aggregator.service import initial_weights

    return initial_weights(task)


def _site_model(site, number, timeout=30.0):
    """The site's retained model once it announces round ``number`` (as its device d1 sees it)."""

    def announced():
        try:
            model = current_model(site, "d1", timeout=2)
        except Exception:  # queue.Empty: nothing retained yet
            return None
        return model if model.round == number else None

    return wait_for(announced, timeout, f"the site to announce round {number}", interval=0.2)


def _publish_site_updates(site, model, weights):
    jobs = []
    for device, (scale, n) in zip(site.devices, weights):
        _, payload = signed_update(site.credentials(device), model, num_samples=n, scale=scale)
        jobs.append((site.credentials(device), Topics(site.name).update(device), payload))
    assert publish_all(jobs, concurrency=2) == []


def test_a_site_survives_its_uplink_dropping_mid_round(federation, tmp_path):
    root = federation(devices=[], name="root")
    root_agg = root.aggregator(
        tmp_path / "run-root", TaskSpec.load(blobs_task(tmp_path)), rounds=2, min_devices=1
    )
    root_thread = root.in_thread(root_agg.run, timeout=120)
    uplink = Forwarder(("127.0.0.1", root.tls_port))
    site = make_site(
        root, tmp_path / "farm-a", "farm-a", "site-a", ["d1", "d2"], bridge_to=uplink.address
    )
    upstream = site_upstream(site)
    try:
        site_agg, site_thread = _site_aggregator(site, tmp_path, upstream, min_devices=2)
        weights = [(0.01, 30), (-0.02, 50)]

        model1 = _site_model(site, 1)
        assert uplink.open_connections == 1
        uplink.cut()
        sent_before = uplink.up_bytes
        _publish_site_updates(site, model1, weights)
        # the site has its devices' updates and has made its partial result ...
        wait_for(lambda: upstream.forwarded, 30, "the site's partial result")
        partial_bytes = upstream.forwarded[0][1]
        # ... which has not reached the root: the cut landed
        time.sleep(2.0)
        assert root_agg.state.completed_round == 0
        assert root_agg.current is not None and root_agg.current.accepted == 0
        assert uplink.up_bytes == sent_before and uplink.open_connections == 0

        uplink.restore()
        wait_for(lambda: root_agg.state.completed_round == 1, 60, "the root to close round 1")
        assert uplink.up_bytes - sent_before > partial_bytes  # it crossed the uplink now
        model2 = _site_model(site, 2)
        _publish_site_updates(site, model2, weights)
        assert join(root_thread, 60) == 0
        assert join(site_thread, 30) == 0
    finally:
        site.close()
        upstream.stop()
        uplink.close()

    # the round the uplink dropped in ended with the model it would have had anyway
    round1 = root_agg.run_dir.checkpoint(1)
    for name, tensor in expected_average(model1, weights).items():
        torch.testing.assert_close(round1[name], tensor, rtol=0, atol=1e-6)
    for name, tensor in expected_average(model2, weights).items():
        torch.testing.assert_close(root_agg.weights[name], tensor, rtol=0, atol=1e-6)
    # the site's devices trained round 2 on the root's model of round 2
    for name, tensor in round1.items():
        torch.testing.assert_close(model2.tensors[name], tensor, rtol=0, atol=0)
    # one partial a round, counted once at the root
    assert [n for n, _ in upstream.forwarded] == [1, 2]
    assert root_agg.state.totals["accepted"] == 2
    assert site_agg.phase == "done"


def test_a_site_joins_late_beside_a_direct_device_and_resumes(federation, tmp_path):
    """The root has a device of its own and a site that comes up at round 2: the site's
    first round is the root's round 2. The site stops after it and resumes for round 3."""
    root = federation(devices=["direct"], name="root")
    root_agg = root.aggregator(
        tmp_path / "run-root", TaskSpec.load(blobs_task(tmp_path)), rounds=3, min_devices=1
    )
    root_thread = root.in_thread(root_agg.run, timeout=120)
    direct_topic = Topics("root").update("direct")

    def direct_update(model, scale, n):
        _, payload = signed_update(root.credentials("direct"), model, num_samples=n, scale=scale)
        assert publish_all([(root.credentials("direct"), direct_topic, payload)]) == []

    online = signals.encode_status("online", "direct")  # the root waits for it, too
    publish_as(root, "direct", Topics("root").status("direct"), online, retain=True)
    wait_for(lambda: root_agg.status.get("direct") == "online", 20, "direct online")
    model1 = current_model(root, "direct")
    direct_update(model1, 0.03, 40)
    wait_for(lambda: root_agg.state.completed_round == 1, 30, "round 1 without the site")

    site = make_site(root, tmp_path / "farm-a", "farm-a", "site-a", ["d1"])
    run_dir = tmp_path / "run-farm-a"
    upstream = site_upstream(site)
    try:
        task = upstream.first_model(30).task
        site_agg = site.aggregator(run_dir, task, upstream=upstream, min_devices=1, stop_after=2)
        site_thread = site.in_thread(site_agg.run, timeout=60)
        wait_for(lambda: root_agg.status.get("site-a") == "online", 20, "the site at the root")
        expected = {}
        for number, resumed in ((2, False), (3, True)):
            site_model = _site_model(site, number)
            root_model = current_model(root, "direct")
            assert root_model.round == number
            _publish_site_updates(site, site_model, [(-0.01, 60)])
            direct_update(root_model, 0.03, 40)
            expected[number] = expected_average(root_model, [(0.03, 40), (-0.01, 60)])
            if not resumed:
                assert join(site_thread, 30) == 0  # stop_after=2: it leaves after round 2
                upstream.stop()
                wait_for(lambda: root_agg.current.number == 3, 30, "the root's round 3")
                upstream = site_upstream(site)
                site_agg = site.aggregator(run_dir, None, upstream=upstream, resume=True)
                site_thread = site.in_thread(site_agg.run, timeout=60)
                wait_for(lambda: root_agg.status.get("site-a") == "online", 20, "site back")
        assert join(root_thread, 60) == 0
        assert join(site_thread, 30) == 0
        # a site run dir follows one root run: another run's models stop it, saying why
        (run_dir / "partials" / "root_run_id").write_text("another-run")
        upstream.stop()
        upstream = site_upstream(site)
        stray = site.aggregator(run_dir, None, upstream=upstream, resume=True)
        with pytest.raises(FedmqError, match="started another run"):
            join(site.in_thread(stray.run, timeout=30), 40)
    finally:
        site.close()
        upstream.stop()

    rows = root_agg.run_dir.metrics()
    assert [r["contributors"] for r in rows] == [["direct"]] + [["direct", "site-a"]] * 2
    assert [r["round"] for r in site_agg.run_dir.metrics()] == [2, 3]  # joined at round 2
    for number in (2, 3):
        ckpt = root_agg.run_dir.checkpoint(number)
        for name, tensor in expected[number].items():
            torch.testing.assert_close(ckpt[name], tensor, rtol=0, atol=1e-6)
    assert root_agg.state.totals["accepted"] == 5  # 3 direct + 2 partials, each counted once
