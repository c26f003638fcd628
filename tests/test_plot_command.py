"""`fedmq plot RUN_DIR`: a recorded run directory becomes readable PNGs for operators."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from click.testing import CliRunner

from fedmq.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")


def png_size(path) -> tuple[int, int]:
    """Width and height of a whole PNG (signature, IHDR first, IEND last)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    return struct.unpack(">II", data[16:24])


def metrics_row(round_: int, with_bytes: bool) -> dict:
    """A metrics.jsonl line shaped like Aggregator._complete's."""
    row = {
        "round": round_,
        "devices": len(DEVICES),
        "contributors": list(DEVICES),
        "samples": 400,
        "seconds": 1.5,
        "rejected": {},
        "metrics": {
            "train_loss": 1.5 / round_,
            "eval_loss": 1.6 / round_,
            "eval_accuracy": 0.5 + 0.08 * round_,
        },
        "strategy": "fedavg",
    }
    if with_bytes:
        row["update_bytes"] = len(DEVICES) * 250_000 + round_
        row["model_bytes"] = 250_123
    return row


def device_rows(round_: int) -> list[dict]:
    """devices.jsonl lines of one round, shaped like RunDir.commit's."""
    return [
        {
            "round": round_,
            "device": device,
            "num_samples": 100,
            "metrics": {
                "train_loss": 1.4 / round_,
                "eval_loss": (1.2 + 0.2 * i) / round_,
                "eval_accuracy": min(1.0, 0.4 + 0.08 * round_ + 0.05 * i),
            },
        }
        for i, device in enumerate(DEVICES)
    ]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def recorded_run(run, rounds: int = 6, with_bytes: bool = True, with_devices: bool = True):
    run.mkdir(parents=True)
    write_jsonl(run / "metrics.jsonl", [metrics_row(r, with_bytes) for r in range(1, rounds + 1)])
    if with_devices:
        write_jsonl(
            run / "devices.jsonl", [d for r in range(1, rounds + 1) for d in device_rows(r)]
        )
    return run


def fedmq_plot(*args):
    return CliRunner().invoke(main, ["plot", *map(str, args)])


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def test_plot_writes_the_three_figures_into_the_run(tmp_path, matplotlib):
    run = recorded_run(tmp_path / "run")
    result = fedmq_plot(run)
    assert result.exit_code == 0, result.output
    names = ("metrics.png", "devices.png", "bytes.png")
    assert result.stdout.splitlines() == [str(run / name) for name in names]
    for name in names:
        width, height = png_size(run / name)
        assert width > 600 and height > 300
    assert not list(run.glob("*.tmp.png"))


def test_plot_out_writes_elsewhere_and_leaves_the_run_alone(tmp_path, matplotlib):
    run = recorded_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "figures" / "nested"
    result = fedmq_plot(run, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bytes.png", "devices.png", "metrics.png"]
    assert sorted(p.name for p in run.iterdir()) == before


def test_old_run_without_byte_counts_still_plots_the_rest(tmp_path, matplotlib):
    run = recorded_run(tmp_path / "run", with_bytes=False)
    result = fedmq_plot(run)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(run / "metrics.png"), str(run / "devices.png")]
    assert "bytes.png skipped" in result.stderr
    assert not (run / "bytes.png").exists()
    png_size(run / "metrics.png")
    png_size(run / "devices.png")


def test_run_without_devices_jsonl_skips_the_spread(tmp_path, matplotlib):
    run = recorded_run(tmp_path / "run", with_devices=False)
    result = fedmq_plot(run)
    assert result.exit_code == 0, result.output
    assert "devices.png skipped" in result.stderr
    assert not (run / "devices.png").exists()
    png_size(run / "bytes.png")


def test_run_being_written_plots_what_is_whole(tmp_path, matplotlib):
    run = recorded_run(tmp_path / "run", rounds=2)
    with (run / "devices.jsonl").open("a") as f:
        f.write('{"round": 3, "device": "dev-a", "metr')  # torn mid-append
    result = fedmq_plot(run)
    assert result.exit_code == 0, result.output
    png_size(run / "devices.png")


def test_device_spread_per_round(tmp_path):
    from aggregator.run_plots import device_spread

    run = recorded_run(tmp_path / "run", rounds=2)
    spread = device_spread(run / "devices.jsonl", "eval_loss")
    assert list(spread) == [1, 2]
    assert spread[2] == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_directory_without_metrics_is_one_clear_line(tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    result = fedmq_plot(empty)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {empty}: no metrics.jsonl here (not a run directory, or no round done)"
    ]


def test_missing_directory_is_one_clear_line(tmp_path):
    result = fedmq_plot(tmp_path / "nowhere")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not a directory" in result.stderr


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    run = recorded_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = fedmq_plot(run)
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pip install 'fedmq[plot]'" in result.stderr
    assert not list(run.glob("*.png"))
