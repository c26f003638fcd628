"""A round as data: the sequence of phases it goes through, each with a deadline.

The engine (``service.py``) steps the open round through its phases in order;
each phase has a name the engine maps to a step (``_phase_<name>``), the message
kinds it takes in and a deadline. Today's rounds:

    select   (client sampling only) wait for devices, draw the round's sample,
             write the plan to the round's directory before anyone is told
    train    announce the model with the plan; collect updates until the strategy's
             close rule holds (every present selected device reported, or for fedbuff
             ``buffer_size`` accepted updates) or the deadline passes

With ``[secure_aggregation]`` (``aggregator/secure_round.py``) ``train`` becomes:

    keys     announce the model with the plan and a fresh session; collect the selected
             devices' key advertisements, then publish the roster
    shares   collect each device's sealed shares for its neighbours, then deliver them
    masked   collect masked inputs (the devices train meanwhile) until the close rule
             holds or the deadline, then name the survivors
    unmask   collect the survivors' shares until every mask can be removed, then close
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aggregator.durable import atomic_write, fsync_dir
from aggregator.strategies.base import RoundPlan, Strategy


@dataclass(frozen=True)
class Phase:
    name: str
    takes: tuple[str, ...] = ()  # message kinds (topics) this phase handles
    deadline: float | None = None  # seconds the phase may last; None: no limit
    state: str = "collecting"  # what the aggregator's state topic says meanwhile


def round_phases(
    strategy: Strategy, deadline: float | None, secure_deadline: float | None = None
) -> tuple[Phase, ...]:
    """The phases of a round; ``secure_deadline`` (seconds of each short secure phase)
    only for secure aggregation, whose rounds always select: the masks are sized for the
    devices named at the start."""
    phases = []
    if strategy.fraction < 1.0 or secure_deadline is not None:
        phases.append(Phase("select", takes=("status",), deadline=None, state="selecting"))
    if secure_deadline is None:
        phases.append(Phase("train", takes=("updates",), deadline=deadline, state="collecting"))
        return tuple(phases)
    return (
        *phases,
        Phase("keys", takes=("secagg",), deadline=secure_deadline, state="advertising"),
        Phase("shares", takes=("secagg",), deadline=secure_deadline, state="sharing"),
        Phase("masked", takes=("secagg",), deadline=deadline, state="collecting"),
        Phase("unmask", takes=("secagg",), deadline=secure_deadline, state="unmasking"),
    )


def plan_path(round_dir: Path) -> Path:
    return round_dir / "plan.json"


def save_plan(round_dir: Path, plan: RoundPlan) -> None:
    """Durable before the model announcing it goes out: a restarted aggregator tells the
    devices the same thing (and a resumed run replays the same sample)."""
    if not round_dir.exists():
        round_dir.mkdir(parents=True)
        fsync_dir(round_dir.parent)
    atomic_write(plan_path(round_dir), json.dumps(plan.to_json(), sort_keys=True).encode())


def load_plan(round_dir: Path) -> RoundPlan | None:
    path = plan_path(round_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    selected = raw.get("selected")
    return RoundPlan(
        selected=None if selected is None else tuple(selected), train=raw.get("train", {})
    )
