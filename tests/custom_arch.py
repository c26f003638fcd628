"""A model factory outside the zoo, usable once registered locally by name."""

from __future__ import annotations

from torch import nn


def tiny(in_features: int = 2, out_features: int = 1, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))


def not_a_module(**kwargs) -> int:
    return 42


NOT_CALLABLE = 3
