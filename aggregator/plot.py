"""A run's plot: loss and accuracy per round, drawn from its ``metrics.jsonl``.

Each line of ``metrics.jsonl`` is one JSON object per round with at least ``round``;
the devices' sample-weighted means sit under ``metrics`` (top level in older runs):
``train_loss`` (devices' mean local training loss), ``eval_loss`` and ``eval_accuracy``
(the global model evaluated by the devices on their own data); ``test_accuracy`` (on a
held-out set, when the run has one), ``devices``, ``seconds`` are top-level keys.
Missing keys, ``null`` values, blank lines and a torn last line (a run still being
written) are tolerated. matplotlib is only needed here, and only imported when called.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from broker.errors import FedmqError

_SERIES = ("train_loss", "eval_loss", "eval_accuracy", "test_accuracy")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a FedmqError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedmqError(
            "plotting needs matplotlib: pip install 'fedmq[plot]' (or matplotlib)"
        ) from None
    return plt


def save_figure(fig, out: Path) -> Path:
    """Write ``fig`` to ``out`` whole (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    os.replace(tmp, out)
    return out


def read_rows(jsonl: str | Path, what: str = "metrics") -> list[dict[str, Any]]:
    """The JSON objects of a run's ``.jsonl`` file that carry a finite ``round``, in file
    order; blank lines and a torn last line (a run still being written) are skipped."""
    path = Path(jsonl)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FedmqError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FedmqError(f"{path}: cannot read {what}: {exc}") from None
    rows: list[dict[str, Any]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a torn last line of a run still being written
                continue
            raise FedmqError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise FedmqError(f"{path}:{number}: not a JSON object")
        r = record.get("round")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            continue
        rows.append(record)
    return rows


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a ``metrics.jsonl``, sorted by round (last one wins)."""
    by_round = {int(record["round"]): record for record in read_rows(metrics_jsonl)}
    return [by_round[r] for r in sorted(by_round)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for record in records:
        device_means = record.get("metrics")
        value = record.get(key)
        if isinstance(device_means, dict) and key in device_means:
            value = device_means[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        xs.append(int(record["round"]))
        ys.append(float(value))
    return xs, ys


def plot_metrics(
    metrics_jsonl: str | Path,
    out_png: str | Path,
    title: str = "fedmq: federated training",
    *,
    baseline_accuracy: float | None = None,
) -> Path:
    """Write a two-panel PNG (loss per round, accuracy per round); return its path.

    ``baseline_accuracy`` (for example the centralized model's test accuracy) is drawn
    as a dashed horizontal line on the accuracy panel.
    """
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    records = read_metrics(metrics_jsonl)
    out = Path(out_png)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    style = {"marker": "o", "markersize": 3.5, "linewidth": 1.8}

    drawn = False
    for key, label, color in (
        ("train_loss", "train (devices, local)", "#1f77b4"),
        ("eval_loss", "federated eval", "#ff7f0e"),
    ):
        xs, ys = _series(records, key)
        if xs:
            ax_loss.plot(xs, ys, label=label, color=color, **style)
            drawn = True
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("loss")
    if drawn:
        ax_loss.legend(frameon=False)
    else:
        ax_loss.text(
            0.5,
            0.5,
            "no loss recorded",
            ha="center",
            va="center",
            transform=ax_loss.transAxes,
            color="gray",
        )

    drawn = False
    for key, label, color in (
        ("eval_accuracy", "federated eval", "#ff7f0e"),
        ("test_accuracy", "held-out test", "#2ca02c"),
    ):
        xs, ys = _series(records, key)
        if xs:
            ax_acc.plot(xs, ys, label=label, color=color, **style)
            drawn = True
    if baseline_accuracy is not None and math.isfinite(baseline_accuracy):
        ax_acc.axhline(
            baseline_accuracy,
            color="#7f7f7f",
            linestyle="--",
            linewidth=1.4,
            label=f"centralized baseline ({baseline_accuracy:.1%})",
        )
        drawn = True
    ax_acc.set_title("Accuracy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(1.0))
    if drawn:
        ax_acc.legend(frameon=False, loc="lower right")
    else:
        ax_acc.text(
            0.5,
            0.5,
            "no accuracy recorded",
            ha="center",
            va="center",
            transform=ax_acc.transAxes,
            color="gray",
        )

    rounds = [int(r["round"]) for r in records]
    for ax in (ax_loss, ax_acc):
        round_axis(ax, rounds)

    return save_figure(fig, out)


def round_axis(ax, rounds: list[int]) -> None:
    """An x axis of whole rounds, padded, with a light grid and no top/right frame."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if rounds:
        lo, hi = min(rounds), max(rounds)
        pad = max(0.5, (hi - lo) * 0.03)
        ax.set_xlim(lo - pad, hi + pad)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
