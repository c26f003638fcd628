"""scripts/install-agent.sh: a device agent installed as a service, from `broker add-device`'s
credentials to a started agent that reports itself online to a real mosquitto.

By default the install reuses this venv's packages (--site-packages-from); the "full" case
(FEDMQ_FULL_INSTALL_TEST=1) pip-installs CPU torch and the agent's dependencies into a new venv.
Not covered here: `useradd` of the `fedmq` user (the test runs the agent as the current
user) and systemctl enable/start (no systemd in the test machine). A run in a clean Debian
root and on emulated arm64 is scripts/arm64-round.sh, run by hand (minutes; README quotes
it); a real Pi, not at all.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.topics import Topics
from tests.helpers import mqtt_session, write_blobs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install-agent.sh"
# the agent's process must import the installed fedmq, not this checkout
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    defaults = {k: v for k, v in CLEAN_ENV.items() if k != "FEDMQ_TORCH_INDEX"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**defaults, **(env or {})},
        timeout=300,
    )


def layout(root: Path) -> dict[str, Path]:
    return {
        "prefix": root / "opt" / "fedmq",
        "etc-dir": root / "etc" / "fedmq",
        "state-dir": root / "var" / "lib" / "fedmq",
        "unit-dir": root / "etc" / "systemd" / "system",
    }


def dir_flags(dirs: dict[str, Path]) -> list[str]:
    return [arg for name, path in dirs.items() for arg in (f"--{name}", str(path))]


@pytest.mark.parametrize("script", [SCRIPT, SCRIPT.parent / "arm64-round.sh"], ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed: apt-get install shellcheck")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "machine, bits",
    [("armv7l", "32"), ("armv6l", "32"), ("aarch64", "32")],
    ids=["armv7", "armv6", "64-bit-kernel-32-bit-userland"],
)
def test_32bit_arm_is_refused_with_the_reason(tmp_path, machine, bits):
    creds, data = tmp_path / "dev.toml", tmp_path / "d.csv"
    creds.write_text("")
    data.write_text("")
    arch = {"FEDMQ_INSTALL_ARCH": machine, "FEDMQ_INSTALL_BITS": bits}
    result = script(
        "install", "--credentials", str(creds), "--data", str(data), "--dry-run", env=arch
    )
    assert result.returncode == 1
    message = result.stderr
    assert "32-bit" in message and "no torch wheel" in message and "64-bit" in message
    assert "arm64" in message


def test_dry_run_on_arm64_installs_the_pinned_torch_from_pypi_and_changes_nothing(tmp_path):
    creds, data = tmp_path / "dev.toml", tmp_path / "d.csv"
    creds.write_text("")
    data.write_text("")
    dirs = layout(tmp_path / "root")
    arch = {"FEDMQ_INSTALL_ARCH": "aarch64", "FEDMQ_INSTALL_BITS": "64"}
    args = ["install", "--credentials", str(creds), "--data", str(data), "--dry-run"]
    result = script(*args, *dir_flags(dirs), "--user", "nobody-fedmq-test", env=arch)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # no extra index, the pinned version; and the warning that PyPI's aarch64 wheel is a
    # CUDA build (its NVIDIA dependencies are gigabytes)
    assert "pip_quiet torch==2.13.0\n" in out and "index-url" not in out
    assert "note: PyPI's aarch64 torch 2.13.0 is a CUDA build" in out
    assert "useradd --system" in out and "nobody-fedmq-test" in out
    assert "matplotlib" not in out and "scikit-learn" not in out
    assert not (tmp_path / "root").exists()
    x86 = script(*args, *dir_flags(dirs), "--user", "root", env={"FEDMQ_INSTALL_ARCH": "x86_64"})
    assert "pip_quiet torch==2.13.0\n" in x86.stdout  # as pip finds it (setup.sh does the same)
    assert "point FEDMQ_TORCH_INDEX at PyTorch's CPU wheel index" in x86.stdout
    index = "https://cpu-wheels.invalid/whl"  # the +cpu build from the index given
    cpu = script(
        *args,
        *dir_flags(dirs),
        "--user",
        "root",
        env={"FEDMQ_INSTALL_ARCH": "x86_64", "FEDMQ_TORCH_INDEX": index},
    )
    assert f"--extra-index-url {index} torch==2.13.0+cpu" in cpu.stdout


@pytest.mark.parametrize("has_torch", [True, False], ids=["right-torch", "no-torch"])
def test_keep_venv_keeps_only_a_venv_with_the_pinned_torch(tmp_path, has_torch):
    creds, data = tmp_path / "dev.toml", tmp_path / "d.csv"
    creds.write_text("")
    data.write_text("")
    dirs = layout(tmp_path / "root")
    python = dirs["prefix"] / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # a stand-in for the venv's python: "import torch" succeeds (exit 0) or fails (exit 1)
    python.write_text(f"#!/bin/sh\nexit {0 if has_torch else 1}\n")
    python.chmod(0o755)
    arch = {"FEDMQ_INSTALL_ARCH": "aarch64", "FEDMQ_INSTALL_BITS": "64"}
    args = ["install", "--credentials", str(creds), "--data", str(data), "--dry-run"]
    result = script(*args, *dir_flags(dirs), "--user", "root", "--keep-venv", env=arch)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if has_torch:
        assert "keeping the venv" in out and "torch==2.13.0" not in out
        assert "venv --clear" not in out
        assert "pip_quiet paho-mqtt>=2.1,<3" in out  # the agent's dependencies, checked
    else:
        assert "keeping the venv" not in out and "pip_quiet torch==2.13.0" in out
        assert "venv --clear" in out


def test_install_needs_the_credentials_and_the_data(tmp_path):
    result = script("install", "--data", str(tmp_path / "x.csv"), "--dry-run")
    assert result.returncode == 1 and "--credentials FILE is required" in result.stderr
    creds = tmp_path / "dev.toml"
    creds.write_text("")
    result = script("install", "--credentials", str(creds), "--data", "nope.csv", "--dry-run")
    assert result.returncode == 1 and "--data nope.csv: no such file" in result.stderr


def status_messages(fed, device: str) -> tuple[queue.Queue, object]:
    """A session of the aggregator's account subscribed to ``device``'s status topic."""
    inbox: queue.Queue = queue.Queue()
    session = mqtt_session(fed.settings("fedmq-aggregator"), "test-install-watch")
    client = session.__enter__()
    client.on_message = lambda c, u, m: inbox.put(json.loads(m.payload)) if m.payload else None
    client.subscribe(Topics(fed.name).status(device), qos=1)
    return inbox, session


def wait_status(inbox: queue.Queue, status: str, proc=None, timeout: float = 60) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the agent exited with {proc.returncode}")
        try:
            message = inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if message.get("status") == status:
            return message
    raise AssertionError(f"no {status!r} status within {timeout}s")


FULL = pytest.param(
    [],
    id="full-venv",
    marks=pytest.mark.skipif(
        os.environ.get("FEDMQ_FULL_INSTALL_TEST") != "1",
        reason="pip-installs torch into a new venv (~1 GB, ~40 s from local wheels): "
        "set FEDMQ_FULL_INSTALL_TEST=1 (and FEDMQ_TORCH_INDEX= when offline)",
    ),
)


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    "venv_args", [["--site-packages-from", sys.prefix], FULL], ids=["reused-packages", "full"]
)
def test_installed_agent_starts_from_its_config_and_reports_online(tmp_path, federation, venv_args):
    fed = federation(devices=["pi-kitchen"])
    data = write_blobs(tmp_path / "data", ["pi-kitchen"])["pi-kitchen"]
    dirs = layout(tmp_path / "root")
    user = getpass.getuser()
    result = script(
        "install",
        "--credentials",
        str(fed.credentials("pi-kitchen")),
        "--data",
        str(data),
        *dir_flags(dirs),
        "--user",
        user,
        "--from",
        str(REPO),
        *venv_args,
        "--threads",
        "1",
        "--no-systemd",
        env={k: v for k, v in os.environ.items() if k == "FEDMQ_TORCH_INDEX"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "systemctl enable --now fedmq-agent" in result.stdout

    etc, state = dirs["etc-dir"], dirs["state-dir"]
    venv = dirs["prefix"] / "venv"
    config = etc / "agent.toml"
    copied = ("pi-kitchen.ed25519", "ca.crt", "aggregator.pub", "registry.pub")
    for secret in (config, *(etc / name for name in copied)):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    text = config.read_text()
    # secure aggregation: the registry's key and its certificate of this device's key
    assert 'registry_key = "registry.pub"' in text and "identity_cert = " in text
    assert 'device_id = "pi-kitchen"' in text and "threads = 1" in text
    assert f'data = "{state / "data" / data.name}"' in text
    # the package came from this checkout, into the new venv (not the reused packages)
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import fedmq; print(fedmq.__file__)"],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        cwd=tmp_path,  # not this checkout: python -c imports from its working directory
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    unit = dirs["unit-dir"] / "fedmq-agent.service"
    lines = unit.read_text().splitlines()
    for setting in (
        f"User={user}",
        "Restart=on-failure",
        "StandardOutput=journal",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={state}",
    ):
        assert setting in lines, setting
    assert any(line.startswith("CPUQuota=") for line in lines)
    assert any(line.startswith("MemoryMax=") for line in lines)
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stderr == "", verify.stderr  # no ignored or unknown settings

    # start the agent as the unit would (its ExecStart, from its working directory), with
    # Python's import log on to see what it loads
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    command = shlex.split(exec_start.removeprefix("ExecStart="))
    assert command[0] == str(venv / "bin/fedmq")
    inbox, session = status_messages(fed, "pi-kitchen")
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=state,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**CLEAN_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPROFILEIMPORTTIME": "1"},
        )
    try:
        try:
            online = wait_status(inbox, "online", proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
        assert online["device_id"] == "pi-kitchen"
        proc.terminate()  # what systemctl stop sends: a clean stop, "offline" published
        assert proc.wait(30) == 0
        wait_status(inbox, "offline", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        session.__exit__(None, None, None)
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in log.read_text().splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported and "paho" in imported
    assert not imported & {"matplotlib", "sklearn", "pandas", "seglearn"}, imported

    removed = script("uninstall", "--purge", "--etc-dir", str(etc), "--no-systemd")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    for path in (venv, unit, etc, state):
        assert not path.exists(), path


@pytest.mark.parametrize("value", ["0", '"two"', "true"])
def test_a_bad_threads_limit_in_the_config_is_one_line_naming_the_key(tmp_path, value):
    from click.testing import CliRunner

    from fedmq.cli import main

    config = tmp_path / "agent.toml"
    config.write_text(
        'federation = "f"\nbroker = "127.0.0.1:1"\nusername = "d"\npassword = "p"\n'
        f'data = "d.csv"\nthreads = {value}\n'
    )
    result = CliRunner().invoke(main, ["agent", "run", "--config", str(config), "--insecure"])
    assert result.exit_code == 1
    assert f"{config}: threads must be a whole number of at least 1" in result.output
