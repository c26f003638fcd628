"""Strategies whose result is a weighted sum of the updates: FedAvg and FedProx.

Both fold one update at a time in device-id order (``FoldedSum``: float64, one
copy of the model), so their memory does not grow with the number of devices.
FedProx differs only on the device: it asks for a proximal term ``mu/2 ||w - g||^2``
in the local loss (Li et al. 2020), which keeps non-IID devices near the global
model; the server side is FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from aggregator.fedavg import FoldedSum
from aggregator.strategies.base import Params, Strategy, Tensors, Update, Updates


def clip_factor(norm: float, clip_norm: float | None) -> float:
    """Scale that brings an update of L2 norm ``norm`` to at most ``clip_norm``."""
    if clip_norm is None or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def delta_norm(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``tensors - base`` over every floating-point tensor of the model."""
    total = 0.0
    for name, value in tensors.items():
        if value.dtype.is_floating_point:
            d = value.to(torch.float64) - base[name].to(torch.float64)
            total += float(torch.dot(d.flatten(), d.flatten()))
    return total**0.5


def point(
    update: Update, current: Tensors, clip_norm: float | None = None, scale: float = 1.0
) -> Mapping[str, torch.Tensor]:
    """Where an update moves the current model: ``current + scale * clip(w - base)``.

    A fresh, unclipped, unscaled update is its own weights, untouched, so that FedAvg is
    exactly the sample-weighted mean of the devices' weights. Integer buffers
    (BatchNorm's ``num_batches_tracked``) are never clipped or scaled."""
    factor = scale
    if clip_norm is not None:
        factor *= clip_factor(delta_norm(update.tensors, update.base), clip_norm)
    if factor == 1.0 and update.base is current:
        return update.tensors
    out = {}
    for name, value in update.tensors.items():
        if value.dtype.is_floating_point:
            d = value.to(torch.float64) - update.base[name].to(torch.float64)
            out[name] = current[name].to(torch.float64) + factor * d
        else:
            out[name] = value
    return out


def weighted_mean(
    current: Tensors,
    updates: Iterable[Update],
    clip_norm: float | None = None,
    scale=lambda update: 1.0,
) -> Tensors:
    """The sample-weighted mean of the updates' points (see ``point``), in the model's dtypes."""
    folded = FoldedSum(current)
    for update in updates:
        folded.fold(point(update, current, clip_norm, scale(update)), update.num_samples)
        del update  # not held while the next one is read: one update in memory at a time
    return folded.average()


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted mean of the devices' models."""

    name = "fedavg"
    secure_sum = True

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        return weighted_mean(global_weights, updates, self.clip_norm)


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg, with a proximal term ``mu/2 ||w - g||^2`` in each device's loss."""

    name = "fedprox"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.mu = params.number("mu", 0.01, low=0.0)

    def train_config(self) -> dict[str, float]:
        return {"proximal_mu": self.mu}
