"""A run directory: checkpoints, the run's state, metrics, written so a crash loses nothing.

    run_dir/
      run.json                      federation, task, rounds, quorum: fixed at start
      state.json                    last completed round, its checkpoint, running totals
      checkpoints/round-000003.safetensors   global model after round 3 (round-000000: initial)
      checkpoints/strategy-000003.safetensors  the strategy's state after round 3 (server
                                    optimizer moments), for the strategies that keep one
      metrics.jsonl                 one line per completed round (device means under "metrics")
      devices.jsonl                 one line per (round, device): its samples and metrics
      rounds/000004/                journal of the round in progress (see journal.py)
      metrics.png                   loss and accuracy per round
      secret.key                    32 random bytes, readable by the aggregator's user only:
                                    keys the noise of differential privacy

``state.json`` is replaced atomically after the checkpoint it names is on disk,
so it always points at a complete checkpoint; a metrics line for a round that
``state.json`` does not yet count is dropped on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aggregator.durable import atomic_write, read_lines, repair_tail, write_together
from broker import codec
from broker.errors import ConfigError, FedmqError
from broker.task import TaskSpec


@dataclass(frozen=True)
class RunSpec:
    federation: str
    task_json: str
    rounds: int
    min_devices: int
    run_id: str = ""  # random, fixed at creation: updates are bound to it by their signature

    @property
    def task(self) -> TaskSpec:
        return TaskSpec.from_json(self.task_json)


@dataclass
class RunState:
    completed_round: int = 0
    checkpoint: str = ""
    totals: dict = field(default_factory=dict)  # accepted, duplicate, late, rejected{reason}


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- layout ------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def state_json(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def devices_jsonl(self) -> Path:
        return self.path / "devices.jsonl"

    @property
    def plot_png(self) -> Path:
        return self.path / "metrics.png"

    def checkpoint_path(self, round_: int) -> Path:
        return self.path / "checkpoints" / f"round-{round_:06d}.safetensors"

    def strategy_path(self, round_: int) -> Path:
        return self.path / "checkpoints" / f"strategy-{round_:06d}.safetensors"

    def checkpoint(self, round_: int) -> dict[str, torch.Tensor]:
        """The global model after ``round_`` (0: the initial one)."""
        payload = self.checkpoint_path(round_).read_bytes()
        return codec.decode(payload, max_payload=len(payload)).tensors

    def strategy_state(self, round_: int) -> dict[str, torch.Tensor]:
        """The strategy's state after ``round_``; {} if it keeps none."""
        path = self.strategy_path(round_)
        if not path.exists():
            return {}
        payload = path.read_bytes()
        return codec.decode(payload, max_payload=len(payload)).tensors

    @property
    def secret_path(self) -> Path:
        return self.path / "secret.key"

    def secret(self) -> bytes:
        """The run's secret, made on first use (mode 0600)."""
        path = self.secret_path
        if not path.exists():
            fd = os.open(
                path.with_name(".secret.key.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
            )
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path.with_name(".secret.key.tmp"), path)
        key = path.read_bytes()
        if len(key) != 32:
            raise FedmqError(f"{path}: a run secret is 32 bytes, this file has {len(key)}")
        return key

    def exists(self) -> bool:
        return self.run_json.exists()

    # -- creating and resuming ----------------------------------------------------
    def create(self, spec: RunSpec, initial: dict[str, torch.Tensor]) -> RunState:
        """Start a new run; refuse a directory that holds one."""
        if self.exists():
            raise ConfigError(
                f"{self.path} already holds a run: add --resume to continue it, "
                "or choose another --run-dir"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_json, json.dumps(asdict(spec), indent=2).encode())
        state = RunState()
        self.commit(state, 0, initial, None)
        return state

    def load(self) -> tuple[RunSpec, RunState, dict[str, torch.Tensor]]:
        if not self.exists():
            raise ConfigError(f"{self.path} holds no run to resume (no run.json)")
        try:
            spec = RunSpec(**json.loads(self.run_json.read_text()))
            state = RunState(**json.loads(self.state_json.read_text()))
            payload = self.checkpoint_path(state.completed_round).read_bytes()
        except (OSError, ValueError, TypeError) as exc:
            raise FedmqError(f"{self.path}: cannot read the run's state: {exc}") from None
        tensors = codec.decode(payload, max_payload=len(payload)).tensors
        self._drop_metrics_after(state.completed_round)
        return spec, state, tensors

    def commit(
        self,
        state: RunState,
        completed_round: int,
        tensors: dict[str, torch.Tensor],
        metrics: dict | None,
        device_rows: list[dict] = (),
        strategy_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Persist round ``completed_round``: checkpoint and strategy state, metrics lines,
        then state.json (which makes them the run's)."""
        path = self.checkpoint_path(completed_round)
        replace = {path: codec.encode(tensors, {"round": str(completed_round)})}
        if strategy_state:
            meta = {"round": str(completed_round)}
            replace[self.strategy_path(completed_round)] = codec.encode(strategy_state, meta)
        append = {}
        if device_rows:
            text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in device_rows)
            append[self.devices_jsonl] = text.rstrip("\n")
        if metrics is not None:
            append[self.metrics_jsonl] = json.dumps(metrics, sort_keys=True)
        # all of these durable in one wait for the disk, then state.json, which makes them
        # the run's (a crash before it: the lines are dropped on resume, the files unused);
        # its bytes are synced in that same wait, its rename waits for the others' renames
        done = {"completed_round": completed_round, "checkpoint": str(path.relative_to(self.path))}
        record = json.dumps({**asdict(state), **done}, indent=2).encode()
        write_together(replace, append, then={self.state_json: record})
        state.completed_round, state.checkpoint = done["completed_round"], done["checkpoint"]

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in read_lines(self.metrics_jsonl)]

    def lock(self) -> None:
        """Hold this run directory for this process (released when it exits, even by SIGKILL)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"{self.path} is in use by another aggregator (pid {holder}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _drop_metrics_after(self, completed_round: int) -> None:
        for path in (self.metrics_jsonl, self.devices_jsonl):
            repair_tail(path)
            lines = read_lines(path)
            keep = [line for line in lines if json.loads(line).get("round", 0) <= completed_round]
            if len(keep) != len(lines):
                atomic_write(path, "".join(line + "\n" for line in keep).encode())
