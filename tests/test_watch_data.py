"""The demo's data: windows, the by-subject split, the files and the centralised baseline."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import FedmqError
from broker.task import TaskSpec, TrainSpec
from fedmq.demo import watch_data as wd


def fake_recordings(subjects: int = 6, per_subject: int = 4, length: int = 120, seed: int = 0):
    """A small stand-in for the watch data set: recording i is filled with i."""
    rng = np.random.default_rng(seed)
    X, y, subject = [], [], []
    for s in range(1, subjects + 1):
        for j in range(per_subject):
            i = len(X)
            X.append(np.full((length + int(rng.integers(0, 40)), 6), float(i)))
            y.append(j % 7)
            subject.append(s)
    return wd.Recordings(
        X=tuple(X),
        y=np.array(y, dtype=np.int64),
        subject=np.array(subject, dtype=np.int64),
        side=np.zeros(len(X), dtype=np.int64),
        class_names=("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"),
        channel_names=wd.CHANNELS,
    )


# ------------------------------------------------------------------ windows


def test_windows_shape_and_content():
    rec = np.arange(10 * 6, dtype=np.float64).reshape(10, 6)
    w = wd.windows(rec, window=4, stride=3)
    assert w.shape == (3, 6, 4)  # starts 0, 3, 6; a tail of 1 sample is dropped
    assert w.dtype == np.float32
    for i, start in enumerate((0, 3, 6)):
        np.testing.assert_array_equal(w[i], rec[start : start + 4].T)
    assert w.flags["C_CONTIGUOUS"]


def test_windows_exact_fit_and_too_short():
    rec = np.random.default_rng(0).normal(size=(8, 6))
    assert wd.windows(rec, 8, 5).shape == (1, 6, 8)
    assert wd.windows(rec, 4, 4).shape == (2, 6, 4)
    empty = wd.windows(rec, 9, 1)
    assert empty.shape == (0, 6, 9) and empty.dtype == np.float32


@pytest.mark.parametrize("window, stride", [(0, 1), (4, 0), (-1, 2)])
def test_windows_rejects_bad_sizes(window, stride):
    with pytest.raises(ValueError):
        wd.windows(np.zeros((10, 6)), window, stride)


def test_scale_is_fixed_and_per_channel():
    rec = np.tile([[1.0, -2.0, 0.5, np.pi, -np.pi, 2 * np.pi]], (3, 1))
    out = wd.scale(rec)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [1.0, -2.0, 0.5, 1.0, -1.0, 2.0], rtol=1e-6)


# ------------------------------------------------------------------ split


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5, 9, 16])
def test_split_by_subject(devices):
    rec = fake_recordings(subjects=6, per_subject=4)
    split = wd.split_subjects(rec.subject, devices=devices, test_subjects=2, seed=3)
    assert len(split.test_subjects) == 2
    assert len(split.devices) == devices
    assert all(len(rows) > 0 for rows in split.devices)
    # every recording lands exactly once, test or one device
    every = [i for rows in split.devices for i in rows] + list(split.test)
    assert sorted(every) == list(range(len(rec.X)))
    test_people = set(rec.subject[list(split.test)])
    assert test_people == set(split.test_subjects)
    for rows, people in zip(split.devices, split.device_subjects):
        assert set(rec.subject[list(rows)]) == set(people)
        assert not set(people) & test_people
    if devices <= 4:  # whole people per device: no training subject on two devices
        seen = [s for people in split.device_subjects for s in people]
        assert len(seen) == len(set(seen)) == 4


def test_split_is_deterministic_and_seeded():
    subject = fake_recordings(subjects=10, per_subject=2).subject
    a = wd.split_subjects(subject, devices=3, test_subjects=2, seed=7)
    b = wd.split_subjects(subject, devices=3, test_subjects=2, seed=7)
    assert a == b
    others = {
        wd.split_subjects(subject, devices=3, test_subjects=2, seed=s).test_subjects
        for s in range(8)
    }
    assert len(others) > 1


def test_split_refuses_impossible():
    subject = fake_recordings(subjects=3, per_subject=2).subject
    with pytest.raises(FedmqError, match="at most 4 devices"):
        wd.split_subjects(subject, devices=5, test_subjects=1, seed=0)
    wd.split_subjects(subject, devices=4, test_subjects=1, seed=0)  # one recording each
    for bad in (0, 3):
        with pytest.raises(FedmqError, match="test_subjects"):
            wd.split_subjects(subject, devices=1, test_subjects=bad, seed=0)
    with pytest.raises(FedmqError, match="devices"):
        wd.split_subjects(subject, devices=0, test_subjects=1, seed=0)


# ------------------------------------------------------------------ prepare


def load(path):
    with np.load(path, allow_pickle=False) as f:
        assert set(f.files) == {"X", "y"}
        return f["X"], f["y"]


def test_prepare_writes_plain_files(tmp_path):
    rec = fake_recordings()
    data = wd.prepare(
        tmp_path, devices=3, seed=1, window=20, stride=10, test_subjects=2, recordings=rec
    )
    assert [p.name for p in data.device_files] == ["device-0.npz", "device-1.npz", "device-2.npz"]
    assert data.test_file == tmp_path / "test.npz"
    assert (tmp_path / "split.json").is_file()
    owner = {}  # recording index (the value it is filled with) -> file
    files = [*zip(data.device_files, data.device_sizes), (data.test_file, data.test_size)]
    for path, size in files:
        X, y = load(path)
        assert X.dtype == np.float32 and y.dtype == np.int64
        assert X.shape == (size, 6, 20) and y.shape == (size,) and size > 0
        for i in np.unique(X[:, 0, 0]):  # channel 0 is unscaled: the recording index
            assert owner.setdefault(int(i), path) == path
            assert (y[X[:, 0, 0] == i] == rec.y[int(i)]).all()
    assert len(owner) == len(rec.X)
    assert data.train_size == sum(data.device_sizes)
    assert data.class_names == rec.class_names
    task = TaskSpec.load(data.task_path)
    assert task.model.arch == "cnn1d"
    assert task.model.args["in_channels"] == 6 and task.model.args["num_classes"] == 7
    assert task.seed == 1


def test_prepare_is_deterministic(tmp_path):
    rec = fake_recordings()
    a = wd.prepare(tmp_path / "a", devices=2, seed=5, window=16, stride=8, recordings=rec)
    b = wd.prepare(tmp_path / "b", devices=2, seed=5, window=16, stride=8, recordings=rec)
    assert a.device_subjects == b.device_subjects and a.test_subjects == b.test_subjects
    for pa, pb in zip([*a.device_files, a.test_file], [*b.device_files, b.test_file]):
        xa, ya = load(pa)
        xb, yb = load(pb)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_prepare_removes_stale_device_files(tmp_path):
    rec = fake_recordings()
    wd.prepare(tmp_path, devices=4, seed=0, window=16, stride=8, recordings=rec)
    wd.prepare(tmp_path, devices=2, seed=0, window=16, stride=8, recordings=rec)
    assert sorted(p.name for p in tmp_path.glob("device-*.npz")) == ["device-0.npz", "device-1.npz"]


def test_prepare_refuses_window_longer_than_recordings(tmp_path):
    with pytest.raises(FedmqError, match="shorter window"):
        wd.prepare(
            tmp_path, devices=2, seed=0, window=10_000, stride=10, recordings=fake_recordings()
        )


def test_prepare_real_watch_data(tmp_path):
    pytest.importorskip("seglearn")
    data = wd.prepare(tmp_path, devices=3, seed=0)
    assert len(data.device_files) == 3 and len(data.test_subjects) == wd.DEFAULT_TEST_SUBJECTS
    seen = [s for people in data.device_subjects for s in people]
    assert len(seen) == len(set(seen)) == 10 - wd.DEFAULT_TEST_SUBJECTS
    assert not set(seen) & set(data.test_subjects)
    assert data.class_names == ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
    X, y = load(data.test_file)
    assert X.shape[1:] == (6, wd.DEFAULT_WINDOW) and set(np.unique(y)) == set(range(7))
    assert np.isfinite(X).all() and np.abs(X).max() < 20  # fixed scaling keeps it O(1)


# ------------------------------------------------------------------ baseline


def separable(n: int = 96, seed: int = 0):
    """Two classes told apart by the sign of channel 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    X = rng.normal(scale=0.3, size=(n, 6, 16)).astype(np.float32)
    X[:, 0, :] += np.where(y == 1, 1.0, -1.0)[:, None]
    return X, y.astype(np.int64)


def tiny_task(**train) -> TaskSpec:
    from broker.task import from_dict

    return from_dict(
        {
            "seed": 0,
            "model": {"arch": "cnn1d", "in_channels": 6, "num_classes": 2, "channels": [4]},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "adam", **train},
        }
    )


def test_train_epochs_learns_and_is_deterministic():
    torch = pytest.importorskip("torch")
    from broker.zoo import build_model

    X, y = separable()
    task = tiny_task()
    models = []
    for _ in range(2):
        model = build_model(task.model, seed=0)
        loss = wd.train_epochs(model, X, y, task.train, epochs=5, seed=3)
        assert np.isfinite(loss)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert wd.accuracy(models[0], X, y) > 0.9
    loss, acc = wd.evaluate(models[0], X, y)
    assert loss < 0.5 and acc == wd.accuracy(models[0], X, y)


@pytest.mark.parametrize("train", [{"optimizer": "sgd", "momentum": 0.9}, {"batch_size": 0}])
def test_train_epochs_options(train):
    pytest.importorskip("torch")
    from broker.zoo import build_model

    X, y = separable()
    task = tiny_task(**train)
    model = build_model(task.model, seed=0)
    wd.train_epochs(model, X, y, task.train, epochs=8, seed=0)
    assert wd.accuracy(model, X, y) > 0.8


def test_train_centralized_pools_files(tmp_path):
    pytest.importorskip("torch")
    X, y = separable(n=120)
    files = []
    for k, part in enumerate(np.array_split(np.arange(len(y)), 3)):
        files.append(tmp_path / f"device-{k}.npz")
        np.savez(files[-1], X=X[part], y=y[part])
    model = wd.train_centralized(tiny_task(), files, rounds=4)
    assert wd.accuracy(model, X, y) > 0.9
    with pytest.raises(FedmqError):
        wd.train_centralized(tiny_task(), [], rounds=1)
    assert isinstance(TrainSpec(), TrainSpec)


# ------------------------------------------------------------------ the split in time


def test_split_in_time_gives_every_subject_to_a_device():
    subject = fake_recordings(subjects=10, per_subject=3).subject
    split = wd.split_in_time(subject, devices=10, seed=0)
    assert sorted(s for people in split.device_subjects for s in people) == list(range(1, 11))
    assert all(len(people) == 1 for people in split.device_subjects)  # one person each
    assert split.test == tuple(range(len(subject)))  # every recording's tail
    assert wd.split_in_time(subject, devices=10, seed=0) == split
    assert wd.split_in_time(subject, devices=10, seed=1) != split
    seven = wd.split_in_time(subject, devices=7, seed=0)  # fewer devices: whole people
    assert sorted(s for people in seven.device_subjects for s in people) == list(range(1, 11))
    spread = wd.split_in_time(subject, devices=12, seed=0)  # more: a person over devices
    assert len(spread.devices) == 12
    assert sorted(i for rows in spread.devices for i in rows) == list(range(len(subject)))


def test_prepare_in_time_holds_out_the_tail_of_every_recording(tmp_path):
    rec = fake_recordings(subjects=6, per_subject=2, length=200)
    # 4 training subjects when 2 are held out: 5 devices switch to the split in time
    data = wd.prepare(tmp_path, devices=5, seed=0, window=20, stride=10, recordings=rec)
    assert data.test_tail == wd.TEST_TAIL and "last 20% in time" in data.held_out
    assert data.test_subjects == (1, 2, 3, 4, 5, 6)
    X_test, _ = load(data.test_file)
    train = np.concatenate([load(f)[0] for f in data.device_files])
    # channel 0 is the recording index (unscaled): every recording is in both sets
    assert set(np.unique(X_test[:, 0, 0])) == set(np.unique(train[:, 0, 0])) == set(range(12))
    for i in range(12):  # ... and its tail has as many windows as its last 20% holds
        length = len(rec.X[i])
        tail = length - int(length * 0.8)
        assert (X_test[:, 0, 0] == i).sum() == (tail - 20) // 10 + 1
        head = int(length * 0.8)
        assert (train[:, 0, 0] == i).sum() == (head - 20) // 10 + 1
    by_subject = wd.prepare(tmp_path / "s", devices=4, seed=0, window=20, stride=10, recordings=rec)
    assert by_subject.test_tail == 0.0 and by_subject.held_out.startswith("held-out subjects")
    with pytest.raises(FedmqError, match="split"):
        wd.prepare(tmp_path / "x", devices=2, split="random", recordings=rec)


def test_the_task_carries_the_strategy_table(tmp_path):
    rec = fake_recordings()
    data = wd.prepare(
        tmp_path,
        devices=2,
        window=16,
        stride=8,
        recordings=rec,
        strategy={"name": "trimmed_mean", "beta": 0.2},
    )
    assert TaskSpec.load(data.task_path).strategy == {"name": "trimmed_mean", "beta": 0.2}
    plain = wd.prepare(tmp_path / "p", devices=2, window=16, stride=8, recordings=rec)
    assert TaskSpec.load(plain.task_path).strategy == {}
    assert "[strategy]" not in plain.task_path.read_text()
