"""Poisoned updates: what a compromised device sends instead of its honest update.

For demonstrations and tests of robust aggregation only (``fedmq demo --attack``). The
attacker is an insider: it holds valid keys, trains honestly on its data, then replaces
the weights it would have sent. Every kind is defined on the honest update
``delta = w - g``, where ``g`` is the round's global model and ``w`` the weights the device
trained from it, with ``S`` the attack's scale:

    sign_flip   g - S * delta        the update turned around (and stretched): pushes the
                                     model away from where the device's data pulls it
    scale       g + S * delta        the honest direction, S times too far: one device
                                     dominates a mean
    noise       g + z                z Gaussian, isotropic, with E||z|| = S * ||delta||:
                                     a random direction of a plausible (S = 1) or larger size
    constant    S everywhere         every weight set to S, the update unrelated to the data

Norms are L2 over every floating-point tensor of the model (BatchNorm's running mean and
variance included, like ``aggregator.strategies.sums.delta_norm``). Only floating-point
tensors are changed: integer buffers such as BatchNorm's ``num_batches_tracked`` pass
through as trained, since the aggregator rounds them anyway and a wrong count is no attack.

``DEFAULT_SCALES`` are chosen for the demo's 2 attackers among 10 devices (measured with
``scripts/attack_table.py``, see the README's attack table). A flip of ``-1 * delta``
only slows FedAvg down: the 8 honest updates outweigh it. ``sign_flip`` defaults to
S = 4 = (1 - F) / F for F = 0.2, the flip at which the attackers cancel the honest
majority's mean, and FedAvg stops learning. ``scale`` with S = 4 did no harm to FedAvg
(a 1.6x longer step); S = 10 (2.8x) breaks it. ``noise`` at 10 times the honest norm
and ``constant`` 1 both break FedAvg too. Larger scales only make the attackers easier
to spot for the robust rules; the defaults are round numbers that break
FedAvg.

This module is pure tensor math (no MQTT, no files), usable by the agent and the demo.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from broker.errors import ConfigError

Tensors = dict[str, torch.Tensor]

KINDS = ("sign_flip", "scale", "noise", "constant")
DEFAULT_SCALES: dict[str, float] = {
    "sign_flip": 4.0,
    "scale": 10.0,
    "noise": 10.0,
    "constant": 1.0,
}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"attack must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def default_scale(kind: str) -> float:
    return DEFAULT_SCALES[check_kind(kind)]


def delta_norm(trained: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]):
    """L2 norm of ``trained - global`` over the floating-point tensors (float64)."""
    total = 0.0
    for name, value in trained.items():
        if value.dtype.is_floating_point:
            d = value.to(torch.float64) - global_weights[name].to(torch.float64)
            total += float(torch.dot(d.flatten(), d.flatten()))
    return math.sqrt(total)


def expected_gaussian_norm(dimensions: int) -> float:
    """E||z|| for z ~ N(0, I) in ``dimensions`` dimensions: sqrt(2) Gamma((d+1)/2) / Gamma(d/2)
    (the mean of a chi distribution; about sqrt(d - 1/2) for large d)."""
    if dimensions < 1:
        return 0.0
    return math.sqrt(2.0) * math.exp(
        math.lgamma((dimensions + 1) / 2) - math.lgamma(dimensions / 2)
    )


def poison(
    kind: str,
    global_weights: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    scale: float,
    seed: int = 0,
) -> Tensors:
    """The weights an attacker of ``kind`` sends (see the module docstring), in the trained
    weights' dtypes; ``seed`` drives ``noise`` only. The inputs are not modified."""
    check_kind(kind)
    if not math.isfinite(scale):
        raise ConfigError(f"attack scale must be a finite number, got {scale!r}")
    floats = [n for n, v in trained.items() if v.dtype.is_floating_point]
    if kind == "noise":
        size = sum(trained[n].numel() for n in floats)
        sigma = (
            scale * delta_norm(trained, global_weights) / max(expected_gaussian_norm(size), 1e-300)
        )
        generator = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name, w in trained.items():
        if not w.dtype.is_floating_point:
            out[name] = w.clone()
            continue
        g = global_weights[name].to(torch.float64)
        if kind == "sign_flip":
            value = g - scale * (w.to(torch.float64) - g)
        elif kind == "scale":
            value = g + scale * (w.to(torch.float64) - g)
        elif kind == "noise":
            z = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            value = g + sigma * z
        else:  # constant
            value = torch.full(w.shape, float(scale), dtype=torch.float64)
        out[name] = value.to(w.dtype)
    return out


@dataclass(frozen=True)
class Attacker:
    """A device's poison hook (``AgentConfig.poison``): ``attacker(global, trained)`` gives
    the poisoned weights. The noise seed is derived from the device id and the global model,
    so a device retraining the same round sends the same bytes."""

    kind: str
    scale: float
    device_id: str

    @classmethod
    def create(cls, kind: str, scale: float | None, device_id: str) -> Attacker:
        check_kind(kind)
        return cls(kind, default_scale(kind) if scale is None else float(scale), device_id)

    def __call__(
        self, global_weights: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
    ) -> Tensors:
        seed = noise_seed(self.device_id, global_weights)
        return poison(self.kind, global_weights, trained, self.scale, seed)

    def describe(self) -> str:
        return describe(self.kind, self.scale)


def describe(kind: str, scale: float) -> str:
    """How the update is poisoned, in the docstring's terms, e.g. ``sign_flip: g - 10*delta``."""
    s = f"{scale:g}"
    return {
        "sign_flip": f"sign_flip: g - {s}*delta",
        "scale": f"scale: g + {s}*delta",
        "noise": f"noise: g + Gaussian of expected norm {s}*||delta||",
        "constant": f"constant: every weight {s}",
    }[check_kind(kind)]


def noise_seed(device_id: str, global_weights: Mapping[str, torch.Tensor]) -> int:
    """A seed from the device id and the global model's bytes (names in sorted order)."""
    digest = hashlib.sha256(device_id.encode())
    for name in sorted(global_weights):
        digest.update(name.encode())
        digest.update(global_weights[name].detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
