"""A whole federation on this machine: a secured mosquitto, agents, an aggregator.

Used by ``fedmq demo``, the bob-and-alice example, the chaos script and the
tests. The broker is a real mosquitto configured by ``BrokerHome`` (accounts,
ACL, TLS) on free loopback ports; agents run as real ``fedmq agent run``
processes or in threads; the aggregator gets its config from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aggregator.service import AggregatorConfig
from broker.home import BrokerHome, load_credentials, settings_from_credentials
from broker.launcher import RunningBroker, free_ports
from broker.task import TaskSpec
from device_agent.agent import AgentConfig
from fedmq.signing_hooks import agent_hooks, agent_identity, aggregator_hooks, known_devices
from fedmq.zygote import ForkedProcess, Zygote

AGGREGATOR = "fedmq-aggregator"
OPERATOR = "fedmq-operator"


class LocalFederation:
    def __init__(self, home: BrokerHome, name: str, devices: list[str]) -> None:
        self.home = home
        self.name = name
        self.devices = devices
        port, tls_port = free_ports(2)
        self.port = port if home.plaintext else None
        self.tls_port = tls_port if home.tls else None
        self.broker: RunningBroker | None = None
        self.procs: list[subprocess.Popen | ForkedProcess] = []
        self._zygote: Zygote | None = None  # started by the first spawn

    @classmethod
    def create(cls, path: Path, name: str, devices: list[str], **home_options) -> LocalFederation:
        home = BrokerHome.create(path, name, **home_options)
        home.add_devices(devices)  # one pass: a test's 120 devices in a fraction of a second
        return cls(home, name, list(devices))

    def add_site(
        self,
        path: Path,
        name: str,
        account: str,
        devices: list[str],
        *,
        bridge_to: str | None = None,
        cls: type[LocalFederation] | None = None,
    ) -> LocalFederation:
        """A site of this (root) federation, not started: its own broker home ``name`` with
        ``devices``, bridged to this broker as the device ``account`` (added here if new,
        a running broker reloaded), at ``bridge_to`` (default: this broker's address)."""
        if account not in self.home.accounts():
            self.home.add_device(account)
            self.home.reload()
        home = BrokerHome.create(
            path, name, bridge_credentials=self.credentials(account), bridge_to=bridge_to
        )
        for device in devices:
            home.add_device(device)
        return (cls or LocalFederation)(home, name, list(devices))

    def upstream(self):  # -> aggregator.upstream.Upstream, not yet connected
        """A site's link to its root, as its aggregator account on the site's broker."""
        from aggregator.upstream import Upstream

        if self.home.upstream_path is None:
            raise ValueError(f"{self.name} is not a site (its broker home has no bridge)")
        return Upstream(
            self.home.upstream_path, self.settings(AGGREGATOR), site_federation=self.name
        )

    # -- broker ----------------------------------------------------------------------
    def start_broker(self) -> RunningBroker:
        self.broker = self.home.start(self.port, self.tls_port)
        return self.broker

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    def restart_broker(self) -> None:
        self.stop_broker()
        self.start_broker()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        self.stop_broker()

    def __enter__(self) -> LocalFederation:
        self.start_broker()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounts ----------------------------------------------------------------------
    def credentials(self, account: str) -> Path:
        return self.home.credentials_path(account)

    def settings(self, account: str):
        return settings_from_credentials(self.credentials(account))

    def agent_config(self, device: str, data: Path, **options) -> AgentConfig:
        creds = load_credentials(self.credentials(device))
        sign, verify = agent_hooks(creds["signing_key"], creds["model_key"])
        options.setdefault(
            "identity",
            agent_identity(creds["signing_key"], creds["registry_key"], creds["identity_cert"]),
        )
        return AgentConfig(
            connection=settings_from_credentials(creds),
            federation=self.name,
            device_id=device,
            data_path=data,
            sign=sign,
            verify_model=verify,
            **options,
        )

    def aggregator_config(
        self, run_dir: Path, task: TaskSpec | None, **options
    ) -> AggregatorConfig:
        creds = load_credentials(self.credentials(AGGREGATOR))
        sign_model, verify_update = aggregator_hooks(creds["signing_key"], creds["device_keys"])
        connection = settings_from_credentials(creds)
        if connection.cluster:  # statuses read by exact topic (broker/retained_mirror.py)
            options.setdefault("devices", known_devices(creds["device_keys"]))
        return AggregatorConfig(
            connection=connection,
            federation=self.name,
            run_dir=run_dir,
            task=task,
            sign_model=sign_model,
            verify_update=verify_update,
            **options,
        )

    # -- processes -----------------------------------------------------------------------
    def spawn(self, *args: str, log: Path | None = None, fresh: bool = False):
        """``fedmq ARGS`` as a process of its own; ``close`` kills what is still running.

        Forked from the federation's zygote (``fedmq/zygote.py``), which imported torch
        once for all of them; ``fresh`` (or ``FEDMQ_SPAWN=exec``) starts a new interpreter
        instead, as a device would, cold."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if fresh or os.environ.get("FEDMQ_SPAWN") == "exec":
            proc = _exec(list(args), env, log)
        else:
            if self._zygote is None:
                self._zygote = Zygote(env=env, log=self.home.path / "zygote.log")
            proc = self._zygote.spawn(list(args), env=env, log=log)
        self.procs.append(proc)
        return proc

    def spawn_agent(
        self, device: str, data: Path, *extra: str, log: Path | None = None, fresh: bool = False
    ):
        args = ["agent", "run", "--config", str(self.credentials(device)), "--data", str(data)]
        return self.spawn(*args, "--threads", "1", *extra, log=log, fresh=fresh)

    def spawn_aggregator(self, *extra: str, log: Path | None = None):
        return self.spawn(
            "aggregator", "start", "--config", str(self.credentials(AGGREGATOR)), *extra, log=log
        )


def _exec(args: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        if log:
            out.close()
