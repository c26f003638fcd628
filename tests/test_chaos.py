"""A short run of scripts/chaos.py: aggregator, agents and broker killed at random moments;
the final model must equal the fault-free run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mosquitto
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"


def test_short_chaos_run_ends_with_the_fault_free_model(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--devices",
            "3",
            "--rounds",
            "4",
            "--faults",
            "4",
            "--seed",
            "1",
            "--samples",
            "400",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "faults injected 4" in result.stdout
    assert "lost 0; double-counted 0" in result.stdout
    assert "IDENTICAL" in result.stdout
