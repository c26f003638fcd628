"""Test helpers: a secured federation on a real mosquitto, agents and aggregators to run on it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.service import Aggregator, AggregatorConfig
from broker.home import BrokerHome, load_credentials, settings_from_credentials
from broker.launcher import RunningBroker, free_port
from broker.task import TaskSpec
from device_agent.agent import Agent, AgentConfig
from fedmq.cli import signing_hooks

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Federation:
    home: BrokerHome
    broker: RunningBroker
    name: str
    devices: list[str]
    port: int
    tls_port: int
    threads: list[threading.Thread] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, path: Path, name: str, devices: list[str], **create) -> Federation:
        home = BrokerHome.create(path, name, **create)
        for device in devices:
            home.add_device(device)
        port, tls_port = free_port(), free_port()
        broker = home.start(port if home.plaintext else None, tls_port if home.tls else None)
        return cls(home, broker, name, devices, port, tls_port)

    # -- who is who ------------------------------------------------------------------
    def credentials(self, account: str) -> Path:
        return self.home.credentials_path(account)

    def settings(self, account: str):
        return settings_from_credentials(self.credentials(account))

    # -- broker lifecycle ------------------------------------------------------------
    def restart_broker(self) -> None:
        self.broker.stop()
        self.broker = self.home.start(
            self.port if self.home.plaintext else None, self.tls_port if self.home.tls else None
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.broker.stop()
        for thread in self.threads:
            thread.join(timeout=10)

    # -- in-process roles --------------------------------------------------------------
    def agent(self, device: str, data: Path, **kwargs) -> Agent:
        creds = load_credentials(self.credentials(device))
        sign, verify = _agent_signing(creds)
        config = AgentConfig(
            connection=settings_from_credentials(creds),
            federation=self.name,
            device_id=device,
            data_path=data,
            sign=sign,
            verify_model=verify,
            **kwargs,
        )
        return Agent(config)

    def aggregator(self, run_dir: Path, task: TaskSpec | None, **kwargs) -> Aggregator:
        creds = load_credentials(self.credentials("fedmq-aggregator"))
        sign_model, verify_update = signing_hooks(creds["signing_key"], creds["device_keys"])
        config = AggregatorConfig(
            connection=settings_from_credentials(creds),
            federation=self.name,
            run_dir=run_dir,
            task=task,
            sign_model=sign_model,
            verify_update=verify_update,
            plot=kwargs.pop("plot", False),
            **kwargs,
        )
        return Aggregator(config)

    def in_thread(self, target, *args, **kwargs) -> threading.Thread:
        result: dict = {}

        def run():
            try:
                result["value"] = target(*args, **kwargs)
            except BaseException as exc:  # surfaced by the test via thread.result
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.result = result  # type: ignore[attr-defined]
        thread.start()
        self.threads.append(thread)
        return thread

    # -- real processes ----------------------------------------------------------------
    def spawn(self, *args: str, log: Path | None = None) -> subprocess.Popen:
        """``fedmq ARGS`` as a child process (stopped by ``close``)."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *args],
            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs.append(proc)
        return proc

    def spawn_agent(self, device: str, data: Path, *extra: str, log: Path | None = None):
        return self.spawn("agent", "run", "--config", str(self.credentials(device)),
                          "--data", str(data), "--threads", "1", *extra, log=log)

    def spawn_aggregator(self, *extra: str, log: Path | None = None):
        return self.spawn("aggregator", "start", "--config",
                          str(self.credentials("fedmq-aggregator")), *extra, log=log)


def _agent_signing(creds: dict):
    from broker import signing

    private = signing.load_private(creds["signing_key"])
    public = signing.load_public(creds["model_key"])
    return (
        lambda tensors, meta: signing.sign(private, tensors, meta),
        lambda tensors, meta: signing.verify(public, tensors, meta),
    )


def join(thread: threading.Thread, timeout: float):
    thread.join(timeout)
    assert not thread.is_alive(), f"thread did not finish within {timeout}s"
    if "error" in thread.result:
        raise thread.result["error"]
    return thread.result.get("value")
