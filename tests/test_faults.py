"""Nothing lost: SIGKILLed aggregators, broker restarts and device churn on a real mosquitto.

Every run here is compared with a fault-free run of the same task, data and
seeds: training is deterministic per (task seed, round, device), and FedAvg
folds in float64, so the final global models must be identical.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from aggregator.checkpoint import RunDir
from broker.task import TaskSpec
from tests.helpers import blobs_task, join, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto
DEVICES = ["dev1", "dev2", "dev3"]
ROUNDS = 4


@pytest.fixture
def workload(tmp_path):
    files = write_blobs(tmp_path / "data", DEVICES)
    return files, blobs_task(tmp_path)


def reference_run(federation, tmp_path, files, task_path, rounds=ROUNDS) -> dict:
    """The fault-free run: in-process aggregator and agents on their own broker."""
    fed = federation(devices=DEVICES, name="reference")
    agg = fed.aggregator(
        tmp_path / "reference",
        TaskSpec.load(task_path),
        rounds=rounds,
        min_devices=len(DEVICES),
        deadline=None,
    )
    agg_thread = fed.in_thread(agg.run, timeout=120)
    for d in DEVICES:
        fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=120)
    assert join(agg_thread, 150) == 0
    return agg.weights


def final_weights(run_dir) -> dict:
    spec, state, tensors = RunDir(run_dir).load()
    assert state.completed_round == spec.rounds
    return tensors


def assert_same_model(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), (
            f"{name} differs: max {(a[name] - b[name]).abs().max()}"
        )


def journal_lines(run_dir, round_: int) -> int:
    path = run_dir / "rounds" / f"{round_:06d}" / "journal.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def completed(run_dir) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_round"]
    except (OSError, ValueError, KeyError):
        return 0


def start_agents(fed, files, tmp_path):
    for d in DEVICES:
        fed.spawn_agent(d, files[d], "--exit-when-done", log=tmp_path / f"{d}.log")


def aggregator_args(task_path, run_dir):
    return (
        "--task",
        str(task_path),
        "--rounds",
        str(ROUNDS),
        "--min-devices",
        str(len(DEVICES)),
        "--deadline",
        "0",
        "--run-dir",
        str(run_dir),
    )


def test_sigkill_aggregator_then_resume_gives_the_uninterrupted_model(
    federation, tmp_path, workload
):
    files, task_path = workload
    expected = reference_run(federation, tmp_path, files, task_path)

    fed = federation(devices=DEVICES)
    run_dir = tmp_path / "run"
    log = tmp_path / "aggregator.log"
    agg = fed.spawn_aggregator(*aggregator_args(task_path, run_dir), log=log)
    start_agents(fed, files, tmp_path)

    # kill 1: as soon as round 2 has journaled an update (mid-round, acks possibly pending)
    wait_for(lambda: journal_lines(run_dir, 2) >= 1 or completed(run_dir) >= 2, 60, "round 2")
    agg.send_signal(signal.SIGKILL)
    agg.wait(10)
    killed_at = [(completed(run_dir), journal_lines(run_dir, completed(run_dir) + 1))]

    # kill 2: right after a checkpoint, before the next round's updates are in
    agg = fed.spawn_aggregator("--run-dir", str(run_dir), "--resume", log=log)
    wait_for(lambda: completed(run_dir) >= 3, 60, "round 3 checkpoint")
    agg.send_signal(signal.SIGKILL)
    agg.wait(10)
    killed_at.append((completed(run_dir), journal_lines(run_dir, completed(run_dir) + 1)))

    agg = fed.spawn_aggregator("--run-dir", str(run_dir), "--resume", log=log)
    assert agg.wait(90) == 0, log.read_text()
    assert_same_model(final_weights(run_dir), expected)
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), killed_at
    assert all(r["devices"] == len(DEVICES) for r in rows)  # none lost, none twice


def test_broker_restart_mid_round_loses_nothing(federation, tmp_path, workload):
    files, task_path = workload
    expected = reference_run(federation, tmp_path, files, task_path)

    fed = federation(devices=DEVICES)
    run_dir = tmp_path / "run"
    log = tmp_path / "aggregator.log"
    agg = fed.spawn_aggregator(*aggregator_args(task_path, run_dir), log=log)
    start_agents(fed, files, tmp_path)
    wait_for(lambda: journal_lines(run_dir, 2) >= 1 or completed(run_dir) >= 2, 60, "round 2")
    fed.restart_broker()  # SIGTERM: mosquitto saves sessions and retained messages
    assert agg.wait(90) == 0, log.read_text()
    assert_same_model(final_weights(run_dir), expected)
    assert all(r["devices"] == len(DEVICES) for r in RunDir(run_dir).metrics())


def test_agent_killed_while_training_does_not_stall_the_round(federation, tmp_path, workload):
    """dev3 has a large data set, so it is still training when it is SIGKILLed; its last
    will marks it offline and round 1 closes with the quorum of the two others."""
    files, task_path = workload
    big = write_blobs(tmp_path / "big", ["dev3"], samples=200_000)["dev3"]
    fed = federation(devices=DEVICES)
    events = []
    agg = fed.aggregator(
        tmp_path / "run", TaskSpec.load(task_path), rounds=2, min_devices=2, deadline=None
    )
    agg.on_event = lambda kind, info: events.append((kind, info))
    agg_thread = fed.in_thread(agg.run, timeout=120)
    slow = fed.spawn_agent("dev3", big, log=tmp_path / "dev3.log")
    wait_for(lambda: agg.status.get("dev3") == "training", 60, "dev3 training")
    for d in ("dev1", "dev2"):
        fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=120)
    wait_for(lambda: agg.current and agg.current.accepted == 2, 60, "two updates")
    assert agg.state.completed_round == 0  # dev3 is present and has not reported: wait
    slow.send_signal(signal.SIGKILL)
    assert join(agg_thread, 90) == 0
    assert ("device", {"device": "dev3", "status": "offline"}) in events
    assert [r["devices"] for r in agg.run_dir.metrics()] == [2, 2]


def test_below_quorum_at_deadline_stops_with_a_clear_message(federation, tmp_path, workload):
    files, task_path = workload
    fed = federation(devices=DEVICES)
    agg = fed.spawn_aggregator(
        "--task",
        str(task_path),
        "--rounds",
        "2",
        "--min-devices",
        "2",
        "--deadline",
        "1",
        "--on-short",
        "stop",
        "--run-dir",
        str(tmp_path / "run"),
        log=tmp_path / "agg.log",
    )
    assert agg.wait(60) == 1
    out = (tmp_path / "agg.log").read_text()
    assert "round 1: 0 of the 2 devices needed reported within 1s; stopping" in out
    assert "Traceback" not in out


def test_update_published_while_the_link_is_down_arrives_after_reconnect(
    federation, tmp_path, workload
):
    """The broker goes away while dev3 trains; its update is sent once it reconnects."""
    files, task_path = workload
    big = write_blobs(tmp_path / "big", ["dev3"], samples=100_000)["dev3"]
    fed = federation(devices=["dev3"])
    agg = fed.aggregator(
        tmp_path / "run", TaskSpec.load(task_path), rounds=1, min_devices=1, deadline=None
    )
    agg_thread = fed.in_thread(agg.run, timeout=120)
    agent = fed.agent("dev3", big, exit_when_done=True)
    trained = []
    agent.on_event = lambda kind, info: trained.append(kind) if kind == "trained" else None
    agent_thread = fed.in_thread(agent.run, timeout=120)
    wait_for(lambda: agg.status.get("dev3") == "training", 60, "dev3 training")
    fed.stop_broker()
    wait_for(lambda: trained, 60, "training to finish while the broker is down")
    fed.start_broker()
    assert join(agg_thread, 90) == 0
    assert join(agent_thread, 30) == 0
    assert agg.run_dir.metrics()[0]["devices"] == 1


def test_stop_after_round_k_then_resume_continues_at_k_plus_1(federation, tmp_path, workload):
    files, task_path = workload
    fed = federation(devices=DEVICES)
    run_dir = tmp_path / "run"
    for d in DEVICES:
        fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=120)
    first = fed.aggregator(
        run_dir,
        TaskSpec.load(task_path),
        rounds=ROUNDS,
        min_devices=len(DEVICES),
        deadline=None,
        stop_after=2,
    )
    assert join(fed.in_thread(first.run, timeout=60), 90) == 0
    assert first.state.completed_round == 2
    after_two = {k: v.clone() for k, v in first.weights.items()}

    resumed = fed.aggregator(run_dir, None, resume=True, deadline=None)
    assert resumed.state.completed_round == 2
    assert_same_model(resumed.weights, after_two)  # continues from identical weights
    opened = []
    resumed.on_event = lambda kind, info: (
        opened.append(info["round"]) if kind == "round_open" else None
    )
    assert join(fed.in_thread(resumed.run, timeout=60), 90) == 0
    assert opened[0] == 3
    assert [r["round"] for r in RunDir(run_dir).metrics()] == [1, 2, 3, 4]


def test_below_quorum_at_deadline_retries_the_round(federation, tmp_path, workload):
    files, task_path = workload
    fed = federation(devices=DEVICES)
    agg = fed.aggregator(
        tmp_path / "run",
        TaskSpec.load(task_path),
        rounds=1,
        min_devices=1,
        deadline=0.5,
        on_short="retry",
    )
    events = []
    agg.on_event = lambda kind, info: events.append(kind)
    thread = fed.in_thread(agg.run, timeout=60)
    wait_for(lambda: events.count("retry") >= 2, 20, "two retries")
    fed.in_thread(fed.agent("dev1", files["dev1"], exit_when_done=True).run, timeout=60)
    assert join(thread, 60) == 0
    assert agg.run_dir.metrics()[0]["devices"] == 1
