"""A small run of scripts/bench_secagg.py: real MQTT devices (own accounts, TLS, signed)
through a plain round and a secure round with 30% of them gone after sharing; the secure
model equals FedAvg of the survivors' synthetic updates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_secagg.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_secagg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mosquitto
def test_secure_round_with_dropout_equals_fedavg_of_survivors_and_costs_little_upload(tmp_path):
    # 10 devices: degree 8 of 9 others, threshold 5; 3 dropped leave every secret 5+ shares
    argv = ["--devices", "10", "--dropout", "0.3", "--procs", "1", "--work", str(tmp_path)]
    plain, secure = _bench().main(argv)
    assert not plain["secure"] and secure["secure"] and not secure["failed"]
    assert secure["dropped"] == 3 and secure["roster"] == 10
    assert 0 < secure["max_diff"] < 1e-5 and plain["max_diff"] < 1e-6
    assert set(secure["phases"]) >= {"keys", "shares", "masked", "unmask"}
    assert secure["unmask_compute"] >= 0 and secure["rss_peak_mb"] > 0
    assert set(secure["upload_by_kind"]) == {"keys", "shares", "masked", "receipt", "reveal"}
    assert 1.0 < secure["upload_mean"] / plain["upload_mean"] < 1.3


def test_expected_secrets_lacking_shares():
    bench = _bench()
    assert bench.expected_lacking(10, 3) == 0  # the complete graph: at most 3 of 9 dropped
    assert bench.expected_lacking(1000, 0) == 0
    # sized for 30% dropout (degree 134, threshold 68): about 1e-4 secrets lost at 30%
    # (degree 20 lost about 46 of them: tests/test_secagg_primitives.py)
    assert bench.expected_lacking(1000, 300) < 1e-3
    assert bench.expected_lacking(1000, 50) < 1e-9
    assert bench.hypergeom_at_least(10, 4, 4, 4) == pytest.approx(1 / 210)
