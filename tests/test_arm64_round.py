"""scripts/arm64-round.sh and its host side scripts/chroot_round.py: the cheap parts.

The script itself (debootstrap, qemu, a federation with an agent in the root) takes
minutes to tens of minutes and needs root and the network: it is run by hand, and its
output is quoted in README's "Deploying on a Raspberry Pi". Here: shellcheck, option
checks, and the host side's helpers (what goes into the root, how the unit is started).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.local import AGGREGATOR, LocalFederation

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "arm64-round.sh"

# scripts/ is not a package: load the module by path
_spec = importlib.util.spec_from_file_location("chroot_round", REPO / "scripts" / "chroot_round.py")
chroot_round = importlib.util.module_from_spec(_spec)
sys.modules["chroot_round"] = chroot_round
_spec.loader.exec_module(chroot_round)


# shellcheck: tests/test_install_agent.py::test_scripts_pass_shellcheck


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "--rounds must be a number from 1 to 99"),
        (["--host-agents", "many"], "--host-agents must be a number from 0 to 9"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_bad_options_are_refused_before_anything_is_installed(args, message):
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    assert result.returncode == 1
    assert message in result.stderr
    assert "debootstrap" not in result.stdout


def test_the_unit_is_started_as_systemd_would():
    unit = chroot_round.read_unit(
        "[Service]\nUser=fedmq\nEnvironmentFile=-/etc/fedmq/agent.env\n"
        "Environment=PYTHONUNBUFFERED=1 HOME=/var/lib/fedmq\n"
        "WorkingDirectory=/var/lib/fedmq\n"
        "ExecStart=/opt/fedmq/venv/bin/fedmq agent run --config /etc/fedmq/agent.toml\n"
    )
    assert unit.argv == [
        "/opt/fedmq/venv/bin/fedmq",
        "agent",
        "run",
        "--config",
        "/etc/fedmq/agent.toml",
    ]
    assert unit.user == "fedmq" and unit.workdir == "/var/lib/fedmq"
    assert unit.env == {"PYTHONUNBUFFERED": "1", "HOME": "/var/lib/fedmq"}


def test_a_unit_without_exec_start_is_one_line_naming_what_is_missing():
    with pytest.raises(SystemExit, match="has no ExecStart, WorkingDirectory"):
        chroot_round.read_unit("[Service]\nUser=fedmq\n")


def test_the_root_sees_pip_settings_and_nothing_else(monkeypatch):
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("FEDMQ_TORCH_INDEX", "")
    monkeypatch.setenv("PYTHONPATH", "/work/somewhere")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = chroot_round.root_env(EXTRA="1")
    assert env[:2] == ["/usr/bin/env", "-i"]
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in env
    assert "FEDMQ_TORCH_INDEX=" in env and "EXTRA=1" in env and "HOME=/root" in env
    assert not [item for item in env if item.startswith(("PYTHONPATH=", "SECRET_TOKEN="))]


def test_only_the_devices_bundle_goes_into_the_root(tmp_path):
    fed = LocalFederation.create(tmp_path / "broker", "f", ["pi"])
    data = tmp_path / "device-0.npz"
    data.write_bytes(b"data")
    dest = tmp_path / "root" / "tmp" / "fedmq-in"
    creds, data_in_root = chroot_round.copy_bundle(fed.credentials("pi"), data, dest)
    assert (creds, data_in_root) == ("/tmp/fedmq-in/pi.toml", "/tmp/fedmq-in/device-0.npz")
    assert sorted(p.name for p in dest.iterdir()) == [
        "aggregator.pub",
        "ca.crt",
        "device-0.npz",
        "pi.ed25519",
        "pi.toml",
        "registry.pub",  # the registry's public key: secure aggregation checks peers with it
    ]
    assert not (dest / f"{AGGREGATOR}.toml").exists()
    assert (dest / "device-0.npz").read_bytes() == b"data"


def test_round_line_says_whether_the_guests_update_was_accepted():
    watch = chroot_round.GuestWatch(proc=None, device="arm64-0", started=0.0, peak_kb=700 * 1024)
    row = {
        "round": 2,
        "devices": 3,
        "seconds": 81.25,
        "contributors": ["arm64-0", "watch-0", "watch-1"],
        "metrics": {"eval_accuracy": 0.5},
    }
    line = chroot_round.round_line(row, "arm64-0", watch)
    assert line == (
        "round 2: 3 devices, 81.2 s; arm64-0's update accepted; eval_accuracy 0.5000; "
        "arm64-0 peak memory so far 700 MB"
    )
    row["contributors"] = ["watch-0"]
    assert "arm64-0's update NOT accepted" in chroot_round.round_line(row, "arm64-0", watch)
