"""`fedmq status`: what an operator sees of a live federation, with the operator's credentials
only (which cannot read the devices' status topics: all of it comes through the state)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from click.testing import CliRunner
from rich.console import Console

from aggregator.device_table import STATE_DEVICE_ROWS
from aggregator.inbox import Inbound
from broker import signals
from broker.errors import FedmqError
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.cli import main
from fedmq.operator import read_state
from fedmq.status_view import ago, render, show
from tests.helpers import blobs_task, join, publish_as, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto


def status(fed, *args):
    result = CliRunner().invoke(
        main, ["status", "--config", str(fed.credentials("fedmq-operator")), *args]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_status_shows_each_device_its_last_metrics_and_the_refusals(federation, tmp_path):
    fed = federation(devices=["bob", "alice"])
    files = write_blobs(tmp_path / "data", ["bob", "alice"])
    agg, agg_thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=2)
    agents = [fed.in_thread(fed.agent(d, files[d], max_rounds=1).run) for d in ("bob", "alice")]
    for thread in agents:
        assert join(thread, 60) == 0
    wait_for(lambda: agg.state.completed_round == 1, 20, "round 1 to close")
    topics = Topics(fed.name)
    publish_as(fed, "bob", topics.update("bob"), b"not an update")  # rejected in round 2
    publish_as(fed, "alice", topics.status("alice"), b"{not json")  # a refused message
    state = wait_for(
        lambda: (
            (s := read_state(fed.settings("fedmq-operator"), fed.name))["totals"][
                "refused_messages"
            ]
            and s["totals"]["rejected_total"]
            and s
        ),
        20,
        "the refusals in the state",
    )

    shown = json.loads(status(fed, "--json"))
    table = shown["devices"]["table"]
    assert set(table) == {"bob", "alice"} and shown["devices"]["unlisted"] == 0
    for device, row in table.items():
        assert row["round"] == 1, device
        assert row["status"] == "offline"  # the agents left after one round
        assert "train_loss" in row["metrics"] and "eval_accuracy" in row["metrics"]
        assert row["last_seen"] <= shown["time"]
    recorded = [json.loads(line) for line in agg.run_dir.devices_jsonl.read_text().splitlines()]
    assert table["bob"]["metrics"] == next(r["metrics"] for r in recorded if r["device"] == "bob")
    assert shown["aggregator"]["running"] is True
    assert (shown["round"], shown["rounds"], shown["phase"]) == (2, 2, "collecting")
    assert shown["round_progress"] == {"accepted": 0, "reported": 0, "quorum": 2}
    assert shown["totals"]["accepted"] == 2
    assert sum(shown["totals"]["rejected"].values()) == 1
    assert list(shown["totals"]["refused_messages"]) == list(state["totals"]["refused_messages"])
    assert next(iter(shown["totals"]["refused_messages"])).startswith("status:")

    text = status(fed)  # the rich view, on a plain (not a terminal) stdout
    assert f"federation {fed.name}: round 2 of 2, collecting, strategy fedavg" in text
    assert "aggregator running" in text and "accepted 0 / quorum 2, reported 0" in text
    for device in ("bob", "alice"):
        row = next(line for line in text.splitlines() if line.lstrip().startswith(device))
        acc = f"{table[device]['metrics']['eval_accuracy']:.4f}"
        assert "offline" in row and "ago" in row and acc in row, row
    reason = next(iter(shown["totals"]["rejected"]))
    assert f"updates: accepted 2, duplicate 0, late 0, rejected 1 ({reason} 1)" in text
    assert "refused messages: status:" in text
    alias = CliRunner().invoke(
        main, ["aggregator", "status", "--config", str(fed.credentials("fedmq-operator"))]
    )
    assert alias.exit_code == 0 and text.splitlines()[0] in alias.output  # the same view
    assert "refused messages: status:" in alias.output

    agg.stop()
    assert join(agg_thread, 20) == 0
    text = status(fed)  # the last state stays; the view says nobody runs it
    assert f"no aggregator running for federation '{fed.name}'" in text
    assert "bob" in text and "alice" in text


def test_status_without_any_aggregator_is_one_line(federation):
    fed = federation(devices=["bob"])
    result = CliRunner().invoke(
        main, ["status", "--config", str(fed.credentials("fedmq-operator")), "--timeout", "1"]
    )
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "no aggregator state" in result.output


def test_the_state_lists_at_most_the_cap_of_devices(federation, tmp_path):
    """1,000 devices' statuses: the published state lists the most recently seen only,
    counts the rest, and stays small."""
    fed = federation(devices=["bob"])
    agg = fed.aggregator(tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), rounds=1)
    topics = Topics(fed.name)
    for i in range(1000):
        device = f"dev{i:04d}"
        status_ = "offline" if i % 3 else "online"
        payload = signals.encode_status(status_, device)
        agg._handle_status(Inbound(topics.status(device), payload, 0, 0))
    state = agg.state_snapshot()
    devices = state["devices"]
    assert len(devices["table"]) == STATE_DEVICE_ROWS
    assert devices["unlisted"] == 1000 - STATE_DEVICE_ROWS
    assert devices["seen"] == 1000 and devices["online_count"] == 334
    assert len(devices["online"]) <= STATE_DEVICE_ROWS
    assert "dev0999" in devices["table"]  # the last heard from are listed
    assert len(json.dumps(state)) < 40_000

    out = StringIO()
    Console(file=out, width=120).print(render({**state, "aggregator": {"running": False}}))
    assert "800 more not listed" in out.getvalue() and "dev0999" in out.getvalue()


def test_ago():
    assert [ago(100 - s, 100) for s in (3, 125, 7300, 200000)] == [
        "3s ago",
        "2m ago",
        "2h ago",
        "2d ago",
    ]
    assert ago(None, 100) == "-"


def test_watch_redraws_until_ctrl_c_and_returns_cleanly(federation, tmp_path):
    """Each read is drawn; a failed read is shown and retried; Ctrl-C ends it without error."""
    fed = federation(devices=["bob"])
    agg = fed.aggregator(tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), rounds=1)
    state = {**agg.state_snapshot(), "aggregator": {"running": True}}
    reads = iter(
        [state, {**state, "round": 7}, FedmqError("broker gone"), state, KeyboardInterrupt()]
    )

    def read():
        item = next(reads)
        if isinstance(item, BaseException):
            raise item
        return item

    out = StringIO()
    terminal = Console(file=out, width=120, force_terminal=True, color_system=None)
    show(read, watch=True, interval=0, console=terminal)
    assert next(reads, None) is None  # read until Ctrl-C
    drawn = out.getvalue()
    assert "round 7 of 1" in drawn and "broker gone (retrying)" in drawn
    assert drawn.rsplit("round 1 of 1", 1)[1].count("retrying") == 0  # the last draw: no error
