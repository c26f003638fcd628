"""Test helpers: a secured federation on a real mosquitto, and threads to run roles in."""

from __future__ import annotations

import threading
from pathlib import Path

from aggregator.service import Aggregator
from broker.task import TaskSpec
from device_agent.agent import Agent
from fedmq.local import LocalFederation


class Federation(LocalFederation):
    """LocalFederation plus in-process agents/aggregators that tests can inspect."""

    threads: list[threading.Thread]

    @classmethod
    def start(cls, path: Path, name: str, devices: list[str], **home_options) -> Federation:
        fed = cls.create(path, name, devices, **home_options)
        fed.threads = []
        fed.start_broker()
        return fed

    def agent(self, device: str, data: Path, **options) -> Agent:
        return Agent(self.agent_config(device, data, **options))

    def aggregator(self, run_dir: Path, task: TaskSpec | None, **options) -> Aggregator:
        options.setdefault("plot", False)
        return Aggregator(self.aggregator_config(run_dir, task, **options))

    def in_thread(self, target, *args, **kwargs) -> threading.Thread:
        """Run ``target`` in a daemon thread; ``join`` returns its value or raises its error."""
        result: dict = {}

        def run():
            try:
                result["value"] = target(*args, **kwargs)
            except BaseException as exc:  # surfaced by join()
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.result = result  # type: ignore[attr-defined]
        thread.start()
        self.threads.append(thread)
        return thread

    def close(self) -> None:
        super().close()
        for thread in self.threads:
            thread.join(timeout=10)


def join(thread: threading.Thread, timeout: float):
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout}s"
    if "error" in thread.result:
        raise thread.result["error"]
    return thread.result.get("value")
