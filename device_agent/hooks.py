"""What a strategy may ask of a device's training, beyond the task's strict ``[train]``.

The aggregator's strategy sends these in the round's plan (``train`` in the model
message's ``plan`` metadata, signed with the model). A device knows a fixed list
of settings and refuses a model that asks for any other, so a newer strategy
never silently trains as an older one:

    proximal_mu   FedProx (Li et al. 2020): adds ``mu/2 * ||w - w_global||^2`` to the loss
    dp_clip       DP-FedAvg (McMahan et al. 2018): the update ``w - w_global`` is clipped
                  to this L2 norm before it is sent (the aggregator clips again: it does
                  not take a device's word for it)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from broker.errors import CodecError

KNOWN = ("proximal_mu", "dp_clip")


@dataclass(frozen=True)
class TrainingHooks:
    proximal_mu: float = 0.0
    dp_clip: float | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, float]) -> TrainingHooks:
        unknown = sorted(set(settings) - set(KNOWN))
        if unknown:
            raise CodecError(
                f"the round asks for training setting(s) {', '.join(unknown)} that this "
                f"device does not know (it knows {', '.join(KNOWN)}); update fedmq on the device",
                reason="unknown_setting",
            )
        mu = settings.get("proximal_mu", 0.0)
        if mu < 0:
            raise CodecError(f"proximal_mu must be >= 0, got {mu}", reason="bad_metadata")
        clip = settings.get("dp_clip")
        if clip is not None and clip <= 0:
            raise CodecError(f"dp_clip must be > 0, got {clip}", reason="bad_metadata")
        return cls(proximal_mu=mu, dp_clip=clip)

    def finish(
        self, global_weights: Mapping[str, torch.Tensor], trained: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The weights to send: ``trained``, its update clipped to ``dp_clip`` if asked."""
        if self.dp_clip is None:
            return trained
        return clip_update(global_weights, trained, self.dp_clip)

    def penalty(self, model: nn.Module):
        """A function of the model adding the proximal term to a batch's loss (or None)."""
        if self.proximal_mu == 0.0:
            return None
        anchor = [p.detach().clone() for p in model.parameters()]
        mu = self.proximal_mu

        def proximal(m: nn.Module) -> torch.Tensor:
            total = sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))
            return 0.5 * mu * total

        return proximal


def clip_update(
    global_weights: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], bound: float
) -> dict[str, torch.Tensor]:
    """``g + delta * min(1, bound / ||delta||)`` with ``delta = trained - g`` over the
    floating-point tensors (L2 over all of them); integer buffers pass through."""
    deltas = {
        k: v.to(torch.float64) - global_weights[k].to(torch.float64)
        for k, v in trained.items()
        if v.dtype.is_floating_point
    }
    norm = float(sum(float((d * d).sum()) for d in deltas.values())) ** 0.5
    if norm <= bound:
        return dict(trained)
    scale = bound / norm
    out = dict(trained)
    for k, d in deltas.items():
        out[k] = (global_weights[k].to(torch.float64) + d * scale).to(trained[k].dtype)
    return out
