"""Tensors + string metadata <-> one safetensors payload, with strict validation.

``encode`` is ``safetensors.torch.save``. ``decode`` reads the header itself
(it is plain JSON after an 8-byte little-endian length) so that it can check
every length and offset against the payload *before* trusting any of it, keep
the ``__metadata__`` map that ``safetensors.torch.load`` drops, and never
allocate more than the payload's own size. Nothing is ever unpickled.

Each refusal is a ``CodecError`` whose ``reason`` is one of ``REASONS``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import save as _np_save
from safetensors.torch import save as _st_save

from broker.errors import CodecError
from broker.limits import DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD

REASONS = (
    "oversize",  # payload larger than the size limit
    "not_safetensors",  # does not even look like a safetensors file
    "header_too_large",  # declared header length beyond the header limit
    "truncated",  # declared header or tensor data runs past the end of the payload
    "bad_header",  # header is not a JSON object of well-formed tensor entries
    "bad_offsets",  # tensor offsets overlap, leave gaps or disagree with shape x dtype
    "unknown_tensor",  # a tensor the model does not have
    "missing_tensor",  # a tensor of the model that the payload lacks
    "shape_mismatch",
    "dtype_mismatch",
    "non_finite",  # NaN or Inf in a floating tensor
    "missing_metadata",
    "bad_metadata",  # present but non-numeric, absurd or inconsistent
)

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAME_OF = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor must look like: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


Schema = Mapping[str, TensorSpec]


@dataclass(frozen=True)
class Payload:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise CodecError(
            f"dtype {dtype} is not supported on the wire", reason="dtype_mismatch"
        ) from None


def schema_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The schema a payload must match to stand for these tensors (a model's state dict)."""
    return {k: TensorSpec(dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """One safetensors payload holding ``tensors`` and the string map ``metadata``."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    plain = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    if any(t.dtype == torch.bfloat16 for t in plain.values()):  # numpy has no bfloat16
        return _st_save(plain, metadata=dict(metadata))
    # the same bytes as safetensors.torch.save (tests/test_codec.py), in a quarter of the
    # time: its torch path costs about 0.1 ms a call in bookkeeping, and every device
    # encodes an update a round, the aggregator a model and a checkpoint
    return _np_save({k: t.numpy() for k, t in plain.items()}, metadata=dict(metadata))


# below this a tensor is copied even when sharing is asked for: copying a few KB costs
# less than torch's overhead for a tensor over foreign memory
SHARE_MIN = 64 * 1024


FINITE_CHUNK = 1 << 16  # elements checked at a time when the sum is not finite


def decode(
    payload: bytes,
    *,
    schema: Schema | Callable[[dict[str, str]], Schema] | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_header: int = DEFAULT_MAX_HEADER,
    require_finite: bool = True,
    copy: bool = True,
) -> Payload:
    """Parse and validate a payload; raise ``CodecError`` with a specific reason.

    ``copy=False`` gives read-only tensors that share the payload's memory (aligned ones;
    others are copied): for a caller that only reads them, as the aggregator does when it
    admits an update, so that checking one costs no second copy of it.

    ``schema`` may be a function of the payload's metadata (which it may refuse), for
    payloads whose tensors depend on it (compressed updates: broker/compression.py)."""
    size = len(payload)
    if size > max_payload:
        raise CodecError(f"payload is {size} bytes, limit is {max_payload}", reason="oversize")
    if size < 8:
        raise CodecError(f"payload of {size} bytes is not safetensors", reason="not_safetensors")
    if size > 8 and payload[8:9] not in (b"{", b" "):
        raise CodecError(
            "payload does not start with a safetensors header", reason="not_safetensors"
        )
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > max_header:
        raise CodecError(
            f"declared header of {header_len} bytes exceeds the {max_header}-byte limit",
            reason="header_too_large",
        )
    if 8 + header_len > size:
        raise CodecError(
            f"declared header of {header_len} bytes runs past the {size}-byte payload",
            reason="truncated",
        )
    raw_header = bytes(payload[8 : 8 + header_len])
    if not raw_header.lstrip(b" ").startswith(b"{"):
        raise CodecError("header does not start with a JSON object", reason="not_safetensors")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"header is not valid JSON: {exc}", reason="bad_header") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object", reason="bad_header")

    metadata = _read_metadata(header.pop("__metadata__", None))
    data = memoryview(payload)[8 + header_len :]
    entries = _read_entries(header, len(data))
    if callable(schema):
        schema = schema(metadata)
    if schema is not None:
        _check_schema(entries, schema)

    base = None if copy or not len(data) else _shared(data, torch.uint8).data_ptr()
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        torch_dtype, itemsize = DTYPES[dtype]
        if end == begin:
            tensor = torch.empty(shape, dtype=torch_dtype)
        elif base is not None and end - begin >= SHARE_MIN and (base + begin) % itemsize == 0:
            tensor = _shared(data[begin:end], torch_dtype).reshape(shape)
        else:
            # one copy of exactly this tensor's bytes: never more than the payload holds
            tensor = torch.frombuffer(bytearray(data[begin:end]), dtype=torch_dtype).reshape(shape)
        if require_finite and tensor.is_floating_point() and not _finite(tensor):
            raise CodecError(f"tensor {name!r} holds NaN or Inf", reason="non_finite")
        tensors[name] = tensor
    return Payload(tensors=tensors, metadata=metadata)


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. The sum of its values is finite when they all are,
    unless finite values overflow it, which the exact check (in chunks) then settles;
    neither makes a temporary the size of the tensor (``isfinite`` on the whole would: a
    megabyte of bools per million parameters, on the heap, for every update)."""
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(torch.isfinite(tensor).all())
    values = tensor.numpy().reshape(-1)  # numpy: a third of torch's overhead
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(values.sum()):
            return True
    return all(
        np.isfinite(values[i : i + FINITE_CHUNK]).all() for i in range(0, values.size, FINITE_CHUNK)
    )


def _shared(data: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``data``'s memory (read-only: torch warns that it cannot enforce that,
    and our callers only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype)


def _read_metadata(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise CodecError("__metadata__ must map strings to strings", reason="bad_header")
    return dict(raw)


def _read_entries(header: dict, data_len: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CodecError(f"tensor entry {name!r} is malformed", reason="bad_header")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CodecError(
                f"tensor {name!r} has unsupported dtype {dtype!r}", reason="bad_header"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and math.prod(max(d, 1) for d in shape) < 2**63  # torch sizes/strides are int64
        ):
            raise CodecError(f"tensor {name!r} has an invalid shape {shape!r}", reason="bad_header")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CodecError(f"tensor {name!r} has invalid offsets", reason="bad_header")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CodecError(f"tensor {name!r} has offsets {offsets}", reason="bad_offsets")
        if end > data_len:
            raise CodecError(
                f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section",
                reason="truncated",
            )
        if (end - begin) != math.prod(shape) * DTYPES[dtype][1]:
            raise CodecError(
                f"tensor {name!r}: {end - begin} bytes do not hold {dtype}{shape}",
                reason="bad_offsets",
            )
        entries[name] = (dtype, tuple(shape), begin, end)
    # the data section must be tiled exactly: sorted, no overlap, no gap, nothing after
    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != cursor:
            kind = "overlap" if begin < cursor else "gap"
            raise CodecError(
                f"tensor {name!r} leaves an {kind} at byte {begin}", reason="bad_offsets"
            )
        cursor = end
    if cursor != data_len:
        raise CodecError(
            f"data section has {data_len - cursor} trailing bytes", reason="bad_offsets"
        )
    return entries


def _check_schema(entries: Mapping[str, tuple], schema: Schema) -> None:
    unknown = sorted(set(entries) - set(schema))
    if unknown:
        raise CodecError(f"unexpected tensors {unknown[:5]}", reason="unknown_tensor")
    missing = sorted(set(schema) - set(entries))
    if missing:
        raise CodecError(f"missing tensors {missing[:5]}", reason="missing_tensor")
    for name, spec in schema.items():
        dtype, shape = entries[name][0], entries[name][1]
        if dtype != spec.dtype:
            raise CodecError(
                f"tensor {name!r} is {dtype}, model has {spec.dtype}", reason="dtype_mismatch"
            )
        if tuple(shape) != tuple(spec.shape):
            raise CodecError(
                f"tensor {name!r} has shape {list(shape)}, model has {list(spec.shape)}",
                reason="shape_mismatch",
            )


def content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """SHA-256 over the metadata (canonical JSON, without ``signature``) and every tensor.

    Independent of how the safetensors file happens to be laid out, so that a
    signature or a model hash survives re-encoding.
    """
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != "signature"}
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        if t.requires_grad or not t.is_contiguous() or t.device.type != "cpu":
            t = t.detach().contiguous().cpu()
        h.update(json.dumps([name, dtype_name(t.dtype), list(t.shape)]).encode())
        if t.numel():  # hashed in place: no copy of the tensor's bytes
            h.update(_raw(t))
    return h.digest()


def _raw(t: torch.Tensor):
    """A contiguous CPU tensor's memory as a buffer (numpy's: no copy)."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; same bytes as int16
        t = t.view(torch.int16)
    return t.numpy()
