"""The demo's path: three agent processes and an aggregator over a secured mosquitto,
on real smartwatch data split by subject, reach a stated accuracy on held-out people."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from fedmq.demo.run import run_demo

pytestmark = pytest.mark.mosquitto
ROUNDS = 10
MIN_ACCURACY = 0.75  # on the two held-out subjects, after ROUNDS rounds
# Federated within this many points of the centralized baseline (either way). The README's
# seed table (seeds 0-5, same 10 rounds) has gaps from -1.9 to +3.0 points, +2.3 for seed 0;
# 4 leaves one point over the worst seed, and would catch a federation that learns only
# part of what pooled training learns, or a baseline that is not trained.
MAX_GAP_POINTS = 4.0


def test_demo_reaches_the_stated_accuracy_and_gap_to_centralized(tmp_path):
    console = Console(file=open(tmp_path / "out.txt", "w"), width=120)  # noqa: SIM115
    result = run_demo(devices=3, rounds=ROUNDS, seed=0, run_dir=tmp_path / "run", console=console)
    assert result.federated_accuracy >= MIN_ACCURACY, result
    assert abs(result.gap_points) <= MAX_GAP_POINTS, result
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["devices"] == 3 for r in rows)
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert len(list((tmp_path / "run" / "checkpoints").glob("round-*.safetensors"))) == ROUNDS + 1
