"""Small synthetic fleets for tests, the chaos script and benchmarks (not the demo).

Each device gets a CSV of 4-feature points from 3 Gaussian blobs, mostly of one
class (the non-IID split of a real fleet), and ``BLOBS_TASK`` trains a small MLP.
"""

from __future__ import annotations

from pathlib import Path


def write_blobs(directory: Path, devices: list[str], samples: int = 40, seed: int = 0) -> dict:
    """Small non-IID classification data, one CSV per device: 4 features, 3 classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, size=(3, 4))
    files = {}
    directory.mkdir(parents=True, exist_ok=True)
    for i, device in enumerate(devices):
        # each device sees mostly one class: the non-IID split of a real fleet
        probs = np.full(3, 0.15)
        probs[i % 3] = 0.7
        y = rng.choice(3, size=samples, p=probs / probs.sum())
        X = centers[y] + rng.normal(0, 1.0, size=(samples, 4))
        path = directory / f"{device}.csv"
        rows = ["f0,f1,f2,f3,label"] + [
            ",".join(f"{v:.6f}" for v in x) + f",{c}" for x, c in zip(X, y)
        ]
        path.write_text("\n".join(rows) + "\n")
        files[device] = path
    return files


BLOBS_TASK = """
seed = 7
[model]
arch = "mlp"
in_features = 4
hidden = [16]
out_features = 3
[train]
epochs = 2
batch_size = 8
lr = 0.1
optimizer = "sgd"
loss = "cross_entropy"
[data]
label = "label"
"""


def blobs_task(directory: Path) -> Path:
    path = directory / "task.toml"
    path.write_text(BLOBS_TASK)
    return path


def mlp_task(
    hidden: list[int],
    *,
    out_features: int = 8,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
) -> str:
    """The task file of an MLP over 64 inputs, for the benchmarks: ``hidden`` sets its size
    (and so the bytes of an update)."""
    return f"""
seed = {seed}
[model]
arch = "mlp"
in_features = 64
hidden = {list(hidden)}
out_features = {out_features}
[train]
epochs = 1
batch_size = {batch_size}
lr = {lr}
optimizer = "sgd"
loss = "cross_entropy"
"""
