"""Small runs of the benchmarks under scripts/bench/: their figures are sane.

The scripts are loaded by path (``scripts/`` is not a package); the full runs are in the
README. Timings on a shared CI machine vary: only orders of magnitude are checked.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_serial_costs_per_update_and_per_round(tmp_path):
    costs = _load("costs")
    results = costs.measure(tmp_path, updates=60, round_devices=4, rounds=3, agent=False)
    one, batched = results["per_update"]
    assert (one["batch"], batched["batch"]) == (1, 64)
    assert one["updates"] == batched["updates"] == 60
    assert 15_000 < one["update_bytes"] < 25_000  # the 4,810-parameter MLP, float32
    for u in (one, batched):
        assert 0.01 < u["ms_per_update"] < 500
    r = results["per_round"]
    assert r["devices"] == 4 and r["rounds"] == 3
    parts = r["ms_aggregate"] + r["ms_persist"] + r["ms_next_model"]
    assert 0 < parts <= r["ms_close"] < 5_000
    text = costs.report(results)
    assert "ms/update" in text and "(c) closing a round of 4" in text


def test_agent_costs_on_the_demo(tmp_path):
    pytest.importorskip("seglearn")
    agent_costs = _load("agent_costs")
    a = agent_costs.agent_costs(tmp_path, timeout=120)
    assert 0 < a["cold_connect_s"] <= a["cold_update_s"] < 120
    assert 0 < a["cold_connect_cpu_s"] <= a["cold_update_cpu_s"]
    assert a["dynamo_imported"] is False  # the device's optimizers keep the compiler out
    assert 50 < a["idle_rss_mb"] <= a["train_peak_rss_mb"] < 2_000
    assert a["plot_before_final_state"] is False  # plots come after the final state
    assert a["plot_s"] > 0


def test_ingest_small_run(tmp_path):
    ingest = _load("ingest")
    seen = []
    results, serial = ingest.measure(
        tmp_path, [0.05], devices=4, concurrency=4, updates=20, reps=1, progress=seen.append
    )
    (size,) = results
    assert size.updates == 4 and 40_000 < size.update_bytes < 60_000
    assert [r.kind for r in size.runs] == ["ceiling", "fedmq"] == [r.kind for r in seen]
    for run in size.runs:  # each run's own record agrees with the receiver's
        assert run.updates == run.acked == run.received == 4
        assert run.update_bytes == size.update_bytes and 0 < run.seconds < 60
    (ratio,) = size.ratios()
    assert ratio == pytest.approx(size.of("fedmq")[0].mb_s / size.of("ceiling")[0].mb_s)
    assert serial["updates"] == 20 and serial["ms_per_update"] > 0
    assert "fedmq/ceiling" in ingest.report(results, serial)


def test_ingest_checks_catch_a_lost_update():
    ingest = _load("ingest")
    sent = {"t/a": 10, "t/b": 10}
    assert ingest.check_ceiling(sent, 2, [("t/a", 10), ("t/b", 10), ("t/b", 10)]) == 2
    for acked, received in ((1, [("t/a", 10), ("t/b", 10)]), (2, [("t/a", 10)])):
        with pytest.raises(RuntimeError):
            ingest.check_ceiling(sent, acked, received)
    with pytest.raises(RuntimeError):  # arrived cut short
        ingest.check_ceiling(sent, 2, [("t/a", 10), ("t/b", 9)])
    lines = [{"digest": "x", "outcome": "accepted"}, {"digest": "y", "outcome": "accepted"}]
    assert ingest.check_journal({"x", "y"}, 2, lines) == 2
    with pytest.raises(RuntimeError):
        ingest.check_journal({"x", "y"}, 2, lines[:1])
    with pytest.raises(RuntimeError):
        ingest.check_journal({"x", "y"}, 2, [lines[0], {**lines[1], "outcome": "rejected"}])
    with pytest.raises(RuntimeError):
        ingest.check_journal({"x", "y"}, 1, lines)


def test_hidden_for_sizes():
    ingest = _load("ingest")
    for mb in (0.1, 1, 10):
        params = ingest.hidden_for(mb) * (64 + 1 + 8)
        assert abs(4 * params - mb * 1e6) / (mb * 1e6) < 0.01


def test_round_cpu_names_every_process_of_the_run():
    """``round_cpu.py`` finds the aggregator, the broker and each agent among the run's
    processes and gives each a CPU figure per round."""
    import subprocess

    out = subprocess.run(
        [sys.executable, str(BENCH / "round_cpu.py"), "--rounds", "40", "--clients", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:3])
        for line in out.stdout.splitlines()
        if line.startswith("| ") and "ms" in line
    }
    assert ("agents", "main", "3") in rows, out.stdout
    assert ("aggregator", "main", "1") in rows and ("broker", "main", "1") in rows, out.stdout
    assert "ms a round (wall)" in out.stdout and "CPU a round, all processes" in out.stdout


def test_bench_round_measures_a_second_round_beside_the_raw_broker():
    """``bench_round.py --rounds 2``: both rounds' updates accepted (it asserts every
    device is in the measured round), the raw broker's pass, and the memory lines."""
    import subprocess

    script = BENCH.parent / "bench_round.py"
    args = ["--devices", "12", "--hidden", "64", "--concurrency", "4", "--rounds", "2"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    for line in (
        "raw broker :",
        "fedmq round 2 (after an unmeasured 1):",
        "ratio fedmq/raw:",
        "over waiting:",
        "at the peak of resident memory: anonymous +",
    ):
        assert line in out.stdout, out.stdout
