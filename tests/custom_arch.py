"""A model factory outside the zoo, usable once registered locally by name."""

from __future__ import annotations

from torch import nn


def tiny(in_features: int = 2, out_features: int = 1, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))


def not_a_module(**kwargs) -> int:
    return 42


NOT_CALLABLE = 3


class _Slow(nn.Module):
    """``tiny`` whose every forward pass keeps the Python interpreter busy for ``seconds``:
    a pure-Python loop, the worst case for paho's network thread, which must win the GIL
    back from it to send its keepalive pings."""

    def __init__(self, in_features: int, out_features: int, seconds: float):
        super().__init__()
        self.inner = tiny(in_features, out_features)
        self.seconds = seconds

    def forward(self, x):
        import time

        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            pass
        return self.inner(x)


def slow(in_features: int = 2, out_features: int = 1, seconds: float = 1.0) -> nn.Module:
    return _Slow(in_features, out_features, seconds)
