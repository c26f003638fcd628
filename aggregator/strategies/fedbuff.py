"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation.

Devices train whenever they are ready, on whatever model is newest when they
wake; nobody waits for the slowest. The aggregator keeps a buffer (the round's
journal) and publishes a new model every ``buffer_size`` accepted updates. An
update trained on a model ``s`` versions old (its staleness) still counts if
``s <= max_staleness``, down-weighted by

    weight(s) = 1 / sqrt(1 + s)          (the paper's choice: 1, 0.71, 0.58, 0.5, ...)

and one older than that is refused (counted as late). Each update i moves the
current model g by its own delta from the model it trained on, ``Δ_i = w_i -
g_{base_i}``, and the new model is

    g' = g + server_lr * Σ n_i weight(s_i) Δ_i / Σ n_i

(n_i: its samples). With every update fresh and ``server_lr = 1`` that is
exactly FedAvg: the sample-weighted mean of the devices' models, computed the
same way, bit for bit. A device contributes at most once per buffer; a second
update from it before the buffer closes is counted as a duplicate.
"""

from __future__ import annotations

import math

import torch

from aggregator.strategies.base import Params, Strategy, StrategyError, Tensors, Updates, cast_like
from aggregator.strategies.sums import weighted_mean


def staleness_weight(staleness: int) -> float:
    """How much an update trained ``staleness`` model versions ago counts (1 when fresh)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def server_step(current: Tensors, mean: Tensors, server_lr: float) -> Tensors:
    """``current + server_lr * (mean - current)`` for floating tensors; ``mean`` itself at 1."""
    if server_lr == 1.0:
        return mean
    out = {}
    for name, value in current.items():
        if value.dtype.is_floating_point:
            g = value.to(torch.float64)
            out[name] = g + server_lr * (mean[name].to(torch.float64) - g)
        else:
            out[name] = mean[name]
    return cast_like(out, current)


class FedBuff(Strategy):
    name = "fedbuff"
    asynchronous = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if self.fraction < 1.0:
            raise StrategyError(
                "[strategy] fraction: fedbuff does not sample devices; each trains when it is "
                "ready and the buffer takes the first buffer_size updates"
            )
        self.buffer_size = params.integer("buffer_size", 10, low=1)
        self.max_staleness = params.integer("max_staleness", 4, low=0)
        self.server_lr = params.number("server_lr", 1.0, low=0.0, low_open=True)

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        now = updates.round

        def scale(update) -> float:
            return staleness_weight(now - update.round)

        mean = weighted_mean(global_weights, updates, self.clip_norm, scale)
        return server_step(global_weights, mean, self.server_lr)

    def describe(self) -> str:
        return (
            f"fedbuff (buffer_size={self.buffer_size}, max_staleness={self.max_staleness}, "
            f"server_lr={self.server_lr:g})"
        )
