"""aggregator.plot: a metrics.jsonl becomes a real PNG."""

from __future__ import annotations

import json
import struct

import pytest

from broker.errors import FedmqError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


def write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def plot_metrics():
    pytest.importorskip("matplotlib")
    from aggregator.plot import plot_metrics

    return plot_metrics


def test_plot_writes_png(tmp_path, plot_metrics):
    records = [
        {
            "round": r,
            "train_loss": 2.0 / r,
            "eval_loss": 2.2 / r,
            "eval_accuracy": 1 - 0.5 / r,
            "test_accuracy": 0.9 - 0.5 / r,
            "devices": 3,
            "seconds": 0.4,
        }
        for r in range(1, 8)
    ]
    metrics = write_metrics(tmp_path / "metrics.jsonl", records)
    out = plot_metrics(
        metrics, tmp_path / "run" / "plot.png", title="test run", baseline_accuracy=0.88
    )
    assert out == tmp_path / "run" / "plot.png"
    width, height = png_size(out)
    assert width >= 600 and height >= 300 and width > height
    assert out.stat().st_size > 10_000
    assert not list(out.parent.glob("*.tmp*"))


def test_plot_tolerates_missing_keys_and_torn_tail(tmp_path, plot_metrics):
    records = [
        {"round": 0, "eval_accuracy": None},
        {"round": 1, "train_loss": 1.2},
        {"round": 2, "train_loss": 0.9, "eval_loss": 1.0, "eval_accuracy": 0.7},
        {"no_round": True},
    ]
    metrics = write_metrics(tmp_path / "metrics.jsonl", records, tail='{"round": 3, "tra')
    width, height = png_size(plot_metrics(metrics, tmp_path / "plot.png"))
    assert width > 0 and height > 0


def test_plot_of_empty_run(tmp_path, plot_metrics):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [])
    png_size(plot_metrics(metrics, tmp_path / "plot.png"))


def test_plot_errors_are_clear(tmp_path, plot_metrics):
    with pytest.raises(FedmqError, match="not found"):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path / "plot.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"round": 1}\n')
    with pytest.raises(FedmqError, match="bad.jsonl:1"):
        plot_metrics(bad, tmp_path / "plot.png")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    import sys

    from aggregator import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"round": 1}])
    with pytest.raises(FedmqError, match="pip install"):
        plot.plot_metrics(metrics, tmp_path / "plot.png")
