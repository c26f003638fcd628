"""`fedmq status`: the aggregator's retained state (as ``fedmq.operator.read_state`` returns it)
drawn for an operator: the run, the round's progress, each device, and what was refused.

Everything per device comes from the state's bounded device table: the operator's account may
not read the devices' own status topics."""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 20
STATUS_STYLES = {"online": "green", "training": "cyan", "skipped": "yellow", "offline": "dim"}


def ago(when: float | None, now: float) -> str:
    """'3s ago', '4m ago', '2h ago', '3d ago'; '-' when never."""
    if not isinstance(when, (int, float)):
        return "-"
    seconds = max(0.0, now - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _number(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def header(state: dict, now: float) -> Text:
    """Run, round, phase, strategy; whether the aggregator runs; how old the state is."""
    from fedmq.operator import no_aggregator

    agg = state.get("aggregator") or {}
    upstream = state.get("upstream") or {}
    of = f" of {state['rounds']}" if state.get("rounds") else ""
    if upstream.get("root_federation"):
        of = f" (a site of {upstream['root_federation']}, as {upstream.get('site')})"
    text = Text(
        f"federation {state.get('federation')}: round {state.get('round')}{of}, "
        f"{state.get('phase')}"
        + (f", strategy {state['strategy']}" if state.get("strategy") else ""),
        style="bold",
    )
    details = [f"run {state.get('run_id')}"]
    if state.get("round_phase"):
        details.append(f"round phase {state['round_phase']}")
    details.append(f"state {ago(state.get('time'), now)}")
    text.append("\n" + " | ".join(details))
    if agg.get("running"):
        text.append(f"\naggregator running (pid {agg.get('pid')} on {agg.get('host')})", "green")
    else:
        text.append("\n" + no_aggregator(str(state.get("federation")), state), "red")
    if state.get("selected"):
        text.append(f"\nselected this round: {', '.join(state['selected'])}")
    return text


def progress(state: dict) -> Text:
    """The round's accepted updates against its quorum, and how many devices reported."""
    prog = state.get("round_progress") or {}
    accepted, reported = prog.get("accepted", 0), prog.get("reported", 0)
    quorum = prog.get("quorum") or state.get("min_devices") or 1
    filled = round(BAR_WIDTH * min(accepted, quorum) / quorum)
    text = Text("round progress ")
    text.append("█" * filled, "green")  # plain characters: readable without colours too
    text.append("░" * (BAR_WIDTH - filled), "dim")
    text.append(f" accepted {accepted} / quorum {quorum}, reported {reported}")
    return text


def device_table(state: dict, now: float) -> RenderableType:
    devices = state.get("devices") or {}
    rows = devices.get("table") or {}
    table = Table(title=None, expand=False, show_edge=False, pad_edge=False)
    for name, justify in (
        ("device", "left"),
        ("status", "left"),
        ("last seen", "right"),
        ("round", "right"),
        ("eval acc", "right"),
        ("eval loss", "right"),
        ("train loss", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "status")
    for device, row in rows.items():
        metrics = row.get("metrics") or {}
        status = str(row.get("status"))
        shown = Text(status, STATUS_STYLES.get(status, ""))
        if row.get("reason"):  # why it skipped the round: not selected, too hot, ...
            shown.append(f" ({row['reason']})", style="dim")
        table.add_row(
            device,
            shown,
            ago(row.get("last_seen"), now),
            _number(row.get("round")),
            _number(metrics.get("eval_accuracy")),
            _number(metrics.get("eval_loss")),
            _number(metrics.get("train_loss")),
        )
    online = devices.get("online_count", len(devices.get("online") or []))
    caption = f"{devices.get('seen', len(rows))} devices known, {online} online"
    if devices.get("unlisted"):
        caption += f"; {devices['unlisted']} more not listed (only the most recently seen)"
    return Group(table, Text(caption, style="dim")) if rows else Text(caption, style="dim")


def totals(state: dict) -> Text:
    """Updates by fate (rejected by reason) and messages refused outside rounds, by reason."""
    t = state.get("totals") or {}
    rejected = t.get("rejected") or {}
    text = Text(
        f"updates: accepted {t.get('accepted', 0)}, duplicate {t.get('duplicate', 0)}, "
        f"late {t.get('late', 0)}, rejected {sum(rejected.values())}"
        + (f" ({_counts(rejected)})" if rejected else "")
    )
    refused = t.get("refused_messages") or {}
    text.append(f"\nrefused messages: {_counts(refused) if refused else 'none'}")
    last = state.get("last_metrics") or {}
    if last:
        shown = {"devices": last.get("devices"), "samples": last.get("samples")}
        shown |= last.get("metrics") or {}
        values = ", ".join(f"{k} {_number(v)}" for k, v in shown.items() if v is not None)
        text.append(f"\nlast round ({last.get('round')}): {values}")
    return text


def render(state: dict, now: float | None = None) -> RenderableType:
    """The whole view of one state."""
    now = time.time() if now is None else now
    parts = [header(state, now)]
    if state.get("phase") not in ("done", "stopped"):  # no round in progress to show
        parts.append(progress(state))
    return Group(*parts, Text(""), device_table(state, now), totals(state))


def show(read, *, watch: bool, interval: float = 1.0, console=None) -> None:
    """Draw ``read()``'s state once, or redraw it every ``interval`` seconds until Ctrl-C.

    While watching, a failed read (the broker restarting, say) is shown under the last state
    and retried; the first read's error is raised."""
    from rich.console import Console
    from rich.live import Live

    from broker.errors import FedmqError

    console = console or Console()
    if not watch:
        console.print(render(read()))
        return
    try:
        state = read()
        with Live(render(state), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                try:
                    state, problem = read(), None
                except FedmqError as exc:
                    problem = Text(f"\n{exc} (retrying)", "red")
                view = render(state)
                live.update(Group(view, problem) if problem else view, refresh=True)
    except KeyboardInterrupt:
        return
