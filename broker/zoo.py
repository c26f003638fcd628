"""The model zoo: a task's ``[model]`` table -> a ``torch.nn.Module``, by lookup only.

Built-in architectures are small on purpose (they train on a Raspberry Pi)::

    linear(in_features, out_features=1, bias=True)
    mlp(in_features, out_features, hidden=[32])
    cnn1d(in_channels, num_classes, channels=[16, 32], kernel_size=5)

``linear`` and ``mlp`` take rows of ``in_features`` numbers (a CSV row without
its label). ``cnn1d`` takes sensor windows shaped (in_channels, time): an
``.npz`` whose ``X`` is (samples, in_channels, time), or a CSV whose rows hold
in_channels x time numbers, channel by channel (all of channel 0's time steps,
then channel 1's, ...), which the agent reshapes; time must survive one halving
per entry of ``channels``.

Any other architecture must be registered by the machine that builds it, in its
own configuration: a name mapped to ``"package.module:function"`` (the agent's
and the aggregator's ``[architectures]`` table or ``--arch NAME=module:function``).
The task travels inside the model message, so its ``arch`` is only ever a name
looked up here: a task cannot make a device import anything, and a name that is
neither built in nor registered is refused before anything is imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from broker.errors import ConfigError, TaskError
from broker.task import ModelSpec

Factory = Callable[..., nn.Module]
# name -> factory, or "package.module:function" from this machine's own configuration
Registry = Mapping[str, Factory | str]

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")


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


def build_model(
    spec: ModelSpec, seed: int | None = None, registry: Registry | None = None
) -> nn.Module:
    """Instantiate the architecture; with ``seed``, its initial weights are reproducible.

    ``spec.arch`` is looked up among the built-ins, then in ``registry`` (this
    machine's own registrations); it is never imported.
    """
    factory = resolve(spec.arch, registry)
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


def resolve(arch: str, registry: Registry | None = None) -> Factory:
    """The factory for ``arch``: a built-in or a local registration, else TaskError.

    The reason of that TaskError is ``unknown_architecture``. Only a registered
    entry's own target (written in local configuration) is ever imported.
    """
    if arch in BUILTIN:
        return BUILTIN[arch]
    if registry is not None and isinstance(arch, str) and arch in registry:
        target = registry[arch]
        if isinstance(target, str):
            try:
                return import_target(target)
            except ConfigError as exc:
                raise TaskError(f"architecture {arch!r}: {exc}") from None
        return target
    registered = sorted(registry or {})
    raise TaskError(
        f"unknown architecture {arch!r}: built in are {', '.join(sorted(BUILTIN))}"
        + (f", registered here {', '.join(registered)}" if registered else ", none registered")
        + "; a task cannot name code to import",
        reason="unknown_architecture",
    )


def parse_registry(entries: Any, source: str) -> dict[str, str]:
    """Check locally configured architectures (``name -> "package.module:function"``).

    ``source`` names where they came from (a config file's ``[architectures]``
    table, ``--arch``) for the ConfigError. Nothing is imported here.
    """
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        raise ConfigError(f'{source}: must be a table of name = "package.module:function"')
    out: dict[str, str] = {}
    for name, target in entries.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(
                f"{source}: architecture name {name!r} must be letters, digits, '_', '.', '-' "
                "(no ':')"
            )
        if name in BUILTIN:
            raise ConfigError(f"{source}: {name!r} is a built-in architecture; pick another name")
        if not isinstance(target, str) or not TARGET.match(target):
            raise ConfigError(
                f'{source}: architecture {name!r} must be "package.module:function", got {target!r}'
            )
        out[name] = target
    return out


def parse_arch_options(values: Iterable[str], source: str = "--arch") -> dict[str, str]:
    """``NAME=package.module:function`` strings (flags, environment) -> a registry."""
    entries: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep:
            raise ConfigError(f"{source} {value!r}: use NAME=package.module:function")
        entries[name.strip()] = target.strip()
    return parse_registry(entries, source)


def load_registry(entries: Mapping[str, str], source: str) -> dict[str, Factory]:
    """Import every registered target now, so a typo fails at start, not at the first round."""
    out: dict[str, Factory] = {}
    for name, target in entries.items():
        try:
            out[name] = import_target(target)
        except ConfigError as exc:
            raise ConfigError(f"{source}: architecture {name!r}: {exc}") from None
    return out


def import_target(target: str) -> Factory:
    """Import ``package.module:function``: only ever called on local configuration."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable {attr!r}")
    return factory
