"""A recorded run's figures for operators, drawn from its run directory.

- ``metrics.png``: loss and accuracy per round (:func:`aggregator.plot.plot_metrics`);
- ``devices.png``: how far apart the devices' evaluations of each round's global model
  are (``devices.jsonl``: one line per (round, device), its ``metrics``), a
  min-max band, the middle half and the median of ``eval_accuracy`` and ``eval_loss``;
  a wide band says the model serves some devices much worse than others;
- ``bytes.png``: the bytes each round moved (``metrics.jsonl``'s ``update_bytes``, the
  accepted updates' payloads summed, and ``model_bytes``, the announced model).

A figure whose data the run did not record (an older run without byte counts, a run
without device rows) is skipped with a note instead of drawn empty.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.plot import (
    plot_metrics,
    pyplot,
    read_metrics,
    read_rows,
    round_axis,
    save_figure,
)
from broker.errors import FedmqError

METRICS_PNG = "metrics.png"
DEVICES_PNG = "devices.png"
BYTES_PNG = "bytes.png"
UPDATES = "updates received (accepted, summed)"
MODEL = "model announced (one copy)"


@dataclass
class RunPlots:
    """The PNGs written, and why any figure was left out."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def device_spread(devices_jsonl: str | Path, key: str) -> dict[int, list[float]]:
    """Each round's values of the devices' metric ``key`` (rounds without it left out)."""
    by_round: dict[int, list[float]] = {}
    for row in read_rows(devices_jsonl, "devices"):
        metrics = row.get("metrics")
        value = _number(metrics.get(key)) if isinstance(metrics, dict) else None
        if value is not None:
            by_round.setdefault(int(row["round"]), []).append(value)
    return dict(sorted(by_round.items()))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def plot_device_spread(
    devices_jsonl: str | Path, out_png: str | Path, title: str = "fedmq: devices' evaluations"
) -> Path | None:
    """Write the per-round spread of the devices' ``eval_accuracy`` and ``eval_loss``;
    None (nothing written) when no device row has either."""
    series = {key: device_spread(devices_jsonl, key) for key in ("eval_accuracy", "eval_loss")}
    if not any(series.values()):
        return None
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    all_rounds: list[int] = []
    for ax, key, label, color in (
        (axes[0], "eval_accuracy", "accuracy", "#ff7f0e"),
        (axes[1], "eval_loss", "loss", "#1f77b4"),
    ):
        spread = series[key]
        ax.set_title(f"Devices' evaluation {label} (global model, own data)")
        ax.set_ylabel(label)
        rounds = list(spread)
        all_rounds += rounds
        if not rounds:
            ax.text(
                0.5,
                0.5,
                f"no device {label} recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
            continue
        ordered = [sorted(values) for values in spread.values()]
        lows = [v[0] for v in ordered]
        highs = [v[-1] for v in ordered]
        q1 = [_quantile(v, 0.25) for v in ordered]
        q3 = [_quantile(v, 0.75) for v in ordered]
        medians = [statistics.median(v) for v in ordered]
        ax.fill_between(rounds, lows, highs, color=color, alpha=0.15, linewidth=0, label="min-max")
        ax.fill_between(rounds, q1, q3, color=color, alpha=0.35, linewidth=0, label="middle half")
        ax.plot(rounds, medians, color=color, marker="o", markersize=3.5, lw=1.8, label="median")
        xs = [r for r, values in spread.items() for _ in values]
        ys = [y for values in spread.values() for y in values]
        ax.scatter(xs, ys, s=6, color="#444444", alpha=0.35, linewidths=0, label="a device")
        if key == "eval_accuracy":
            ax.set_ylim(0.0, 1.02)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.legend(frameon=False, loc="best")
    for ax in axes:
        round_axis(ax, all_rounds)
    return save_figure(fig, Path(out_png))


def _bytes_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1, "bytes"


def plot_bytes(
    metrics_jsonl: str | Path, out_png: str | Path, title: str = "fedmq: bytes per round"
) -> Path | None:
    """Write the bytes each round moved (accepted updates summed; the announced model);
    None (nothing written) when the run did not record them (runs before byte counts)."""
    records = read_metrics(metrics_jsonl)
    rounds, updates, models = [], [], []
    for record in records:
        update, model = _number(record.get("update_bytes")), _number(record.get("model_bytes"))
        if update is None and model is None:
            continue
        rounds.append(int(record["round"]))
        updates.append(update if update is not None else math.nan)
        models.append(model if model is not None else math.nan)
    if not rounds:
        return None
    plt = pyplot()

    largest = max((v for v in updates + models if not math.isnan(v)), default=1.0)
    scale, unit = _bytes_unit(largest)
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    width = 0.4 if len(rounds) <= 40 else 0.8
    if len(rounds) <= 40:
        ax.bar(
            [r - width / 2 for r in rounds],
            [u / scale for u in updates],
            width,
            color="#1f77b4",
            label=UPDATES,
        )
        ax.bar(
            [r + width / 2 for r in rounds],
            [m / scale for m in models],
            width,
            color="#7f7f7f",
            label=MODEL,
        )
    else:  # bars too thin to read: lines
        ax.plot(rounds, [u / scale for u in updates], color="#1f77b4", lw=1.8, label=UPDATES)
        ax.plot(rounds, [m / scale for m in models], color="#7f7f7f", lw=1.8, label=MODEL)
    ax.set_ylabel(f"payload ({unit})")
    ax.set_ylim(0, largest / scale * 1.25)  # headroom for the legend above the bars
    ax.legend(frameon=False, loc="upper center", ncol=2)
    round_axis(ax, rounds)
    return save_figure(fig, Path(out_png))


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> RunPlots:
    """Draw a run's figures into ``out_dir`` (default: the run directory)."""
    run = Path(run_dir)
    metrics_jsonl = run / "metrics.jsonl"
    if not run.is_dir():
        raise FedmqError(f"{run}: not a directory")
    if not metrics_jsonl.is_file():
        raise FedmqError(f"{run}: no metrics.jsonl here (not a run directory, or no round done)")
    out = Path(out_dir) if out_dir is not None else run
    result = RunPlots()
    pyplot()  # the missing extra says so before anything else
    result.written.append(plot_metrics(metrics_jsonl, out / METRICS_PNG))

    devices_jsonl = run / "devices.jsonl"
    spread = (
        plot_device_spread(devices_jsonl, out / DEVICES_PNG) if devices_jsonl.is_file() else None
    )
    if spread is None:
        result.notes.append("no devices' evaluations recorded (devices.jsonl): devices.png skipped")
    else:
        result.written.append(spread)

    moved = plot_bytes(metrics_jsonl, out / BYTES_PNG)
    if moved is None:
        result.notes.append(
            "no byte counts in metrics.jsonl (a run from before they were recorded): "
            "bytes.png skipped"
        )
    else:
        result.written.append(moved)
    return result
