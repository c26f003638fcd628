"""The task spec: what model to train and how, written by the aggregator's owner.

It is a TOML file on the aggregator's side and travels as canonical JSON in the
``task`` metadata of every ``model`` message, so a device learns everything it
needs from the retained model alone. Since anyone who can publish a model
writes this task, ``arch`` is only a name: the device looks it up among the
built-ins and its own locally registered architectures (see broker/zoo.py) and
refuses any other, before importing anything::

    seed = 0                       # initial weights

    [model]
    arch = "cnn1d"                 # "linear" | "mlp" | "cnn1d" | a locally registered name
    in_channels = 6                # every other key is an argument of the architecture
    num_classes = 7

    [train]
    epochs = 1                     # local epochs per round
    batch_size = 32                # 0 = full batch
    lr = 0.01
    optimizer = "sgd"              # "sgd" | "adam"
    loss = "cross_entropy"         # "mse" | "mse_sum" | "cross_entropy"

    [data]
    label = "label"                # the label column of a CSV file

    [strategy]                     # optional; how the aggregator combines updates
    name = "fedavg"                # see aggregator/strategies/ (and the README's table)
    # ... the strategy's parameters, e.g. mu = 0.01 for fedprox, fraction = 0.5 to sample

    [privacy]                      # optional; differential privacy (DP-FedAvg)
    noise_multiplier = 1.0         # sigma: noise of std sigma * clip_norm on the sum
    clip_norm = 1.0                # C: each device's update clipped to this L2 norm
    delta = 1e-5                   # the delta epsilon is reported at

    [secure_aggregation]           # optional; SecAgg+: the aggregator sees only the sum
    clip_range = 1.0               # each coordinate of a weighted update, clipped to +-this

    [compression]                  # optional; how devices encode their updates (see
    encoding = "int8"              # broker/compression.py): "fp16" | "int8" | "topk"
    per_channel = false            # int8: true = a scale per row; topk: fraction = 0.01

The ``[strategy]``, ``[privacy]`` and ``[secure_aggregation]`` tables are kept as
written here and validated by the aggregator (``aggregator.strategies.build``), which
knows their parameters. ``[compression]`` is kept as written too, but checked here
(``broker.compression_settings``): the devices need it as much as the aggregator.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker import compression_settings
from broker.errors import TaskError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam")
OPTIONAL_TABLES = (
    "strategy",
    "privacy",
    "secure_aggregation",
    "compression",
)  # left out of JSON when empty
LOSSES = ("mse", "mse_sum", "cross_entropy")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    loss: str = "cross_entropy"
    momentum: float = 0.0
    # each device scores the round's model on its own data before training (federated
    # evaluation: the eval_* metrics and devices.png); false saves that pass every round
    evaluate: bool = True

    @property
    def is_classification(self) -> bool:
        return self.loss == "cross_entropy"


@dataclass(frozen=True)
class DataSpec:
    label: str = "label"


@dataclass(frozen=True)
class TaskSpec:
    model: ModelSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    seed: int = 0
    strategy: dict[str, Any] = field(default_factory=dict)  # the [strategy] table; {}: fedavg
    privacy: dict[str, Any] = field(default_factory=dict)  # the [privacy] table; {}: none
    # the [secure_aggregation] table; {}: updates are sent in the clear (signed)
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    # the [compression] table; {}: updates travel as full float weights
    compression: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON: the same task always gives the same string (and model hash)."""
        raw = asdict(self)
        for table in OPTIONAL_TABLES:
            if not raw[table]:
                del raw[table]  # the default: tasks written before them hash the same
        if raw["train"]["evaluate"]:
            del raw["train"]["evaluate"]  # likewise
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise TaskError(f"task is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise TaskError("task JSON must be an object")
        model = raw.get("model")
        if isinstance(model, dict) and "args" in model:
            if not isinstance(model["args"], dict):
                raise TaskError("task JSON: model args must be an object")
            model = {"arch": model.get("arch"), **model["args"]}
        return from_dict({**raw, "model": model})

    @classmethod
    def load(cls, path: str | Path) -> TaskSpec:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TaskError(f"{path}: task file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskError(f"{path}: cannot read task file: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise TaskError(f"{path}: not valid TOML: {exc}") from None
        try:
            return from_dict(raw)
        except TaskError as exc:
            raise TaskError(f"{path}: {exc}") from None


def from_dict(raw: dict[str, Any]) -> TaskSpec:
    """Validate a parsed task (TOML tables or JSON objects) once, at the edge."""
    unknown = set(raw) - {"model", "train", "data", "seed", *OPTIONAL_TABLES}
    if unknown:
        raise TaskError(f"unknown task section(s): {', '.join(sorted(unknown))}")
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        raise TaskError('[model] needs arch = "linear" | "mlp" | "cnn1d" | a registered name')
    args = {k: v for k, v in model.items() if k != "arch"}
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"[model] arguments must be plain numbers, strings, lists: {exc}") from None

    train_raw = raw.get("train", {})
    if not isinstance(train_raw, dict):
        raise TaskError("[train] must be a table")
    known = set(TrainSpec.__dataclass_fields__)
    extra = set(train_raw) - known
    if extra:
        raise TaskError(f"unknown [train] key(s): {', '.join(sorted(extra))}")
    train = TrainSpec(**train_raw)
    _check_train(train)

    data_raw = raw.get("data", {})
    if not isinstance(data_raw, dict) or not isinstance(data_raw.get("label", "label"), str):
        raise TaskError('[data] must be a table with label = "<column name>"')
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TaskError("seed must be an integer")
    strategy = raw.get("strategy", {})
    if not isinstance(strategy, dict) or not isinstance(strategy.get("name", ""), str):
        raise TaskError('[strategy] must be a table with name = "<strategy>"')
    tables = {"strategy": strategy}
    for name in ("privacy", "secure_aggregation", "compression"):
        tables[name] = raw.get(name, {})
        if not isinstance(tables[name], dict):
            raise TaskError(f"[{name}] must be a table")
    if "secure_aggregation" in raw and not tables["secure_aggregation"]:
        tables["secure_aggregation"] = {"enabled": True}  # the bare table turns it on
    for name, table in tables.items():
        try:
            json.dumps(table, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"[{name}] values must be plain numbers and strings: {exc}") from None
    compression_settings.parse(tables["compression"])
    compression_settings.check_with_secure_aggregation(
        tables["compression"], tables["secure_aggregation"]
    )
    return TaskSpec(
        model=ModelSpec(arch=model["arch"], args=args),
        train=train,
        data=DataSpec(label=data_raw.get("label", "label")),
        seed=seed,
        strategy=strategy,
        privacy=tables["privacy"],
        secure_aggregation=tables["secure_aggregation"],
        compression=tables["compression"],
    )


def _check_train(t: TrainSpec) -> None:
    def positive_int(name: str, value: Any, minimum: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise TaskError(f"[train] {name} must be an integer >= {minimum}, got {value!r}")

    positive_int("epochs", t.epochs, 1)
    positive_int("batch_size", t.batch_size, 0)
    for name in ("lr", "momentum"):
        value = getattr(t, name)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise TaskError(f"[train] {name} must be a number, got {value!r}")
    if t.lr <= 0:
        raise TaskError(f"[train] lr must be > 0, got {t.lr}")
    if t.momentum < 0:
        raise TaskError(f"[train] momentum must be >= 0, got {t.momentum}")
    if t.optimizer not in OPTIMIZERS:
        raise TaskError(f"[train] optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.loss not in LOSSES:
        raise TaskError(f"[train] loss must be one of {LOSSES}, got {t.loss!r}")
    if not isinstance(t.evaluate, bool):
        raise TaskError(f"[train] evaluate must be true or false, got {t.evaluate!r}")
