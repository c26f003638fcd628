"""README "Running a federation" on a LAN: the credentials name the broker as its certificate does.

`broker init --host broker.lan` makes a server certificate for broker.lan
alone; the address `broker up` writes into every credentials file must be a
name of that certificate, or every TLS client fails verification.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from broker.connection import ConnectionWatch, connect_async, make_client
from broker.home import BrokerHome, load_credentials, settings_from_credentials
from broker.launcher import free_port
from fedmq.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def cert_names(home: BrokerHome) -> list[str]:
    cert = x509.load_pem_x509_certificate((home.path / "pki/server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def init(tmp_path: Path, *hosts: str) -> BrokerHome:
    args = ["broker", "init", str(tmp_path / "home"), "--federation", "greenhouse"]
    for host in hosts:
        args += ["--host", host]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return BrokerHome(tmp_path / "home")


def broker_host(credentials: Path) -> str:
    return load_credentials(credentials)["broker"].rpartition(":")[0].strip("[]")


@pytest.mark.parametrize(
    "hosts",
    [["broker.lan"], ["broker.lan", "192.168.1.10"], ["10.0.0.5", "broker.lan"], ["::1"]],
    ids=["one-name", "name-and-ip", "ip-first", "ipv6"],
)
def test_credentials_name_a_host_of_the_certificate(tmp_path, hosts):
    home = init(tmp_path, *hosts)
    home.write_config(port=1883, tls_port=8883)  # what `broker up` does; default bind 127.0.0.1
    names = cert_names(home)
    assert sorted(names) == sorted(hosts)
    for account in home.accounts():
        assert broker_host(home.credentials_path(account)) in names
    late = home.add_device("pi-kitchen")  # added after `up`: the same address
    assert broker_host(late) == hosts[0]
    assert load_credentials(late)["broker"].endswith(":8883")


def test_a_bind_address_the_certificate_names_is_the_address(tmp_path):
    home = init(tmp_path, "broker.lan", "192.168.1.10")
    home.write_config(port=None, tls_port=8883, bind="192.168.1.10")
    assert broker_host(home.credentials_path("fedmq-aggregator")) == "192.168.1.10"
    home.write_config(port=None, tls_port=8883, bind="0.0.0.0")
    assert broker_host(home.credentials_path("fedmq-aggregator")) == "broker.lan"


def test_add_device_refuses_an_address_the_certificate_does_not_name(tmp_path):
    home = init(tmp_path, "broker.lan")
    result = CliRunner().invoke(
        main,
        ["broker", "add-device", "pi", "--home", str(home.path), "--broker", "127.0.0.1:8883"],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "127.0.0.1 is not a name in the broker's certificate (broker.lan)" in result.output
    ok = CliRunner().invoke(
        main,
        ["broker", "add-device", "pi", "--home", str(home.path), "--broker", "BROKER.LAN:8883"],
    )
    assert ok.exit_code == 0, ok.output


# --------------------------------------------------------------------------- end to end


class BrokerUp:
    """`fedmq broker up` as a child process, on loopback; stopped with SIGTERM."""

    def __init__(self, home: Path, tls_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", "broker", "up", "--home", str(home)]
            + ["--port", "0", "--tls-port", str(tls_port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_running(self, timeout: float = 20) -> str:
        while not any("mosquitto running" in line for line in self.output):
            try:
                self.output.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError("broker up did not start:\n" + "".join(self.output)) from None
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def broker_up():
    started: list[BrokerUp] = []

    def start(home: Path, tls_port: int) -> BrokerUp:
        started.append(BrokerUp(home, tls_port))
        return started[-1]

    yield start
    for b in started:
        b.stop()


def test_written_address_passes_tls_verification(tmp_path, broker_up):
    """init --host localhost, up on loopback, add-device: a device connects with its
    credentials file alone, TLS verification on."""
    home = init(tmp_path, "localhost")
    tls_port = free_port()
    up = broker_up(home.path, tls_port)
    output = up.wait_running()
    assert f"clients dial localhost:{tls_port}" in output
    added = CliRunner().invoke(
        main, ["broker", "add-device", "pi-kitchen", "--home", str(home.path)]
    )
    assert added.exit_code == 0, added.output
    settings = settings_from_credentials(home.credentials_path("pi-kitchen"))
    assert settings.tls and settings.host == "localhost"
    client = make_client(settings, "lan-probe", persistent=False)
    watch = ConnectionWatch(client, settings, logging.getLogger("fedmq.test"), patient=False)
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        watch.wait_connected(10)  # raises the specific reason if verification failed
    finally:
        client.disconnect()
        client.loop_stop()


def test_broker_lan_certificate_is_what_the_broker_serves(tmp_path, broker_up):
    """init --host broker.lan: the broker (on loopback here) presents a certificate that
    verifies for the host name in the credentials file, with the CA file it names."""
    home = init(tmp_path, "broker.lan")
    tls_port = free_port()
    output = broker_up(home.path, tls_port).wait_running()
    assert f"clients dial broker.lan:{tls_port}" in output
    assert "--bind 0.0.0.0" in output  # loopback only, while the certificate names a LAN host
    creds = load_credentials(home.credentials_path("fedmq-operator"))
    host = broker_host(home.credentials_path("fedmq-operator"))
    context = ssl.create_default_context(cafile=str(creds["ca_file"]))
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:  # verifies name and CA
            assert tls.version()


# --------------------------------------------------------------------------- the README


def readme_federation_block() -> str:
    text = README.read_text()
    section = text.split("## Running a federation", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def test_readme_flow_documents_bind_and_runs(tmp_path, broker_up, monkeypatch):
    """The README's server commands, copied (host and ports swapped for a test machine's
    loopback), give credentials that reach the broker: status gets past TLS and login."""
    block = readme_federation_block()
    assert "--bind 0.0.0.0" in block
    commands = [
        line.split("#")[0].strip() for line in block.splitlines() if line.startswith("fedmq broker")
    ]
    init_cmd, up_cmd, add_cmd = commands[:3]
    assert init_cmd.startswith("fedmq broker init ./fedmq-broker --federation greenhouse --host ")
    monkeypatch.chdir(tmp_path)
    args = init_cmd.split()[1:]
    args[args.index("--host") + 1] = "localhost"  # broker.lan does not resolve here
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    up_args = up_cmd.split()[1:]
    assert up_args[:3] == ["broker", "up", "--home"] and "--bind" in up_args
    tls_port = free_port()
    broker_up(Path(up_args[3]), tls_port).wait_running()  # on loopback: tests never bind wider
    result = CliRunner().invoke(main, add_cmd.split()[1:])
    assert result.exit_code == 0, result.output
    assert "fedmq agent run --config" in result.output
    status = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "aggregator", "status", "--timeout", "2"]
        + ["--config", "fedmq-broker/credentials/fedmq-operator.toml"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert status.returncode == 1
    assert f"connected to localhost:{tls_port}, but no aggregator state" in status.stderr


def test_broker_up_help_explains_bind():
    result = CliRunner().invoke(main, ["broker", "up", "--help"])
    text = " ".join(result.output.split())
    assert "--bind 0.0.0.0" in text and "LAN" in text
