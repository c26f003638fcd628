"""What a strategy may ask of a device's training, beyond the task's strict ``[train]``.

The aggregator's strategy sends these in the round's plan (``train`` in the model
message's ``plan`` metadata, signed with the model). A device knows a fixed list
of settings and refuses a model that asks for any other, so a newer strategy
never silently trains as an older one:

    proximal_mu   FedProx (Li et al. 2020): adds ``mu/2 * ||w - w_global||^2`` to the loss

Clipping and noise for differential privacy will be added here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from broker.errors import CodecError

KNOWN = ("proximal_mu",)


@dataclass(frozen=True)
class TrainingHooks:
    proximal_mu: float = 0.0

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
        return cls(proximal_mu=mu)

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
