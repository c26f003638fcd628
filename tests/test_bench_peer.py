"""Smoke run of the peer benchmark (scripts/bench/peer.py): fedmq and the in-process loop
on 3 clients for 2 rounds. Flower is left out: its venv is not installed in CI."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"

pytestmark = pytest.mark.mosquitto


def _load_peer():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_peer", BENCH / "peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fedmq_and_inprocess_loop_give_sane_figures_and_the_same_model(tmp_path):
    peer = _load_peer()
    lines: list[str] = []
    runs, summary = peer.benchmark(
        tmp_path, rounds=2, clients=3, reps=1, systems=("fedmq", "inprocess"), say=lines.append
    )
    assert [r.system for r in runs] == ["fedmq", "inprocess"]
    for run in runs:
        assert run.rounds == 2
        figs = run.figures()
        assert 0 < figs["steady_round_s"] < figs["whole_command_s"]
        assert 0 < figs["first_round_s"] < figs["whole_command_s"]
        assert figs["cpu_per_round_s"] > 0
        assert 0 < figs["accuracy"] <= 1
        assert figs["peak_memory_mb"] > 10  # at least a python with torch
    # same data, initial weights, shuffles and FedAvg: the same global model
    assert math.isclose(summary["fedmq"]["accuracy"], summary["inprocess"]["accuracy"])
    assert summary["fedmq"]["accuracy"] > 0.5  # two rounds on digits learn something
    text = peer.table(summary, 1)
    assert "| whole command |" in text and "fedmq / in-process loop" in text
    assert "goal: same accuracy as in-process loop (within 1 point): +0.0 points (met)" in text


def test_workload_matches_the_issue(tmp_path):
    sys.path.insert(0, str(BENCH))
    import workload

    info = workload.prepare(tmp_path, 10)
    assert (info["train"], info["test"]) == (1437, 360)
    init = workload.load_init(tmp_path)
    assert sum(v.size for v in init.values()) == 4810
    sizes = [len(X) for _, X, _ in workload.load_clients(tmp_path)]
    assert sum(sizes) == 1437 and max(sizes) - min(sizes) <= 1
    model = workload.build_model()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in init.items()
    }
    header = (tmp_path / "client-00.csv").read_text().splitlines()[0]
    assert header.endswith(",label") and header.count(",") == 64
