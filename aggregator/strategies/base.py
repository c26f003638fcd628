"""The strategy interface: what a strategy decides, and nothing about MQTT.

A strategy is a small class over pure functions of tensors. The round engine
(``aggregator/service.py``: MQTT, journal, acks, deadlines) asks it four things:

- ``plan(round, online, seed)``: which devices are told to train this round
  (client sampling) and what extra training settings they get (FedProx's
  ``proximal_mu``); the plan travels, signed, in the model message;
- how an accepted update is taken in: every update stays on disk in the round's
  journal; ``aggregate`` reads them back in device-id order, either folding
  them one at a time (the sums: FedAvg and the server optimizers) or, for
  strategies that need them all at once (median, Krum, Bulyan), as a matrix of
  deltas on disk (``aggregator/update_matrix.py``) read a block of columns at a
  time;
- ``aggregate(global, updates)``: the round's result, the next global model;
- ``state()`` / ``load_state()``: what it must remember between rounds (server
  optimizer moments), written into the round's checkpoint so that ``--resume``
  after a crash continues bit-identically.

Rounds of every strategy but ``fedbuff`` close when every present selected
device has reported; ``fedbuff`` closes after ``buffer_size`` accepted updates
and admits updates trained on models up to ``max_staleness`` versions old.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from aggregator.fedavg import cast_to
from broker.errors import TaskError

Tensors = dict[str, torch.Tensor]


class StrategyError(TaskError):
    """A [strategy] table that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Update:
    """One accepted update as a strategy sees it."""

    device: str
    num_samples: int
    tensors: Tensors  # the device's trained weights (not a delta)
    round: int  # the round (model version) it was trained from
    base: Tensors  # that round's global model (the current one, but for fedbuff)
    metrics: Mapping[str, float] = field(default_factory=dict)


class Updates(Protocol):
    """The round's accepted updates, read back from the journal in device-id order."""

    round: int  # the round being closed

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Update]:  # one payload in memory at a time
        ...

    def matrix(self, clip_norm: float | None = None):  # -> update_matrix.DeltaMatrix
        ...


@dataclass(frozen=True)
class RoundPlan:
    """What the devices are told for a round, beside the model."""

    selected: tuple[str, ...] | None = None  # None: every device; else only these train
    train: Mapping[str, float] = field(default_factory=dict)  # e.g. {"proximal_mu": 0.01}

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        if self.selected is not None:
            out["selected"] = list(self.selected)
        if self.train:
            out["train"] = dict(self.train)
        return out


class Params:
    """A [strategy] table's parameters, each read once with its type and bounds checked;
    ``done()`` refuses any key no one read. Errors name the key."""

    def __init__(self, table: Mapping[str, Any], section: str = "strategy") -> None:
        self._table = dict(table)
        self._section = section
        self._read: set[str] = {"name"}

    def number(
        self,
        key: str,
        default: float | None,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float | None:
        self._read.add(key)
        value = self._table.get(key, default)
        if value is None:
            return None
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise StrategyError(f"[{self._section}] {key} must be a number, got {value!r}")
        if low is not None and (value < low or (low_open and value == low)):
            bound = f"{'>' if low_open else '>='} {low:g}"
            raise StrategyError(f"[{self._section}] {key} must be {bound}, got {value!r}")
        if high is not None and (value > high or (high_open and value == high)):
            bound = f"{'<' if high_open else '<='} {high:g}"
            raise StrategyError(f"[{self._section}] {key} must be {bound}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None, *, low: int = 0) -> int | None:
        self._read.add(key)
        value = self._table.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise StrategyError(
                f"[{self._section}] {key} must be an integer >= {low}, got {value!r}"
            )
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A switch: TOML's true/false (or 1/0)."""
        self._read.add(key)
        value = self._table.get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise StrategyError(f"[{self._section}] {key} must be true or false, got {value!r}")

    def done(self, name: str) -> None:
        extra = sorted(set(self._table) - self._read)
        if extra:
            raise StrategyError(
                f"[{self._section}] key(s) {', '.join(extra)} mean nothing to strategy {name!r}"
            )


class Strategy:
    """FedAvg's defaults; subclasses override what they change."""

    name = "fedavg"
    asynchronous = False  # fedbuff: a round closes after buffer_size updates, stale ones count
    max_staleness = 0  # model versions an update may lag behind and still count
    buffer_size: int | None = None  # close after this many accepted updates (fedbuff)
    min_updates = 1  # a round waits for at least this many updates (Krum: 2f+3)
    needs_secret = False  # True: give it the run's secret (use_secret) for its noise
    # its result depends on the updates only through their weighted sum, so secure
    # aggregation (which shows the aggregator nothing else) can feed it
    secure_sum = False

    def __init__(self, params: Params) -> None:
        # usable with any strategy: client sampling and update-norm clipping
        self.fraction = params.number("fraction", 1.0, low=0.0, high=1.0, low_open=True)
        self.min_selected = params.integer("min_selected", 1, low=1)
        self.clip_norm = params.number("clip_norm", None, low=0.0, low_open=True)

    # -- what the devices are told ------------------------------------------------------
    def train_config(self) -> dict[str, float]:
        return {}

    def plan(self, round_: int, online: Iterable[str], seed: int) -> RoundPlan:
        selected = None
        if self.fraction < 1.0:
            selected = sample_devices(online, self.fraction, self.min_selected, seed, round_)
        return RoundPlan(selected=selected, train=self.train_config())

    # -- the round's result --------------------------------------------------------------
    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        raise NotImplementedError

    # -- what it remembers between rounds -------------------------------------------------
    def state(self) -> Tensors:
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors:
            raise StrategyError(
                f"strategy {self.name!r} keeps no state, but the checkpoint has some"
            )

    def describe(self) -> str:
        return self.name

    def use_secret(self, key: bytes) -> None:
        """The run's secret (for a strategy that draws noise no one may predict)."""


def sample_devices(
    online: Iterable[str], fraction: float, minimum: int, seed: int, round_: int
) -> tuple[str, ...]:
    """A seeded sample of ``ceil(fraction * n)`` (at least ``minimum``) of the online devices:
    a function of (seed, round, set of online devices) only, so a replay draws the same."""
    pool = sorted(set(online))
    k = min(len(pool), max(minimum, math.ceil(fraction * len(pool))))
    digest = hashlib.sha256(f"fedmq-sample/{seed}/{round_}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:16], "big"))
    return tuple(sorted(rng.sample(pool, k)))


def cast_like(values: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> Tensors:
    """float64 results back to the model's dtypes (integer buffers rounded, bools thresholded)."""
    return cast_to(values, {name: template[name].dtype for name in values})
