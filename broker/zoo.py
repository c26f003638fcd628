"""The model zoo: a task's ``[model]`` table -> a ``torch.nn.Module``.

Built-in architectures are small on purpose (they train on a Raspberry Pi):

- ``linear``: ``in_features``, ``out_features`` (1), ``bias`` (true)
- ``mlp``: ``in_features``, ``hidden`` ([32]), ``out_features``
- ``cnn1d``: ``in_channels``, ``num_classes``, ``channels`` ([16, 32]),
  ``kernel_size`` (5): for sensor windows shaped (channels, time)

Any other ``arch`` of the form ``package.module:function`` is imported on the
device and called with the remaining arguments; it must return an nn.Module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from broker.errors import TaskError
from broker.task import ModelSpec


def linear(in_features: int, out_features: int = 1, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def mlp(in_features: int, out_features: int, hidden: list[int] | None = None) -> nn.Module:
    widths = [in_features, *(hidden if hidden is not None else [32])]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def cnn1d(
    in_channels: int,
    num_classes: int,
    channels: list[int] | None = None,
    kernel_size: int = 5,
) -> nn.Module:
    """Conv-BN-ReLU-pool blocks, global average pooling, a linear head."""
    widths = [in_channels, *(channels if channels is not None else [16, 32])]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [
            nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm1d(b),
            nn.ReLU(),
            nn.MaxPool1d(2),
        ]
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"linear": linear, "mlp": mlp, "cnn1d": cnn1d}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Instantiate the architecture; with ``seed``, its initial weights are reproducible."""
    factory = _factory(spec.arch)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = factory(**spec.args)
    except TypeError as exc:
        raise TaskError(f"bad arguments for model {spec.arch!r}: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise TaskError(f"cannot build model {spec.arch!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TaskError(f"{spec.arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(arch: str) -> Callable[..., Any]:
    if arch in BUILTIN:
        return BUILTIN[arch]
    if ":" not in arch:
        raise TaskError(
            f"unknown architecture {arch!r}: use one of {sorted(BUILTIN)} or 'module:function'"
        )
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"architecture {arch!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"architecture {arch!r}: {module_name} has no callable {attr!r}")
    return factory
