"""The demo's rounds in one process, with no broker: for tests and quick attack tables.

The same math as a real ``fedmq demo`` run, without MQTT, signatures or processes:

- each round's global model goes to the devices the strategy's ``plan`` selects; each
  trains it with ``device_agent.trainer.train_local``, seeded with ``training_seed(task
  seed, round, device id)`` and the plan's training settings, exactly as an agent does;
- an attacker trains honestly too, then poisons its weights with the ``Attacker`` hook
  the agent process uses (``device_agent/attacks.py``);
- the strategy (``aggregator.strategies.build(task.strategy)``) aggregates the updates,
  served by ``aggregator.round_updates.ListUpdates`` in device-id order, as the aggregator
  serves them from its journal.

What it leaves out is delivery: every selected device reports every round (the demo's
devices do, on one machine). Like the aggregator, it refuses an update with a NaN or
infinite weight; the demo waits for every device, so such a round would end the run at
its deadline, and here ends it at once (``RunResult.stopped``).

Training is deterministic, so the honest training of a device from a given global model
is computed once and shared between runs (``cache``): every run's first round starts
from the same initial model.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from broker import zoo
from broker.task import TaskSpec
from device_agent.hooks import TrainingHooks
from device_agent.trainer import train_local, training_seed
from fedmq.demo import watch_data
from fedmq.demo.attacks import AttackPlan

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Device:
    name: str
    X: np.ndarray
    y: np.ndarray  # float64 labels, as the agent's data reader gives them


@dataclass(frozen=True)
class Simulation:
    """The demo's task, its devices' data and the held-out test set, in memory."""

    task: TaskSpec
    devices: tuple[Device, ...]
    test_X: np.ndarray
    test_y: np.ndarray

    @classmethod
    def from_demo(cls, data: watch_data.DemoData, keep: float = 1.0, seed: int = 0) -> Simulation:
        """Load ``watch_data.prepare``'s files; ``keep < 1`` keeps that fraction of every
        device's windows (a seeded subsample, at least one window each) to train faster.
        The test set is always whole. Devices are named ``watch-<k>`` like the demo's."""
        rng = np.random.default_rng(seed)
        devices = []
        for k, path in enumerate(data.device_files):
            X, y = watch_data.load_npz(path)
            if keep < 1.0:
                rows = np.sort(rng.permutation(len(X))[: max(1, round(keep * len(X)))])
                X, y = X[rows], y[rows]
            devices.append(Device(f"watch-{k}", X, y.astype(np.float64)))
        test_X, test_y = watch_data.load_npz(data.test_file)
        return cls(TaskSpec.load(data.task_path), tuple(devices), test_X, test_y)

    def with_strategy(self, table: Mapping[str, Any] | None) -> Simulation:
        return replace(self, task=replace(self.task, strategy=dict(table or {})))


@dataclass
class RunResult:
    strategy: str
    attack: str  # "clean" or the attack's description
    attackers: tuple[str, ...]
    accuracy: list[float] = field(default_factory=list)  # held-out, after each round
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended before its last round

    @property
    def final(self) -> float:
        return self.accuracy[-1]


class TrainingCache:
    """Honest training results by (device, round, global model, settings): training is a
    pure function of those, so two runs that reach the same global model share it."""

    def __init__(self) -> None:
        self._results: dict[tuple, tuple[Tensors, int, float]] = {}
        self.hits = 0

    def get(self, key: tuple, train: Callable[[], tuple[Tensors, int, float]]):
        if key in self._results:
            self.hits += 1
        else:
            self._results[key] = train()
        return self._results[key]


def run(
    sim: Simulation,
    *,
    rounds: int,
    attack: AttackPlan | None = None,
    cache: TrainingCache | None = None,
    on_round: Callable[[int, float], None] | None = None,
    transport: Callable[[str, int, Tensors, Tensors], Tensors] | None = None,
) -> RunResult:
    """``rounds`` rounds of ``sim.task`` (its ``[strategy]``), attacked by ``attack``'s
    devices (indices into ``sim.devices``); the held-out accuracy after each round.
    ``transport(device, round, global weights, sent weights)`` gives the weights the
    aggregator receives (e.g. through a compressed update: scripts/compression_table.py)."""
    from aggregator.round_updates import ListUpdates
    from aggregator.strategies import Update, build

    started = time.monotonic()
    task = sim.task
    strategy = build(task.strategy)
    names = [d.name for d in sim.devices]
    attackers = (
        {} if attack is None else {names[k]: attack.attacker(names[k]) for k in attack.attackers}
    )
    result = RunResult(
        strategy=strategy.describe(),
        attack="clean" if attack is None else attack.describe(),
        attackers=tuple(sorted(attackers)),
    )
    cache = cache or TrainingCache()
    model = zoo.build_model(task.model, seed=task.seed)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for round_ in range(1, rounds + 1):
        plan = strategy.plan(round_, names, task.seed)
        chosen = names if plan.selected is None else [n for n in names if n in plan.selected]
        settings = tuple(sorted(plan.train.items()))
        digest = weights_digest(weights)
        updates = []
        for device in sim.devices:
            if device.name not in chosen:
                continue
            key = (device.name, round_, digest, settings)
            train = partial(_train, model, weights, device, task, round_, plan.train)
            tensors, samples, loss = cache.get(key, train)
            if device.name in attackers:
                tensors = attackers[device.name](weights, tensors)
            if transport is not None:
                tensors = transport(device.name, round_, weights, tensors)
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                result.stopped = f"round {round_}: {device.name} sent non-finite weights"
                break
            updates.append(
                Update(
                    device=device.name,
                    num_samples=samples,
                    tensors=tensors,
                    round=round_,
                    base=weights,
                    metrics={"train_loss": loss} if math.isfinite(loss) else {},
                )
            )
        if result.stopped:
            break
        weights = strategy.aggregate(weights, ListUpdates(updates, template=weights))
        model.load_state_dict(weights)
        accuracy = watch_data.accuracy(model, sim.test_X, sim.test_y)
        result.accuracy.append(accuracy)
        if on_round is not None:
            on_round(round_, accuracy)
    result.seconds = time.monotonic() - started
    return result


def _train(
    model: torch.nn.Module,
    weights: Tensors,
    device: Device,
    task: TaskSpec,
    round_: int,
    settings: Mapping[str, float],
) -> tuple[Tensors, int, float]:
    """A device's honest local training from ``weights``, as the agent runs it."""
    model.load_state_dict(weights, strict=True)
    hooks = TrainingHooks.from_settings(settings)
    seed = training_seed(task.seed, round_, device.name)
    trained = train_local(model, device.X, device.y, task.train, seed, device.name, hooks)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tensors, trained.num_samples, trained.train_loss


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prepare(
    out_dir: str | Path, *, devices: int = 10, seed: int = 0, keep: float = 1.0
) -> Simulation:
    """The demo's data for ``devices`` devices (``watch_data.prepare``) loaded for ``run``."""
    data = watch_data.prepare(out_dir, devices=devices, seed=seed)
    return Simulation.from_demo(data, keep=keep, seed=seed)


@dataclass(frozen=True)
class Job:
    """One run of a grid: a ``[strategy]`` table and an attack (None: clean)."""

    strategy: Mapping[str, Any]
    attack: AttackPlan | None = None


def run_many(
    data: watch_data.DemoData,
    jobs: Sequence[Job],
    *,
    rounds: int,
    keep: float = 1.0,
    seed: int = 0,
    workers: int = 1,
) -> list[RunResult]:
    """``run`` every job on ``data`` (``Simulation.from_demo(data, keep, seed)``), in order.

    With ``workers > 1``, in that many fresh (spawned) processes, each with one torch
    thread, its own copy of the data and its own ``TrainingCache``: forking a process
    that has used torch's thread pools can hang it."""
    if workers <= 1:
        sim, cache = Simulation.from_demo(data, keep=keep, seed=seed), TrainingCache()
        return [
            run(sim.with_strategy(job.strategy), rounds=rounds, attack=job.attack, cache=cache)
            for job in jobs
        ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(data, keep, seed)
    ) as pool:
        return list(pool.map(_worker_run, jobs, [rounds] * len(jobs)))


_worker: dict[str, Any] = {}


def _worker_init(data: watch_data.DemoData, keep: float, seed: int) -> None:
    torch.set_num_threads(1)
    _worker["sim"] = Simulation.from_demo(data, keep=keep, seed=seed)
    _worker["cache"] = TrainingCache()


def _worker_run(job: Job, rounds: int) -> RunResult:
    sim = _worker["sim"].with_strategy(job.strategy)
    return run(sim, rounds=rounds, attack=job.attack, cache=_worker["cache"])
