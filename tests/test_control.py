"""The operator's commands reach a running aggregator over `control` and read `state`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from broker import signals
from broker.errors import FedmqError
from broker.topics import Topics
from fedmq.cli import main
from fedmq.operator import read_state, send_control
from tests.helpers import join, publish_as, wait_for

pytestmark = pytest.mark.mosquitto


def test_status_pause_resume_stop(federation, tmp_path):
    fed = federation(devices=["bob"])
    agg, thread = fed.start_aggregator(tmp_path, rounds=3, min_devices=1)
    operator = fed.settings("fedmq-operator")
    wait_for(lambda: agg.phase == "collecting", 20, "the first round")

    state = send_control(operator, fed.name, "pause", expect_phases={"paused"})
    assert state["phase"] == "paused" and agg.phase == "paused"
    state = send_control(operator, fed.name, "resume", expect_phases={"collecting"})
    assert state["round"] == 1

    runner = CliRunner()
    result = runner.invoke(
        main, ["aggregator", "status", "--config", str(fed.credentials("fedmq-operator"))]
    )
    assert result.exit_code == 0, result.output
    assert f"federation {fed.name}: round 1 of 3, collecting" in result.output

    result = runner.invoke(
        main, ["aggregator", "stop", "--config", str(fed.credentials("fedmq-operator"))]
    )
    assert result.exit_code == 0, result.output
    assert "stop: aggregator is stopped" in result.output
    assert join(thread, 20) == 0
    assert read_state(operator, fed.name)["phase"] == "stopped"


def test_a_device_cannot_send_control_commands(federation, tmp_path):
    """The ACL keeps `control` for the operator: a device's "stop" never arrives. Sync
    point, not a timeout: the broker has acked bob's stop before the operator's pause
    is sent, so had the stop been delivered the aggregator would have acted on it first."""
    fed = federation(devices=["bob"])
    agg, thread = fed.start_aggregator(tmp_path, rounds=1, min_devices=1)
    commands = []
    agg.on_event = lambda kind, info: (
        commands.append(info["command"]) if kind == "control" else None
    )
    wait_for(lambda: agg.phase == "collecting", 20, "the first round")
    with pytest.raises(FedmqError, match="no aggregator running|refused account 'bob'"):
        send_control(fed.settings("bob"), fed.name, "stop", expect_phases={"stopped"}, timeout=2)
    # a well-formed stop for this very aggregator instance, published with bob's account
    stop = signals.encode_control("stop", agg.instance)
    publish_as(fed, "bob", Topics(fed.name).control, stop)
    send_control(fed.settings("fedmq-operator"), fed.name, "pause", expect_phases={"paused"})
    assert commands == ["pause"] and agg.phase == "paused"
    agg.stop()
    join(thread, 20)
