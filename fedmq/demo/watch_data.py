"""The demo's data: real smartwatch recordings of shoulder exercises, one file per device.

The data set is seglearn's ``load_watch()`` (Burns et al., https://arxiv.org/abs/1802.01489):
140 recordings of 6-axis inertial data (accelerometer ``ax ay az`` in g, gyroscope
``wx wy wz`` in rad/s) sampled at 50 Hz on a wrist-worn watch, while 10 subjects did sets
of 20 repetitions of 7 shoulder exercises, once with each arm (14 recordings per subject).

``prepare()`` turns it into what a federation of watches would hold:

- **Split by subject** (up to 8 devices, the default). ``test_subjects`` people (chosen
  by the seed) are held out: their windows form ``test.npz``, which no device sees, so
  accuracy measures how well the model works for *new people*. The other subjects are
  dealt to the devices so that each device holds whole people.
- **Split in time** (more devices than training subjects: ``fedmq demo --attack`` runs
  10, one person each, so that Bulyan's ``n >= 4f + 3`` can be met). Holding out 2 people
  would leave 8 to share among 10 devices, so instead every subject trains and the test
  set is the **last 20 % in time of every recording** (every person, every exercise,
  both arms): accuracy then measures how well the model recognises *later repetitions
  by the people it learned from*, an easier question than new people. The cut is made
  in samples before windowing, so no test window shares a sample with a training window.
  The subjects are dealt to the devices as whole people (shuffled by the seed); with
  more devices than the 10 subjects, a subject is spread over several devices as in
  ``split_subjects``.
- **Windows.** Each recording is cut into overlapping windows of ``window`` samples
  every ``stride`` samples, shaped ``(6, window)`` (channels, time) for ``cnn1d``.
- **Normalisation without pooling.** A real fleet cannot pool its data to compute
  global per-channel means and standard deviations (that would mean shipping statistics
  of every device's data to a server, and they change as devices join). Per-window
  standardisation would throw away what tells these exercises apart: the direction of
  gravity (how the arm is held) and how fast it moves. So the scaling is fixed and
  physical, the same constant on every device, computable by each device alone:
  accelerometer / 1 g (unchanged) and gyroscope / pi rad/s (half a turn per second),
  which puts both sensors in roughly [-3, 3]; the model's BatchNorm layers do the rest.
  Measured in a FedAvg simulation (3 devices, seeds 0-2): per-window standardisation lost
  3-4 points of accuracy; raw units trained as well centrally but FedAvg then trailed the
  baseline by up to 8 points, against 3 with this fixed scaling.

Files are plain ``np.savez`` archives with ``X`` (float32, ``(n, 6, window)``) and ``y``
(int64): they load with ``allow_pickle=False``. ``task.toml`` is the demo's task spec.

``train_epochs`` / ``train_centralized`` / ``accuracy`` are the centralised baseline:
the same model and training settings on the pooled training data, in one process, no
MQTT, with the devices' own training loop (``device_agent.trainer``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import DataError, FedmqError
from broker.task import ModelSpec, TaskSpec, TrainSpec

SAMPLE_RATE_HZ = 50
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
# Fixed physical scaling (see the module docstring): accelerometer in g, gyroscope in rad/s.
CHANNEL_SCALE = np.array([1.0, 1.0, 1.0, math.pi, math.pi, math.pi], dtype=np.float32)

# The demo's defaults, tuned with an in-process FedAvg simulation and then end to end with
# `fedmq demo` (seeds 0-5: federated accuracy on the held-out people within 3 points of the
# centralised baseline's, both 70-93 %; about 30 s in all on 2 cores, start-up included).
DEFAULT_DEVICES = 3
DEFAULT_ROUNDS = 10
DEFAULT_WINDOW = 100  # 2 s at 50 Hz: about one repetition of an exercise
DEFAULT_STRIDE = 50  # 50 % overlap (no overlap lost ~3 points of federated accuracy)
DEFAULT_TEST_SUBJECTS = 2
TEST_TAIL = 0.2  # the split in time: the last 20 % of every recording is the test set
# a third conv block (0.7 s receptive field before global pooling) beat [16, 32] by ~3
# points and matched [32, 64] at about half its cost; [8, 16, 32] and [16, 16, 32] let
# FedAvg fall 5-9 points behind
DEFAULT_CNN_CHANNELS = (16, 32, 32)
DEFAULT_KERNEL_SIZE = 5
# 2 local epochs x 10 rounds: 20 epochs of work in few rounds (each round costs ~0.2 s of
# messaging); batch 64 rather than 32 for less wobble from round to round. lr 0.002 and
# 0.003 did as well on seeds 0-2 but let FedAvg trail by 6.4 or 3.7 points on others.
DEFAULT_TRAIN = TrainSpec(epochs=2, batch_size=64, lr=0.0025, optimizer="adam")

_DEVICE_FILE = "device-{k}.npz"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Recordings:
    """The raw data set: ``X[i]`` is a ``(T_i, 6)`` float recording of ``subject[i]``."""

    X: tuple[np.ndarray, ...]
    y: np.ndarray  # int64 exercise index per recording
    subject: np.ndarray  # int64 subject number per recording
    side: np.ndarray  # 1 = right arm, 0 = left arm
    class_names: tuple[str, ...]
    channel_names: tuple[str, ...]


def load_recordings() -> Recordings:
    """Load seglearn's smartwatch data set (shipped inside the seglearn package)."""
    try:
        from seglearn.datasets import load_watch
    except ImportError:
        raise FedmqError("the demo needs its extra: pip install 'fedmq[demo]'") from None
    raw = load_watch()
    return Recordings(
        X=tuple(np.asarray(x, dtype=np.float64) for x in raw["X"]),
        y=np.asarray(raw["y"], dtype=np.int64),
        subject=np.asarray(raw["subject"], dtype=np.int64),
        side=np.asarray(raw["side"]).astype(np.int64),
        class_names=tuple(str(c) for c in raw["y_labels"]),
        channel_names=tuple(str(c) for c in raw["X_labels"]),
    )


# --------------------------------------------------------------------------- windows


def windows(recording: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Cut a ``(T, C)`` recording into ``(n, C, window)`` float32 windows every ``stride``.

    Window ``i`` is ``recording[i*stride : i*stride + window].T``; a tail shorter than a
    window is dropped, and a recording shorter than one window gives ``n = 0``.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    recording = np.asarray(recording)
    if recording.ndim != 2:
        raise ValueError(f"a recording is (time, channels), got shape {recording.shape}")
    length, channels = recording.shape
    if length < window:
        return np.empty((0, channels, window), dtype=np.float32)
    n = (length - window) // stride + 1
    starts = np.arange(n) * stride
    index = starts[:, None] + np.arange(window)[None, :]  # (n, window)
    return np.ascontiguousarray(recording[index].transpose(0, 2, 1), dtype=np.float32)


def scale(recording: np.ndarray) -> np.ndarray:
    """The fixed per-channel scaling every device applies to its own data (float32)."""
    return (np.asarray(recording, dtype=np.float32) / CHANNEL_SCALE).astype(np.float32)


# --------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Which recordings go where: indices into the data set's recordings."""

    test_subjects: tuple[int, ...]
    test: tuple[int, ...]
    devices: tuple[tuple[int, ...], ...]  # recording indices per device
    device_subjects: tuple[tuple[int, ...], ...]  # subjects per device


def split_subjects(
    subject: Sequence[int] | np.ndarray, *, devices: int, test_subjects: int, seed: int
) -> Split:
    """Hold out ``test_subjects`` subjects, deal the others' recordings to ``devices`` devices.

    The seed shuffles the subjects; the first ``test_subjects`` of that order are the test
    set. With ``devices <= training subjects`` each device gets whole subjects (the shuffled
    subjects cut into ``devices`` groups whose sizes differ by at most one). With more
    devices than training subjects, every subject is spread over one or more devices: each
    subject starts with one device and each further device goes to the subject with the most
    recordings per device, then that subject's (shuffled) recordings are cut into
    near-equal groups by recording. A device then holds part of one person; the most
    devices possible is the number of training recordings.
    """
    subject = np.asarray(subject, dtype=np.int64)
    people = np.unique(subject)
    if not isinstance(devices, int) or devices < 1:
        raise FedmqError(f"devices must be a positive integer, got {devices!r}")
    if not isinstance(test_subjects, int) or not 1 <= test_subjects < len(people):
        raise FedmqError(
            f"test_subjects must be between 1 and {len(people) - 1} "
            f"(the data set has {len(people)} subjects), got {test_subjects!r}"
        )
    rng = np.random.default_rng(seed)
    order = [int(s) for s in rng.permutation(people)]
    held_out, training = order[:test_subjects], order[test_subjects:]
    recordings_of = {s: np.flatnonzero(subject == s) for s in training}
    total = sum(len(r) for r in recordings_of.values())
    if devices > total:
        raise FedmqError(
            f"cannot give {devices} devices a recording each: the {len(training)} training "
            f"subjects have {total} recordings in all (use at most {total} devices, "
            f"or fewer test subjects)"
        )

    device_recordings, device_subjects = _deal(training, recordings_of, devices, rng)
    test_rows = np.flatnonzero(np.isin(subject, held_out))
    return Split(
        test_subjects=tuple(sorted(held_out)),
        test=tuple(int(i) for i in test_rows),
        devices=device_recordings,
        device_subjects=device_subjects,
    )


def split_in_time(subject: Sequence[int] | np.ndarray, *, devices: int, seed: int) -> Split:
    """Deal every subject's recordings to ``devices`` devices; the test set is the tail of
    every recording (``prepare`` cuts it off, see ``TEST_TAIL``), so ``test`` lists them all.

    The seed shuffles the subjects, which are dealt as in ``split_subjects`` (whole people
    per device up to one device per person; beyond, a person's recordings are spread).
    """
    subject = np.asarray(subject, dtype=np.int64)
    people = np.unique(subject)
    if not isinstance(devices, int) or devices < 1:
        raise FedmqError(f"devices must be a positive integer, got {devices!r}")
    if devices > len(subject):
        raise FedmqError(
            f"cannot give {devices} devices a recording each: the data set has "
            f"{len(subject)} recordings (use at most {len(subject)} devices)"
        )
    rng = np.random.default_rng(seed)
    order = [int(s) for s in rng.permutation(people)]
    recordings_of = {s: np.flatnonzero(subject == s) for s in order}
    device_recordings, device_subjects = _deal(order, recordings_of, devices, rng)
    return Split(
        test_subjects=tuple(sorted(order)),
        test=tuple(range(len(subject))),
        devices=device_recordings,
        device_subjects=device_subjects,
    )


def _deal(
    people: list[int], recordings_of: dict[int, np.ndarray], devices: int, rng
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(recording indices, subjects) per device: whole people when ``devices <= people``
    (the ordered people cut into near-equal groups); otherwise each person starts with one
    device and each further device goes to the person with the most recordings per device,
    whose (shuffled) recordings are then cut into near-equal groups."""
    device_recordings: list[tuple[int, ...]] = []
    device_subjects: list[tuple[int, ...]] = []
    if devices <= len(people):
        for group in np.array_split(np.array(people), devices):
            people_here = tuple(sorted(int(s) for s in group))
            rows = np.sort(np.concatenate([recordings_of[s] for s in people_here]))
            device_recordings.append(tuple(int(i) for i in rows))
            device_subjects.append(people_here)
    else:
        count = {s: 1 for s in people}
        for _ in range(devices - len(people)):
            best = max(people, key=lambda s: len(recordings_of[s]) / count[s])
            count[best] += 1
        for s in people:
            shuffled = rng.permutation(recordings_of[s])
            for part in np.array_split(shuffled, count[s]):
                device_recordings.append(tuple(int(i) for i in np.sort(part)))
                device_subjects.append((s,))
    return tuple(device_recordings), tuple(device_subjects)


# --------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class DemoData:
    """What ``prepare`` wrote: one ``.npz`` per device, the test set and the task."""

    out_dir: Path
    task_path: Path
    device_files: tuple[Path, ...]
    test_file: Path
    device_sizes: tuple[int, ...]  # windows per device
    test_size: int
    device_subjects: tuple[tuple[int, ...], ...]
    test_subjects: tuple[int, ...]
    class_names: tuple[str, ...]
    window: int
    stride: int
    test_tail: float = 0.0  # 0: whole subjects held out; else the tail of every recording

    @property
    def train_size(self) -> int:
        return sum(self.device_sizes)

    @property
    def held_out(self) -> str:
        """What the test set is, in words: "held-out subjects 5, 7" or "the held-out last
        20% in time of every recording (all 10 subjects)"."""
        if self.test_tail:
            return (
                f"the held-out last {100 * self.test_tail:.0f}% in time of every recording "
                f"(all {len(self.test_subjects)} subjects)"
            )
        return f"held-out subjects {', '.join(map(str, self.test_subjects))}"


def demo_task(
    seed: int = 0,
    train: TrainSpec = DEFAULT_TRAIN,
    strategy: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    secure: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
) -> TaskSpec:
    """The demo's task: a small 1-D CNN over (6, window) windows, 7 exercises; ``strategy``
    is its ``[strategy]`` table (None: none, FedAvg), ``privacy`` its ``[privacy]``,
    ``secure`` its ``[secure_aggregation]``, ``compression`` its ``[compression]``."""
    return TaskSpec(
        model=ModelSpec(
            arch="cnn1d",
            args={
                "in_channels": len(CHANNELS),
                "num_classes": 7,
                "channels": list(DEFAULT_CNN_CHANNELS),
                "kernel_size": DEFAULT_KERNEL_SIZE,
            },
        ),
        train=train,
        seed=seed,
        strategy=dict(strategy or {}),
        privacy=dict(privacy or {}),
        secure_aggregation=dict(secure or {}),
        compression=dict(compression or {}),
    )


def task_toml(task: TaskSpec) -> str:
    """Render a task spec as the TOML ``TaskSpec.load`` reads back."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} to TOML")

    t = task.train
    lines = [
        "# fedmq demo: recognise 7 shoulder exercises from 2 s of smartwatch motion.",
        "# Written by `fedmq demo`; every device learns it from the retained model.",
        f"seed = {task.seed}",
        "",
        "[model]",
        f"arch = {value(task.model.arch)}",
        *(f"{k} = {value(v)}" for k, v in task.model.args.items()),
        "",
        "[train]",
        f"epochs = {t.epochs}               # local epochs per round",
        f"batch_size = {t.batch_size}",
        f"lr = {value(float(t.lr))}",
        f"optimizer = {value(t.optimizer)}",
        f"loss = {value(t.loss)}",
        f"momentum = {value(float(t.momentum))}",
        "",
    ]
    if task.strategy:
        table = {"name": task.strategy.get("name", "fedavg"), **task.strategy}
        lines += ["[strategy]", *(f"{k} = {value(v)}" for k, v in table.items()), ""]
    if task.privacy:
        lines += ["[privacy]", *(f"{k} = {value(v)}" for k, v in task.privacy.items()), ""]
    if task.secure_aggregation:
        table = task.secure_aggregation
        lines += ["[secure_aggregation]", *(f"{k} = {value(v)}" for k, v in table.items()), ""]
    if task.compression:
        lines += ["[compression]", *(f"{k} = {value(v)}" for k, v in task.compression.items()), ""]
    return "\n".join(lines)


def prepare(
    out_dir: str | Path,
    *,
    devices: int = DEFAULT_DEVICES,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    test_subjects: int = DEFAULT_TEST_SUBJECTS,
    train: TrainSpec = DEFAULT_TRAIN,
    recordings: Recordings | None = None,
    split: str = "auto",
    strategy: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    secure: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
) -> DemoData:
    """Write ``device-<k>.npz`` (k = 0 .. devices-1), ``test.npz``, ``task.toml``, ``split.json``.

    ``split`` is ``"subjects"`` (hold out ``test_subjects`` people), ``"time"`` (hold out
    the last ``TEST_TAIL`` of every recording) or ``"auto"``: by subject while every device
    can hold a whole training subject, in time beyond (see the module docstring).
    ``strategy`` is the task's ``[strategy]`` table (None: FedAvg, no table).
    ``recordings`` defaults to ``load_recordings()`` (tests may pass their own). Device
    files left over from an earlier run with more devices are removed. Raises
    ``FedmqError`` when the split is impossible or a device would get no window.
    """
    if recordings is None:
        recordings = load_recordings()
    if window < 1 or stride < 1:
        raise FedmqError(f"window and stride must be >= 1, got {window} and {stride}")
    if split not in ("auto", "subjects", "time"):
        raise FedmqError(f'split must be "auto", "subjects" or "time", got {split!r}')
    if split == "auto":
        people = len(np.unique(recordings.subject))
        split = "time" if devices > people - test_subjects else "subjects"
    tail = TEST_TAIL if split == "time" else 0.0
    if split == "time":
        cut = split_in_time(recordings.subject, devices=devices, seed=seed)
    else:
        cut = split_subjects(
            recordings.subject, devices=devices, test_subjects=test_subjects, seed=seed
        )

    def part(i: int, test: bool) -> np.ndarray:
        """Recording ``i``, scaled; in time, its head for training or its tail for test."""
        recording = scale(recordings.X[i])
        if not tail:
            return recording
        at = int(len(recording) * (1.0 - tail))
        return recording[at:] if test else recording[:at]

    def gather(rows: Sequence[int], test: bool = False) -> tuple[np.ndarray, np.ndarray]:
        xs = [windows(part(i, test), window, stride) for i in rows]
        ys = [np.full(len(x), recordings.y[i], dtype=np.int64) for x, i in zip(xs, rows)]
        if not xs:
            return np.empty((0, len(CHANNELS), window), np.float32), np.empty(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    parts = [gather(rows) for rows in cut.devices]
    for k, (x, _) in enumerate(parts):
        if len(x) == 0:
            raise FedmqError(
                f"device {k} would get no {window}-sample window from its recordings "
                f"(subjects {list(cut.device_subjects[k])}): use a shorter window"
            )
    test_x, test_y = gather(cut.test, test=True)
    if len(test_x) == 0:
        raise FedmqError(f"the test set has no {window}-sample window: use a shorter one")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("device-*.npz"):
        suffix = stale.stem.removeprefix("device-")
        if suffix.isdigit() and int(suffix) >= devices:
            stale.unlink()
    device_files = tuple(out / _DEVICE_FILE.format(k=k) for k in range(devices))
    for path, (x, y) in zip(device_files, parts):
        _save(path, x, y)
    test_file = out / "test.npz"
    _save(test_file, test_x, test_y)
    task_path = out / "task.toml"
    _write_text(
        task_path, task_toml(demo_task(seed, train, strategy, privacy, secure, compression))
    )

    data = DemoData(
        out_dir=out,
        task_path=task_path,
        device_files=device_files,
        test_file=test_file,
        device_sizes=tuple(len(x) for x, _ in parts),
        test_size=len(test_x),
        device_subjects=cut.device_subjects,
        test_subjects=cut.test_subjects,
        class_names=recordings.class_names,
        window=window,
        stride=stride,
        test_tail=tail,
    )
    summary = {
        "seed": seed,
        "window": window,
        "stride": stride,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "channels": list(CHANNELS),
        "channel_scale": [float(s) for s in CHANNEL_SCALE],
        "class_names": list(data.class_names),
        "test": {
            "file": test_file.name,
            "windows": data.test_size,
            "subjects": list(data.test_subjects),
            "split": split,
            "tail_of_every_recording": tail,
        },
        "devices": [
            {"file": f.name, "windows": n, "subjects": list(s)}
            for f, n, s in zip(device_files, data.device_sizes, data.device_subjects)
        ],
    }
    _write_text(out / "split.json", json.dumps(summary, indent=2) + "\n")
    return data


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, X=x.astype(np.float32, copy=False), y=y.astype(np.int64, copy=False))
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a demo file's ``X`` (float32, (n, C, T)) and ``y`` (int64), without pickle."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["X"], f["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a demo data file (need arrays X and y): {exc}") from None
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{path}: X must be (n, channels, time) and y (n,), got {x.shape} and {y.shape}"
        )
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- baseline


def train_epochs(
    model: Any, X: Any, y: Any, train_spec: TrainSpec, epochs: int, seed: int
) -> float:
    """Train ``model`` in place for ``epochs`` epochs with the devices' own trainer.

    The same code as a device's local training (``device_agent.trainer.train_local``):
    a fresh optimizer, shuffling seeded by ``seed``, ``batch_size = 0`` for full batch.
    Returns the mean training loss of the last epoch.
    """
    from dataclasses import replace

    from device_agent.trainer import train_local

    if len(X) == 0:
        raise DataError("no samples to train on")
    spec = replace(train_spec, epochs=epochs)
    return train_local(model, np.asarray(X), np.asarray(y, dtype=np.float64), spec, seed).train_loss


def evaluate(model: Any, X: Any, y: Any) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a classifier on ``X``, ``y``; eval mode, no grad."""
    from device_agent import trainer

    if len(X) == 0:
        raise DataError("no samples to evaluate on")
    spec = TrainSpec(loss="cross_entropy")
    result = trainer.evaluate(model, np.asarray(X), np.asarray(y, dtype=np.float64), spec)
    return result["loss"], result["accuracy"]


def accuracy(model: Any, X: Any, y: Any) -> float:
    """Fraction of windows whose predicted exercise is right."""
    return evaluate(model, X, y)[1]


def train_centralized(task: TaskSpec, train_files: Sequence[str | Path], rounds: int) -> Any:
    """The baseline: ``task``'s model trained on all ``train_files`` pooled, in one process.

    Same architecture, initial weights (``task.seed``) and training settings as the
    federation, for ``task.train.epochs * rounds`` epochs (the local epochs every device
    runs over the whole federation) with one optimizer throughout. Returns the model.
    """
    from broker.zoo import build_model

    if rounds < 1:
        raise FedmqError(f"rounds must be >= 1, got {rounds}")
    if not train_files:
        raise FedmqError("no training files for the centralised baseline")
    loaded = [load_npz(f) for f in train_files]
    X = np.concatenate([x for x, _ in loaded])
    y = np.concatenate([t for _, t in loaded])
    model = build_model(task.model, seed=task.seed)
    train_epochs(model, X, y, task.train, task.train.epochs * rounds, seed=task.seed)
    return model
