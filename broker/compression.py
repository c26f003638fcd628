"""Compressed updates: pure functions between a device's trained weights and the few
tensors it sends, and back.

A compressed update carries the device's DELTA (trained weights minus the global model
it trained from), never the weights: deltas are small and centred, which is what the
encodings below are good at. The aggregator adds the decoded delta back to that model
(``decode``), so every strategy still sees full-precision weights.

Every floating tensor of the model is flattened and concatenated in sorted-name order
into one vector of N coordinates; integer tensors (BatchNorm's batch counters) travel
exactly, as int64 deltas. Packing keeps the safetensors header to a few entries, which
matters for small models. The payload holds (``wire_schema`` gives the exact shapes, all
implied by the model and the settings, so the codec checks them before reading data):

============  =====================================================================
encoding      tensors
============  =====================================================================
``fp16``      ``delta`` F16[N] (clamped to +-65504)
``int8``      ``delta`` I8[N] and ``scale`` F32[G]: coordinate i is ``delta[i] *
              scale[g(i)]``; one group per tensor, or (``per_channel``) one per row of
              each tensor of 2 or more dimensions. Stochastic rounding: unbiased.
``topk``      ``index`` I32[K] (ascending) and ``value`` F32[K]: each tensor's
              ``ceil(fraction * numel)`` largest coordinates of delta + residual; the
              rest stays in the device's residual (error feedback) for later rounds.
              Tensors of fewer than 2 dimensions (biases, normalization weights and
              running statistics) travel whole in ``dense`` F32[D]: they are few, and
              running statistics are values, not sums of gradients: error feedback
              overshoots them (on the demo, a BatchNorm variance went negative and the
              model fell to chance when they were sparsified).
all           ``counters`` I64[M], the deltas of the integer tensors' M coordinates
============  =====================================================================

The update's ``encoding`` metadata names the encoding and its settings
(``Compression.label``); the signature covers the tensors as sent. ``check`` refuses
anything structurally wrong (scales out of range, indices out of range, unsorted or
not k per tensor) with a ``CodecError``; ``decode`` then cannot fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from broker.codec import Schema, TensorSpec
from broker.compression_settings import Compression
from broker.errors import CodecError

Tensors = dict[str, torch.Tensor]

FP16_MAX = 65504.0
INT8_LEVELS = 127  # quantized values lie in [-127, 127]
MAX_SCALE = torch.finfo(torch.float32).max / 128  # |q * scale| stays finite in float32
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Layout:
    """Where each floating tensor sits in the flat vector, and the integer tensors."""

    floats: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (name, shape, start, numel)
    ints: tuple[tuple[str, int], ...]  # (name, numel)
    size: int  # N

    @property
    def int_size(self) -> int:  # M
        return sum(numel for _, numel in self.ints)

    @classmethod
    def of(cls, schema: Schema) -> Layout:
        floats, ints, start = [], [], 0
        for name in sorted(schema):
            spec = schema[name]
            if spec.dtype in FLOAT_DTYPES:
                numel = math.prod(spec.shape)
                floats.append((name, tuple(spec.shape), start, numel))
                start += numel
            else:
                ints.append((name, math.prod(spec.shape)))
        return cls(tuple(floats), tuple(ints), start)

    def groups(self, per_channel: bool) -> list[int]:
        """int8's scale groups: their sizes, in order (empty tensors have none)."""
        sizes = []
        for _, shape, _, numel in self.floats:
            if numel == 0:
                continue
            if per_channel and len(shape) >= 2:
                sizes += [numel // shape[0]] * shape[0]
            else:
                sizes.append(numel)
        return sizes

    def topk_counts(self, fraction: float) -> list[int]:
        """topk's k for each floating tensor, in order (0 for those sent whole)."""
        return [
            min(numel, math.ceil(fraction * numel)) if len(shape) >= 2 else 0
            for _, shape, _, numel in self.floats
        ]

    def dense(self) -> list[tuple[int, int]]:
        """(start, numel) of the floating tensors topk sends whole: fewer than 2 dims."""
        return [(start, numel) for _, shape, start, numel in self.floats if len(shape) < 2]


def wire_schema(schema: Schema, settings: Compression) -> dict[str, TensorSpec]:
    """The exact tensors a compressed update of a model with ``schema`` must hold."""
    layout = Layout.of(schema)
    wire: dict[str, TensorSpec] = {}
    if settings.encoding == "fp16":
        wire["delta"] = TensorSpec("F16", (layout.size,))
    elif settings.encoding == "int8":
        wire["delta"] = TensorSpec("I8", (layout.size,))
        wire["scale"] = TensorSpec("F32", (len(layout.groups(settings.per_channel)),))
    elif settings.encoding == "topk":
        k = sum(layout.topk_counts(settings.fraction))
        wire["index"] = TensorSpec("I32", (k,))
        wire["value"] = TensorSpec("F32", (k,))
        dense = sum(numel for _, numel in layout.dense())
        if dense:
            wire["dense"] = TensorSpec("F32", (dense,))
    else:
        raise ValueError(f"no wire schema for encoding {settings.encoding!r}")
    if layout.ints:
        wire["counters"] = TensorSpec("I64", (layout.int_size,))
    return wire


def flat_delta(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], layout):
    """trained - base of every floating tensor, as one float32 vector."""
    parts = [
        (trained[name].to(torch.float32) - base[name].to(torch.float32)).reshape(-1)
        for name, *_ in layout.floats
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


def encode(
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    settings: Compression,
    *,
    generator: torch.Generator | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[Tensors, torch.Tensor | None]:
    """The tensors to send for ``trained`` (trained from ``base``), and topk's new
    residual (None for the other encodings). ``residual`` is topk's error feedback from
    earlier rounds (None or a wrong size: none)."""
    from broker.codec import schema_of

    layout = Layout.of(schema_of(base))
    delta = flat_delta(trained, base, layout)
    wire: Tensors = {}
    new_residual = None
    if settings.encoding == "fp16":
        wire["delta"] = delta.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    elif settings.encoding == "int8":
        q, scale = quantize_int8(delta, layout.groups(settings.per_channel), generator)
        wire["delta"], wire["scale"] = q, scale
    elif settings.encoding == "topk":
        if residual is not None and residual.shape == delta.shape:
            delta = delta + residual
        index, value = top_k(delta, layout, settings.fraction)
        new_residual = delta.clone()
        new_residual[index.long()] = 0.0
        wire["index"], wire["value"] = index, value
        if layout.dense():
            wire["dense"] = torch.cat([delta[a : a + n] for a, n in layout.dense()])
            for a, n in layout.dense():
                new_residual[a : a + n] = 0.0
    else:
        raise ValueError(f"cannot encode with {settings.encoding!r}")
    if layout.ints:
        wire["counters"] = torch.cat(
            [
                (trained[n].to(torch.int64) - base[n].to(torch.int64)).reshape(-1)
                for n, _ in layout.ints
            ]
        )
    return wire, new_residual


def quantize_int8(
    x: torch.Tensor, sizes: list[int], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): x ~ q * scale per group, q = floor(x / scale + u), u ~ U[0, 1), so
    E[q * scale] = x exactly; scale = max |x| / 127 of the group (0 for an all-zero one)."""
    if not sizes:
        return torch.zeros(0, dtype=torch.int8), torch.zeros(0)
    groups = torch.split(x, sizes)
    scale = torch.stack([g.abs().max() for g in groups]) / INT8_LEVELS
    scale = torch.where(scale > 0, scale, torch.zeros_like(scale)).clamp(max=MAX_SCALE)
    per_coordinate = torch.repeat_interleave(scale, torch.tensor(sizes))
    safe = torch.where(per_coordinate > 0, per_coordinate, torch.ones_like(per_coordinate))
    noise = torch.rand(x.shape, generator=generator)
    q = torch.floor(x / safe + noise).clamp(-INT8_LEVELS, INT8_LEVELS)
    q = torch.where(per_coordinate > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def top_k(x: torch.Tensor, layout: Layout, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each floating tensor's k largest |x| coordinates: ascending flat indices, values."""
    picked = []
    for (_, _, start, numel), k in zip(layout.floats, layout.topk_counts(fraction)):
        if k:
            local = torch.topk(x[start : start + numel].abs(), k, sorted=False).indices
            picked.append(local.sort().values + start)
    index = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)
    return index.to(torch.int32), x[index].to(torch.float32)


def check(wire: Mapping[str, torch.Tensor], settings: Compression, schema: Schema) -> None:
    """Refuse, with a ``CodecError``, a payload that matches ``wire_schema`` in names,
    dtypes and shapes but not in content (the codec already refused NaN and Inf)."""
    layout = Layout.of(schema)
    if settings.encoding == "int8":
        scale = wire["scale"]
        if scale.numel() and bool(((scale < 0) | (scale > MAX_SCALE)).any()):
            raise CodecError(f"int8 scales must lie in [0, {MAX_SCALE:.3g}]", reason="bad_metadata")
    elif settings.encoding == "topk":
        index = wire["index"].to(torch.int64)
        if index.numel():
            if int(index.min()) < 0 or int(index.max()) >= layout.size:
                raise CodecError(
                    f"topk indices must lie in [0, {layout.size})", reason="bad_metadata"
                )
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                raise CodecError("topk indices must be strictly ascending", reason="bad_metadata")
        starts = torch.tensor([start for _, _, start, _ in layout.floats] + [layout.size])
        counts = torch.searchsorted(index, starts).diff().tolist()
        expected = layout.topk_counts(settings.fraction)
        for (name, *_), got, want in zip(layout.floats, counts, expected):
            if got != want:
                raise CodecError(
                    f"topk: tensor {name!r} has {got} coordinates, the task says {want}",
                    reason="bad_metadata",
                )


def decode(
    wire: Mapping[str, torch.Tensor], settings: Compression, base: Mapping[str, torch.Tensor]
) -> Tensors:
    """The full weights a checked compressed update stands for: ``base`` + its delta, in
    ``base``'s dtypes. Non-finite results (a huge delta on a huge weight) are the
    caller's to refuse (``finite``)."""
    from broker.codec import schema_of

    layout = Layout.of(schema_of(base))
    if settings.encoding == "fp16":
        delta = wire["delta"].to(torch.float32)
    elif settings.encoding == "int8":
        sizes = layout.groups(settings.per_channel)
        scale = torch.repeat_interleave(wire["scale"], torch.tensor(sizes, dtype=torch.int64))
        delta = wire["delta"].to(torch.float32) * scale
    elif settings.encoding == "topk":
        delta = torch.zeros(layout.size)
        delta[wire["index"].long()] = wire["value"]
        offset = 0
        for start, numel in layout.dense():
            delta[start : start + numel] = wire["dense"][offset : offset + numel]
            offset += numel
    else:
        raise ValueError(f"cannot decode {settings.encoding!r}")
    weights: Tensors = {}
    for name, shape, start, numel in layout.floats:
        value = base[name].to(torch.float32) + delta[start : start + numel].reshape(shape)
        weights[name] = value.to(base[name].dtype)
    start = 0
    for name, numel in layout.ints:
        counters = wire["counters"][start : start + numel].reshape(base[name].shape)
        weights[name] = (base[name].to(torch.int64) + counters).to(base[name].dtype)
        start += numel
    return weights


def finite(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse decoded weights with NaN or Inf, as the codec refuses plain ones."""
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CodecError(f"tensor {name!r} decodes to NaN or Inf", reason="non_finite")
