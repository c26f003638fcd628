"""Local training and federated evaluation: pure functions of a model and arrays.

No MQTT and no files here: the agent hands in a model, the device's arrays and
the task's ``[train]`` table, and gets numbers back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from broker.errors import DataError
from broker.task import TrainSpec
from device_agent import optimizers
from device_agent.hooks import TrainingHooks


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    train_loss: float  # mean per-sample loss over the last local epoch


def training_seed(task_seed: int, round_: int, device_id: str) -> int:
    """Same device, round and task -> same shuffling, so a retrained update is identical."""
    digest = hashlib.sha256(f"{task_seed}/{round_}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def loss_function(train: TrainSpec) -> nn.Module:
    return {
        "mse": nn.MSELoss(),
        "mse_sum": nn.MSELoss(reduction="sum"),
        "cross_entropy": nn.CrossEntropyLoss(),
    }[train.loss]


def make_optimizer(model: nn.Module, train: TrainSpec) -> optimizers.SGD | optimizers.Adam:
    """The task's optimizer: ``device_agent/optimizers.py``'s, which compute what
    ``torch.optim``'s do without importing the compiler on a device."""
    if train.optimizer == "adam":
        return optimizers.Adam(model.parameters(), lr=train.lr)
    return optimizers.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)


def tensors_for(
    model: nn.Module, X: np.ndarray, y: np.ndarray, train: TrainSpec, source: str = "data"
):
    """Arrays -> (inputs, targets) checked against the model; DataError if they do not fit."""
    inputs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs[:2])
    except RuntimeError as exc:
        raise DataError(
            f"{source}: samples shaped {tuple(X.shape[1:])} do not fit the model ({exc})"
        ) from None
    finally:
        model.train(was_training)
    if train.is_classification:
        classes = out.shape[-1]
        if not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= classes:
            raise DataError(f"{source}: labels must be class indices 0..{classes - 1}")
        targets = torch.from_numpy(y.astype(np.int64))
    else:
        targets = torch.from_numpy(y.astype(np.float32))
        if out.dim() == 2 and out.shape[1] == 1:
            targets = targets.unsqueeze(1)
        elif out.dim() != 1:
            raise DataError(f"{source}: a model with {out.shape[1:]} outputs needs a single target")
    return inputs, targets


def train_local(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    train: TrainSpec,
    seed: int,
    source: str = "data",
    hooks: TrainingHooks = TrainingHooks(),
) -> TrainResult:
    """Run ``train.epochs`` epochs of minibatch training in place; ``hooks`` are what the
    round's strategy asks of training (FedProx's proximal term). The reported loss is the
    task's loss alone, without the proximal term."""
    inputs, targets = tensors_for(model, X, y, train, source)
    return train_tensors(model, inputs, targets, train, seed, hooks)


def train_tensors(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    train: TrainSpec,
    seed: int,
    hooks: TrainingHooks = TrainingHooks(),
) -> TrainResult:
    """``train_local`` on what ``tensors_for`` made (and checked) of the data."""
    n = inputs.shape[0]
    batch = n if train.batch_size in (0, None) or train.batch_size >= n else train.batch_size
    loss_fn = loss_function(train)
    optimizer = make_optimizer(model, train)
    generator = torch.Generator().manual_seed(seed)
    penalty = hooks.penalty(model)  # anchored at the global model, before any step
    model.train()
    epoch_loss = 0.0
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
        epoch_loss = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            if idx.numel() < 2 and batch > 1 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a single sample
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[idx]), targets[idx])
            (loss if penalty is None else loss + penalty(model)).backward()
            optimizer.step()
            per_sample = loss.item() / idx.numel() if train.loss == "mse_sum" else loss.item()
            epoch_loss += per_sample * idx.numel()
        epoch_loss /= n
    return TrainResult(num_samples=n, train_loss=epoch_loss)


def evaluate(
    model: nn.Module, X: np.ndarray, y: np.ndarray, train: TrainSpec, source: str = "data"
) -> dict[str, float]:
    """Mean per-sample loss (and accuracy for classification) without changing the model."""
    inputs, targets = tensors_for(model, X, y, train, source)
    return evaluate_tensors(model, inputs, targets, train)


def evaluate_tensors(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, train: TrainSpec
) -> dict[str, float]:
    """``evaluate`` on what ``tensors_for`` made (and checked) of the data."""
    model.eval()
    with torch.no_grad():
        out = model(inputs)
        if train.is_classification:
            loss = nn.functional.cross_entropy(out, targets).item()
            accuracy = (out.argmax(dim=1) == targets).float().mean().item()
            return {"loss": loss, "accuracy": accuracy}
        return {"loss": nn.functional.mse_loss(out, targets).item()}


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
