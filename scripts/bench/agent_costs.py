"""A device agent's start-up, first update and memory, and where the aggregator draws its plots.

One secured mosquitto, the demo's task and data (``fedmq demo``'s smartwatch CNN), two real
``fedmq agent run`` processes and an aggregator in this process:

1. ``d0`` starts with no aggregator running (``-X importtime``, which costs it a little):
   seconds and CPU to "connected", then its resident memory while idle;
2. the aggregator starts (one round, two devices): ``d0`` trains on the announced model;
   its peak memory while training (VmHWM) and the seconds from announcement to update;
3. ``d1`` starts while the round is open: seconds and CPU to "connected" and to its first
   update reaching the aggregator (a device's cold start, end to end);
4. the round closes and the run ends: what the final model and state waited for, and
   whether the plots were drawn before them (on the critical path) or after.

Used by ``scripts/bench/costs.py``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from aggregator.service import Aggregator
from broker.task import TaskSpec
from fedmq.loadgen import memory_mb
from fedmq.local import LocalFederation

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _wait(predicate, timeout: float, what: str, proc=None) -> float:
    """Poll until ``predicate()``; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic()


def _connected(log: Path):
    return lambda: log.exists() and "connected to" in log.read_text(errors="replace")


def agent_costs(work: Path, timeout: float = 180) -> dict:
    from fedmq.demo.watch_data import prepare

    data = prepare(work / "data", devices=2, seed=0)
    task = TaskSpec.load(data.task_path)
    events: dict[str, float] = {}
    marks: dict[str, float] = {}

    def on_event(kind: str, info: dict) -> None:
        now = time.monotonic()
        if kind == "update" and info.get("device"):
            events.setdefault(f"update:{info['device']}", now)
        elif kind in ("announce", "done"):
            events.setdefault(kind, now)

    result: dict = {}
    with LocalFederation.create(work / "broker", "costs", ["d0", "d1"]) as fed:
        logs = {d: work / f"{d}.log" for d in ("d0", "d1")}
        started = time.monotonic()
        os.environ["PYTHONPROFILEIMPORTTIME"] = "1"  # d0's log lists what it imports
        try:
            # a device's own interpreter, cold (not forked from the federation's zygote)
            d0 = fed.spawn_agent("d0", data.device_files[0], log=logs["d0"], fresh=True)
        finally:
            del os.environ["PYTHONPROFILEIMPORTTIME"]
        at = _wait(_connected(logs["d0"]), timeout, "d0 connected", d0)
        result["connect_s"] = at - started
        result["connect_cpu_s"] = cpu_seconds(d0.pid)
        time.sleep(1.0)
        result["idle_rss_mb"] = memory_mb(d0.pid)

        agg = Aggregator(
            fed.aggregator_config(
                work / "run", task, rounds=1, min_devices=2, deadline=None, plot=True
            ),
            on_event=on_event,
        )
        _instrument(agg, marks)
        outcome: dict = {}
        thread = threading.Thread(
            target=lambda: outcome.setdefault("code", agg.run(timeout=timeout)), daemon=True
        )
        thread.start()
        _wait(lambda: "update:d0" in events, timeout, "d0's update", d0)
        result["train_s"] = events["update:d0"] - events["announce"]
        result["train_peak_rss_mb"] = memory_mb(d0.pid, "VmHWM")

        started = time.monotonic()
        d1 = fed.spawn_agent("d1", data.device_files[1], log=logs["d1"], fresh=True)
        at = _wait(_connected(logs["d1"]), timeout, "d1 connected", d1)
        result["cold_connect_s"] = at - started
        result["cold_connect_cpu_s"] = cpu_seconds(d1.pid)
        at = _wait(lambda: "update:d1" in events, timeout, "d1's update", d1)
        result["cold_update_s"] = at - started
        result["cold_update_cpu_s"] = cpu_seconds(d1.pid)
        imports = logs["d0"].read_text(errors="replace")
        result["d0_modules"] = imports.count("import time:") - 1
        result["dynamo_imported"] = "| torch._dynamo\n" in imports  # by d0, having trained
        thread.join(timeout)
        if outcome.get("code") != 0:
            raise RuntimeError(f"the aggregator ended with {outcome}")
        result.update(_plot_order(marks))
    return result


def _instrument(agg: Aggregator, marks: dict[str, float]) -> None:
    """Note when the final model, the final state and the plots happen."""
    plot, publish_state, finish = agg._plot, agg._publish_state, agg._finish

    def timed_plot() -> None:
        marks["plot_start"] = time.monotonic()
        plot()
        marks["plot_end"] = time.monotonic()

    def timed_state(force: bool = False) -> None:
        publish_state(force)
        if force:
            marks.setdefault("final_state", time.monotonic())

    def timed_finish() -> None:
        marks["finish_start"] = time.monotonic()
        finish()

    agg._plot, agg._publish_state, agg._finish = timed_plot, timed_state, timed_finish


def _plot_order(marks: dict[str, float]) -> dict:
    plot_s = marks["plot_end"] - marks["plot_start"]
    return {
        "plot_s": plot_s,
        "plot_before_final_state": marks["plot_start"] < marks["final_state"],
        "final_state_after_last_round_s": marks["final_state"] - marks["finish_start"],
    }
