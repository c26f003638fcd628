"""Where a round's time goes, one figure per cost of issue 12 (item 2 and the agent's memory).

    python scripts/bench/costs.py [--updates 2000] [--round-devices 10] [--rounds 20]
                                  [--skip-agent] [--json]

(a) agent: seconds and CPU from ``fedmq agent run`` to "connected" and to its first update
    reaching the aggregator (the demo's task and data); its memory idle and training;
(b) aggregator, serial work per small update (decode with hash check, admission, signature
    check, journal with group commit, ack, the close check), in-process over ``--updates``
    updates arriving one at a time and 64 at a time (the broker's in-flight window);
(c) aggregator, closing a round of ``--round-devices`` small updates: aggregate, persist
    (checkpoint, metrics, state), the next round's model, the rest;
(d) whether the plots are drawn before the final state (on the critical path) or after.

Run it from a checkout (PYTHONPATH=<checkout>) to measure that checkout: the before/after
figures of the issue come from running it on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_costs  # noqa: E402
import serial_costs  # noqa: E402


def measure(work: Path, updates: int, round_devices: int, rounds: int, agent: bool) -> dict:
    results: dict = {}
    if agent:
        results["agent"] = agent_costs.agent_costs(work / "agent")
    results["per_update"] = [
        serial_costs.per_update(work / f"update-{batch}", updates, batch) for batch in (1, 64)
    ]
    results["per_round"] = serial_costs.per_round(work / "round", round_devices, rounds)
    return results


def report(results: dict) -> str:
    lines = []
    a = results.get("agent")
    if a:
        lines += [
            "(a) agent (demo task), from `fedmq agent run`:",
            f"    to connected          {a['cold_connect_s']:6.2f} s  "
            f"{a['cold_connect_cpu_s']:5.2f} s CPU",
            f"    to first update       {a['cold_update_s']:6.2f} s  "
            f"{a['cold_update_cpu_s']:5.2f} s CPU  (round already open)",
            f"    model -> update       {a['train_s']:6.2f} s  (a device already connected)",
            f"    torch._dynamo imported by training: {'yes' if a['dynamo_imported'] else 'no'}"
            f"  ({a['d0_modules']} modules imported)",
            f"    memory: idle {a['idle_rss_mb']:.0f} MB, "
            f"peak training {a['train_peak_rss_mb']:.0f} MB",
        ]
    lines.append("(b) aggregator serial work per small update (in-process):")
    for u in results["per_update"]:
        lines.append(
            f"    {u['updates']} updates of {u['update_bytes'] / 1024:.0f} KiB arriving "
            f"{u['batch']:>2} at a time: {u['ms_per_update']:6.3f} ms/update"
        )
    r = results["per_round"]
    lines += [
        f"(c) closing a round of {r['devices']} small updates (median of {r['rounds']}):"
        f" {r['ms_close']:6.2f} ms",
        f"    aggregate {r['ms_aggregate']:.2f} ms, persist (checkpoint, metrics, state) "
        f"{r['ms_persist']:.2f} ms, next model {r['ms_next_model']:.2f} ms, "
        f"rest {r['ms_rest']:.2f} ms",
    ]
    if a:
        where = "BEFORE (on the critical path)" if a["plot_before_final_state"] else "after"
        lines += [
            f"(d) plots ({a['plot_s']:.1f} s) drawn {where} the final state; final state "
            f"{a['final_state_after_last_round_s']:.2f} s after the last round closed",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--round-devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-agent", action="store_true", help="only (b) and (c)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmq-costs-"))
    results = measure(work, args.updates, args.round_devices, args.rounds, not args.skip_agent)
    print(report(results))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
