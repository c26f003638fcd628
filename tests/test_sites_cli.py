"""The site commands end to end, as an operator runs them: `fedmq aggregator start
--upstream` at a site whose broker `BrokerHome.create(bridge_credentials=...)` made (what
`fedmq broker init --bridge-credentials` does), a device agent process at the site, and
the root's aggregator process."""

from __future__ import annotations

import pytest
import torch

from aggregator.checkpoint import RunDir
from tests.helpers import blobs_task, write_blobs
from tests.sites_helpers import AGGREGATOR, make_site

pytestmark = pytest.mark.mosquitto


def test_fedmq_aggregator_start_upstream_runs_a_site(federation, tmp_path):
    data = write_blobs(tmp_path / "data", ["d1"])
    root = federation(devices=[], name="root")
    site = make_site(root, tmp_path / "farm-a", "farm-a", "site-a", ["d1"])
    logs = {name: tmp_path / f"{name}.log" for name in ("root", "site", "agent")}
    try:
        root_proc = root.spawn_aggregator(
            "--task", str(blobs_task(tmp_path)), "--rounds", "2", "--min-devices", "1",
            "--run-dir", str(tmp_path / "run-root"), log=logs["root"],
        )  # fmt: skip
        site_proc = site.spawn(
            "aggregator", "start", "--config", str(site.credentials(AGGREGATOR)),
            "--upstream", str(site.home.upstream_path), "--min-devices", "1",
            "--run-dir", str(tmp_path / "run-site"), "--no-plot", log=logs["site"],
        )  # fmt: skip
        agent = site.spawn_agent("d1", data["d1"], "--exit-when-done", log=logs["agent"])
        codes = [p.wait(90) for p in (root_proc, site_proc, agent)]
    finally:
        site.close()
    text = {name: path.read_text() for name, path in logs.items()}
    assert codes == [0, 0, 0], text
    assert "following it" in text["site"]
    # the root drew its plots (the default), the site did not (--no-plot)
    assert (tmp_path / "run-root" / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "run-site").glob("*.png"))
    root_rows = RunDir(tmp_path / "run-root").metrics()
    site_rows = RunDir(tmp_path / "run-site").metrics()
    assert [r["contributors"] for r in root_rows] == [["site-a"], ["site-a"]]
    assert [r["round"] for r in site_rows] == [1, 2]
    assert [r["samples"] for r in root_rows] == [r["samples"] for r in site_rows]
    # one device behind the site: the root's model is that device's, round by round
    for n in (1, 2):
        root_ckpt = RunDir(tmp_path / "run-root").checkpoint(n)
        site_ckpt = RunDir(tmp_path / "run-site").checkpoint(n)
        for name, tensor in root_ckpt.items():
            assert torch.equal(tensor, site_ckpt[name])
