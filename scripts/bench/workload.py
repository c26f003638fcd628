"""The peer benchmark's workload, shared by its three systems (fedmq, Flower, in-process).

scikit-learn's ``load_digits`` (pixels scaled to [0, 1]), an 80/20 split (seed 42), the
training part dealt IID to the clients (a seeded shuffle, then equal slices); an MLP
64-64-10 (4,810 parameters, fedmq's zoo ``mlp`` with ``hidden = [64]``); SGD lr 0.1,
momentum 0, batch 16, one local epoch per round; FedAvg weighted by samples.

``prepare`` (main venv: needs scikit-learn and fedmq) writes every file the systems read:
one CSV per client (what a fedmq agent reads), the same arrays in ``clients.npz`` and
``test.npz``, the task TOML, and ``init.npz``, the initial weights fedmq's aggregator
builds from the task's seed, so all three systems start from the same model.

Everything below ``prepare`` needs only numpy and torch: the Flower venv imports it too.
Local training follows fedmq's agent (``device_agent/trainer.py``): each epoch's order
is ``torch.randperm`` seeded with ``training_seed(task seed, round, client)``, so the
three systems draw the same minibatches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SEED = 42  # the split, the IID deal and the task's seed (initial weights)
HIDDEN = 64
CLASSES = 10
FEATURES = 64
LR = 0.1
BATCH = 16
EPOCHS = 1

TASK = f"""
seed = {SEED}
[model]
arch = "mlp"
in_features = {FEATURES}
hidden = [{HIDDEN}]
out_features = {CLASSES}
[train]
epochs = {EPOCHS}
batch_size = {BATCH}
lr = {LR}
momentum = 0.0
optimizer = "sgd"
loss = "cross_entropy"
[data]
label = "label"
"""


def client_names(clients: int) -> list[str]:
    return [f"client-{k:02d}" for k in range(clients)]


def prepare(directory: Path, clients: int) -> dict:
    """Write the workload's files into ``directory``; returns a small description."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    directory.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=SEED)
    order = np.random.default_rng(SEED).permutation(len(X_train))
    parts = np.array_split(order, clients)
    names = client_names(clients)
    arrays = {}
    for name, rows in zip(names, parts):
        arrays[f"{name}/X"], arrays[f"{name}/y"] = X_train[rows], y_train[rows]
        header = ",".join(f"p{i}" for i in range(FEATURES)) + ",label"
        lines = [header] + [
            ",".join(repr(float(v)) for v in x) + f",{int(c)}"
            for x, c in zip(X_train[rows], y_train[rows])
        ]
        (directory / f"{name}.csv").write_text("\n".join(lines) + "\n")
    np.savez(directory / "clients.npz", **arrays)
    np.savez(directory / "test.npz", X=X_test, y=y_test)
    (directory / "task.toml").write_text(TASK)
    np.savez(directory / "init.npz", **fedmq_initial_weights(directory / "task.toml"))
    info = {"clients": names, "train": len(X_train), "test": len(X_test)}
    (directory / "workload.json").write_text(json.dumps(info))
    return info


def fedmq_initial_weights(task_path: Path) -> dict[str, np.ndarray]:
    """The first global model of a fedmq run of this task (the aggregator's own function)."""
    from aggregator.service import initial_weights
    from broker.task import TaskSpec

    weights = initial_weights(TaskSpec.load(task_path))
    return {k: v.numpy() for k, v in weights.items()}


# -- numpy + torch only from here on (the Flower venv imports these) -----------------------


def load_clients(directory: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    names = json.loads((directory / "workload.json").read_text())["clients"]
    with np.load(directory / "clients.npz") as z:
        return [(n, z[f"{n}/X"], z[f"{n}/y"]) for n in names]


def load_test(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(directory / "test.npz") as z:
        return z["X"], z["y"]


def load_init(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / "init.npz") as z:
        return {k: z[k] for k in z.files}


def training_seed(task_seed: int, round_: int, client: str) -> int:
    """fedmq's ``device_agent.trainer.training_seed``, copied: the same shuffles everywhere."""
    digest = hashlib.sha256(f"{task_seed}/{round_}/{client}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def build_model():
    """fedmq's zoo ``mlp(64, 10, hidden=[64])``: the same layers and state_dict names."""
    from torch import nn

    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def train_local(model, X: np.ndarray, y: np.ndarray, seed: int) -> float:
    """One local epoch of minibatch SGD in place, as fedmq's agent trains; mean loss."""
    import torch

    inputs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    targets = torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    n = len(inputs)
    model.train()
    total = 0.0
    for _ in range(EPOCHS):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[idx]), targets[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
    return total / n


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
    return float((out.argmax(dim=1).numpy() == y).mean())


def fedavg(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Sample-weighted mean of (weights, samples) pairs (float64 sum, float32 result)."""
    total = sum(n for _, n in updates)
    keys = updates[0][0].keys()
    return {
        k: (sum(w[k].astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
        for k in keys
    }


def round_event(path: Path, round_: int, accuracy_: float | None = None) -> None:
    """Append a round's end to the events file the benchmark watches (one JSON line)."""
    import time

    row = {"round": round_, "time": time.time()}
    if accuracy_ is not None:
        row["accuracy"] = accuracy_
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
