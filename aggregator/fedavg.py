"""Sample-weighted federated averaging, folded one update at a time.

``FoldedSum`` holds one float64 copy of the model, whatever the number of
devices: each update is added as ``num_samples * weights`` the moment it is
accepted, and ``average()`` divides once at the end. float64 accumulation of
float32 weights makes the result independent of the arrival order in practice
(products of a float32 and an integer weight are exact in float64), so a run
that crashed and replayed its journal ends with the same model.

Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged and rounded
back to their own dtype; nothing is silently cast to float on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Tensors = dict[str, torch.Tensor]


class FoldedSum:
    def __init__(self, template: Tensors) -> None:
        self._dtypes = {k: t.dtype for k, t in template.items()}
        self._sum = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in template.items()}
        self.total_weight = 0
        self.count = 0

    def fold(self, tensors: Tensors, weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if set(tensors) != set(self._sum):
            raise ValueError("update does not have the model's tensors")
        for name, acc in self._sum.items():  # check all before changing any
            if tuple(tensors[name].shape) != tuple(acc.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}")
        for name, acc in self._sum.items():
            _add_chunked(acc, tensors[name], weight)
        self.total_weight += weight
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        if self.total_weight == 0:
            raise ValueError("nothing folded yet")
        out = {}
        for name, acc in self._sum.items():
            dtype = self._dtypes[name]
            if dtype.is_floating_point and acc.numel() > CHUNK:
                out[name] = _divided(acc, self.total_weight, dtype)
            else:
                out.update(cast_to({name: acc / self.total_weight}, self._dtypes))
        return out


CHUNK = 1 << 16  # elements added or divided at a time: a 512 KiB float64 temporary


def _add_chunked(acc: torch.Tensor, value: torch.Tensor, weight: int) -> None:
    """``acc += weight * value``, element for element the same: torch casts a float32
    ``value`` to a float64 temporary of its whole size first (for a model of one big
    layer: two models' worth beside the sum); here each chunk is cast into one float64
    scratch buffer, reused, so that no temporary is allocated at all (freed 512 KiB
    temporaries, one per chunk, were left pinned in the heap under longer-lived blocks)."""
    flat_acc, flat_value = acc.reshape(-1), value.reshape(-1)
    if flat_acc.numel() <= CHUNK or value.dtype == acc.dtype:
        acc.add_(value, alpha=weight)
        return
    scratch = torch.empty(CHUNK, dtype=acc.dtype)
    for start in range(0, flat_acc.numel(), CHUNK):
        part = flat_value[start : start + CHUNK]
        cast = scratch[: part.numel()]
        cast.copy_(part)  # float32 -> float64: exact
        flat_acc[start : start + CHUNK].add_(cast, alpha=weight)


def _divided(acc: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """``(acc / total).to(dtype)``, element for element the same, without a float64
    temporary the size of the tensor (for a model of one big layer: two models' worth),
    nor one per chunk: each chunk is divided into one reused scratch buffer."""
    result = torch.empty(acc.shape, dtype=dtype)
    flat_in, flat_out = acc.reshape(-1), result.reshape(-1)
    scratch = torch.empty(CHUNK, dtype=acc.dtype)
    for start in range(0, flat_in.numel(), CHUNK):
        part = flat_in[start : start + CHUNK]
        quotient = scratch[: part.numel()]
        torch.div(part, total, out=quotient)
        flat_out[start : start + CHUNK].copy_(quotient)
    return result


def cast_to(values: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> Tensors:
    """float64 results back to the model's dtypes (integer buffers rounded, bools thresholded)."""
    out = {}
    for name, value in values.items():
        dtype = dtypes[name]
        if dtype.is_floating_point:
            out[name] = value.to(dtype)
        elif dtype == torch.bool:
            out[name] = value >= 0.5
        else:
            out[name] = torch.round(value).to(dtype)
    return out


def fedavg(updates: Iterable[tuple[Tensors, int]]) -> dict[str, torch.Tensor]:
    """The weighted mean of ``(tensors, num_samples)`` pairs (non-empty)."""
    folded: FoldedSum | None = None
    for tensors, weight in updates:
        if folded is None:
            folded = FoldedSum(tensors)
        folded.fold(tensors, weight)
    if folded is None:
        raise ValueError("fedavg of no updates")
    return folded.average()


class WeightedMetrics:
    """Sample-weighted means of the numbers devices report (train and eval loss, accuracy)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, int] = {}

    def fold(self, metrics: Mapping[str, float], weight: int) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * weight
            self._weights[key] = self._weights.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._weights[k] for k in sorted(self._sums)}
