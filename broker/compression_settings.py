"""The task's ``[compression]`` table: how devices encode their updates on the wire::

    [compression]
    encoding = "int8"       # "none" | "fp16" | "int8" | "topk"
    per_channel = false     # int8: true = one scale per row of each weight matrix
    fraction = 0.01         # topk: share of each tensor's coordinates sent every round

Checked once where the task is read (``broker.task.from_dict``), so the aggregator
refuses a bad table before writing anything and a device refuses a model that carries
one. Kept apart from ``broker/compression.py`` so that reading a task never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import TaskError

ENCODINGS = ("none", "fp16", "int8", "topk")
SECTION = "compression"
_KEYS = {"fp16": set(), "int8": {"per_channel"}, "topk": {"fraction"}, "none": set()}


@dataclass(frozen=True)
class Compression:
    encoding: str = "none"
    per_channel: bool = False  # int8: per-tensor by default (fewest bytes)
    fraction: float = 0.01  # topk

    @property
    def active(self) -> bool:
        return self.encoding != "none"

    @property
    def label(self) -> str:
        """The update's ``encoding`` metadata: the encoding and every setting that shapes
        the payload, so that the aggregator can insist on exactly its own."""
        if self.encoding == "int8":
            return "int8/channel" if self.per_channel else "int8/tensor"
        if self.encoding == "topk":
            return f"topk/{self.fraction!r}"
        return "" if self.encoding == "none" else self.encoding


NONE = Compression()


def parse(table: Mapping[str, Any] | None) -> Compression:
    """The checked settings of a ``[compression]`` table ({} or None: no compression);
    ``TaskError`` names the key."""
    if not table:
        return NONE
    encoding = table.get("encoding")
    if encoding not in ENCODINGS:
        raise TaskError(
            f"[{SECTION}] encoding must be one of {', '.join(map(repr, ENCODINGS))}, "
            f"got {encoding!r}"
        )
    extra = sorted(set(table) - {"encoding"} - _KEYS[encoding])
    if extra:
        known = {k for keys in _KEYS.values() for k in keys}
        wrong = [k for k in extra if k in known]
        if wrong:
            raise TaskError(f"[{SECTION}] {wrong[0]} does not apply to encoding {encoding!r}")
        raise TaskError(f"unknown [{SECTION}] key(s): {', '.join(extra)}")
    per_channel = table.get("per_channel", False)
    if not isinstance(per_channel, bool):
        raise TaskError(f"[{SECTION}] per_channel must be true or false, got {per_channel!r}")
    fraction = table.get("fraction", 0.01)
    if (
        not isinstance(fraction, (int, float))
        or isinstance(fraction, bool)
        or not math.isfinite(fraction)
        or not 0 < fraction <= 1
    ):
        raise TaskError(f"[{SECTION}] fraction must be a number in (0, 1], got {fraction!r}")
    return Compression(encoding=encoding, per_channel=per_channel, fraction=float(fraction))


def check_with_secure_aggregation(compression: Mapping[str, Any], secure: Mapping[str, Any]):
    """Secure aggregation quantizes the updates itself (to integers modulo 2^32, inside
    its masks): it cannot also receive them compressed."""
    if parse(compression).active and secure and secure.get("enabled", True) is not False:
        raise TaskError(
            f"[{SECTION}] cannot be combined with [secure_aggregation]: secure aggregation "
            "quantizes the updates itself, inside its masks; remove one of the two tables"
        )
