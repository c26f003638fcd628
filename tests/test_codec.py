"""The strict safetensors codec and the two wire messages: round trips and every refusal.

Malformed payloads are built by hand (struct + json) from a valid one, byte by byte, so the
tests do not depend on what the safetensors library is willing to write.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from broker import codec, messages
from broker.errors import CodecError
from broker.task import ModelSpec, TaskSpec, TrainSpec

# -- building payloads by hand ----------------------------------------------------------------


def split(payload: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join(header: dict | bytes | str, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    raw = (
        header
        if isinstance(header, bytes)
        else (header.encode() if isinstance(header, str) else json.dumps(header).encode())
    )
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


SCHEMA = codec.schema_of(tiny_model().state_dict())
BASE_HASH = "0f" * 32
UPDATE_META = dict(
    round_=2, device_id="bob", num_samples=5, base_hash=BASE_HASH, metrics={"train_loss": 0.25}
)


def update_payload(tensors: dict[str, torch.Tensor] | None = None, **overrides) -> bytes:
    return messages.encode_update(
        state() if tensors is None else tensors,
        **{
            **UPDATE_META,
            **overrides,
        },
    )


def with_header(payload: bytes, edit: Callable[[dict], None]) -> bytes:
    header, data = split(payload)
    edit(header)
    return join(header, data)


def with_metadata(payload: bytes, **changes: str | None) -> bytes:
    """Rewrite metadata values by hand; None deletes the key."""

    def edit(header: dict) -> None:
        for key, value in changes.items():
            if value is None:
                header["__metadata__"].pop(key, None)
            else:
                header["__metadata__"][key] = value

    return with_header(payload, edit)


def entry_span(payload: bytes, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` in the payload."""
    header, data = split(payload)
    begin, end = header[name]["data_offsets"]
    start = len(payload) - len(data)
    return start + begin, start + end


def overwrite(payload: bytes, at: int, blob: bytes) -> bytes:
    return payload[:at] + blob + payload[at + len(blob) :]


F32_PAIR = struct.pack("<2f", 1.0, 2.0)


def two_f32(**b_entry) -> bytes:
    """Two F32[2] tensors a, b back to back; b's entry fields overridden by ``b_entry``."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    header["b"].update(b_entry)
    return join(header, F32_PAIR * 2)


def empty_b(shape: list) -> bytes:
    """F32[2] ``a`` followed by an empty tensor ``b`` of ``shape``: consistent offsets."""
    return join(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": shape, "data_offsets": [8, 8]},
        },
        F32_PAIR,
    )


# -- round trips -------------------------------------------------------------------------------


def test_round_trip_every_wire_dtype_and_metadata():
    tensors = {
        "f64": torch.tensor([[1.5, -2.25], [1e-300, 3e300]], dtype=torch.float64),
        "f32": torch.randn(3, 4),
        "f16": torch.tensor([0.5, -65504.0, 6e-5], dtype=torch.float16),
        "bf16": torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16),
        "i64_buffer": torch.tensor(2**62 + 1, dtype=torch.int64),  # exact, not via float
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-7, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(4.0),
    }
    assert {codec.dtype_name(t.dtype) for t in tensors.values()} == set(codec.DTYPES)
    metadata = {"round": "7", "note": "ünïcödé ✓", "blank": "", "json": '{"a": [1, 2]}'}
    decoded = codec.decode(codec.encode(tensors, metadata))
    assert decoded.metadata == metadata
    assert set(decoded.tensors) == set(tensors)
    for name, original in tensors.items():
        got = decoded.tensors[name]
        assert got.dtype == original.dtype, name
        assert got.shape == original.shape, name
        assert torch.equal(got, original), name
    assert int(decoded.tensors["i64_buffer"]) == 2**62 + 1


def test_encode_writes_what_safetensors_torch_save_writes():
    """encode goes through safetensors' numpy writer (bfloat16 excepted): what it writes
    must be the library's torch writer's, for every wire dtype, name order and size."""
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(3)
    samples = [
        {"w": torch.randn(64, 64, generator=gen), "b": torch.zeros(64), "n": torch.tensor(3)},
        {"z": torch.zeros(0, 5), "a": torch.tensor([True, False]), "m": torch.ones(2, 3, 4)},
    ]
    for i, dtype in enumerate(
        (torch.float64, torch.float16, torch.int32, torch.int16, torch.int8, torch.uint8)
    ):
        shape = torch.randint(1, 9, (1 + i % 3,), generator=gen).tolist()
        samples.append({f"t{j}": torch.ones(shape).to(dtype) * j for j in range(i + 1)})
    samples.append({"bf": torch.randn(5).to(torch.bfloat16), "f": torch.randn(3)})  # fallback
    for tensors in samples:
        metadata = {"round": "7", "note": "ünïcödé"}
        ours, theirs = codec.encode(tensors, metadata), save(tensors, metadata=metadata)
        # the library writes the metadata map in hash order, different from call to call
        assert len(ours) == len(theirs)
        assert _header(ours) == _header(theirs)
        assert ours[8 + _header_len(ours) :] == theirs[8 + _header_len(theirs) :]


def _header_len(payload: bytes) -> int:
    return struct.unpack("<Q", payload[:8])[0]


def _header(payload: bytes) -> dict:
    return json.loads(payload[8 : 8 + _header_len(payload)])


def test_round_trip_model_state_dict_against_its_schema():
    tensors = state()
    decoded = codec.decode(codec.encode(tensors, {"k": "v"}), schema=SCHEMA)
    assert decoded.tensors["1.num_batches_tracked"].dtype == torch.int64
    for name, t in tensors.items():
        assert torch.equal(decoded.tensors[name], t)
    model = tiny_model()
    model.load_state_dict(decoded.tensors)  # fits the model exactly


def test_decoded_tensors_own_their_memory():
    payload = codec.encode({"w": torch.ones(4)}, {})
    decoded = codec.decode(payload)
    decoded.tensors["w"] += 1  # writable: frombuffer over a private copy
    assert torch.equal(codec.decode(payload).tensors["w"], torch.ones(4))


def test_decoding_without_a_copy_shares_the_payload_where_it_is_aligned():
    big = codec.SHARE_MIN // 4  # elements: smaller tensors are copied, which costs less
    tensors = {
        "a": torch.arange(big, dtype=torch.float32),
        "b": torch.arange(big, dtype=torch.int64),
    }
    payload = codec.encode(tensors, {})
    shared = codec.decode(payload, copy=False).tensors
    start = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    for name, value in tensors.items():
        assert torch.equal(shared[name], value)
        assert start <= shared[name].data_ptr() < start + len(payload)  # no copy
    # a hostile header can push the data off alignment: then it is copied, still exact
    header = {"w": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4 * big]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((-(len(raw) + 8)) % 8 + 1)  # data starts one byte past 8-alignment
    odd = struct.pack("<Q", len(raw)) + raw + tensors["a"].numpy().tobytes()
    w = codec.decode(odd, copy=False).tensors["w"]
    assert torch.equal(w, tensors["a"])
    odd_start = np.frombuffer(odd, dtype=np.uint8).ctypes.data
    assert (odd_start + 8 + len(raw)) % 4 != 0  # the fault really is there
    assert not odd_start <= w.data_ptr() < odd_start + len(odd)


def test_hand_built_payload_decodes():
    payload = join(
        {"__metadata__": {"k": "v"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        F32_PAIR,
    )
    decoded = codec.decode(payload)
    assert decoded.metadata == {"k": "v"}
    assert torch.equal(decoded.tensors["w"], torch.tensor([1.0, 2.0]))


def test_plain_safetensors_reads_our_payload_with_metadata(tmp_path):
    """The contract: anyone with the safetensors library can read a model off the broker."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(update_payload())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["device_id"] == "bob"
        assert torch.equal(f.get_tensor("0.weight"), state()["0.weight"])


def test_encode_refuses_non_string_metadata():
    with pytest.raises(TypeError):
        codec.encode({"w": torch.ones(1)}, {"round": 3})


def test_update_message_round_trip():
    msg = messages.decode_update(update_payload(), schema=SCHEMA)
    assert (msg.round, msg.device_id, msg.num_samples, msg.base_hash) == (2, "bob", 5, BASE_HASH)
    assert msg.metrics == {"train_loss": 0.25}
    assert msg.metadata["format"] == messages.FORMAT
    for name, t in state().items():
        assert torch.equal(msg.tensors[name], t)


TASK = TaskSpec(model=ModelSpec("linear", {"in_features": 3}), train=TrainSpec(lr=0.5), seed=4)


def test_model_message_round_trip():
    tensors = state()
    payload, digest = messages.encode_model(tensors, 4, TASK, final=True)
    msg = messages.decode_model(payload)
    assert (msg.round, msg.model_hash, msg.final) == (4, digest, True)
    assert msg.task == TASK and msg.task_json == TASK.to_json()
    assert digest == messages.model_hash(tensors, 4, TASK.to_json())
    assert messages.decode_model(messages.encode_model(tensors, 4, TASK)[0]).final is False


# -- refusals: one case per reason (and the messages-level ones), exact reason asserted -----


@dataclass(frozen=True)
class Refusal:
    id: str
    reason: str
    make: Callable[[], bytes]
    decode: Callable[[bytes], object] = codec.decode


def _update(payload: bytes, **kw):
    return messages.decode_update(payload, schema=SCHEMA, **kw)


def _model_payload(**meta_changes: str | None) -> bytes:
    return with_metadata(messages.encode_model(state(), 3, TASK)[0], **meta_changes)


def _nan_in(name: str, blob: bytes) -> Callable[[], bytes]:
    def make() -> bytes:
        payload = codec.encode(
            {
                "f32": torch.ones(3),
                "f64": torch.ones(2, dtype=torch.float64),
                "f16": torch.ones(2, dtype=torch.float16),
                "bf16": torch.ones(2, dtype=torch.bfloat16),
            },
            {},
        )
        begin, _ = entry_span(payload, name)
        return overwrite(payload, begin, blob)

    return make


def _drop_tensor(name: str) -> bytes:
    """Remove one tensor: its entry and its bytes, and shift the offsets of those after it."""
    header, data = split(update_payload())
    begin, end = header.pop(name)["data_offsets"]
    for key, entry in header.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    return join(header, data[:begin] + data[end:])


def _rename(header: dict, old: str, new: str) -> None:
    header[new] = header.pop(old)


def _set(name: str, **fields) -> Callable[[dict], None]:
    return lambda header: header[name].update(fields)


VALID = update_payload()
HEADER_BYTES = struct.unpack("<Q", VALID[:8])[0]

REFUSALS = [
    # oversize
    Refusal(
        "over max_payload",
        "oversize",
        lambda: VALID,
        lambda p: codec.decode(p, max_payload=len(p) - 1),
    ),
    Refusal(
        "update over max_payload",
        "oversize",
        lambda: VALID,
        lambda p: messages.decode_update(p, max_payload=len(p) - 1),
    ),
    # not_safetensors
    Refusal("json text, 5 bytes", "not_safetensors", lambda: b"[1,2]"),
    Refusal("empty payload", "not_safetensors", lambda: b""),
    Refusal("header not starting with {", "not_safetensors", lambda: join(b"abcd")),
    Refusal("header a json array", "not_safetensors", lambda: join(b"[1, 2]")),
    # header_too_large
    Refusal(
        "header over max_header",
        "header_too_large",
        lambda: VALID,
        lambda p: codec.decode(p, max_header=HEADER_BYTES - 1),
    ),
    Refusal(
        "header length 2**64-1",
        "header_too_large",
        lambda: struct.pack("<Q", 2**64 - 1) + VALID[8:],
    ),
    # truncated
    Refusal(
        "header length past the end",
        "truncated",
        lambda: struct.pack("<Q", len(VALID) - 8 + 1) + VALID[8:],
    ),
    Refusal("payload cut inside the header", "truncated", lambda: VALID[: 8 + HEADER_BYTES // 2]),
    Refusal("tensor data cut short", "truncated", lambda: VALID[:-1]),
    Refusal("offsets end past the data", "truncated", lambda: two_f32(data_offsets=[8, 24])),
    # bad_header
    Refusal("header not json", "bad_header", lambda: join(b"{not json}")),
    Refusal("header not utf-8", "bad_header", lambda: join(b'{"\xff": 1}')),
    Refusal("entry not an object", "bad_header", lambda: join({"w": [0, 8]}, F32_PAIR)),
    Refusal(
        "entry missing data_offsets",
        "bad_header",
        lambda: join({"w": {"dtype": "F32", "shape": [2]}}, F32_PAIR),
    ),
    Refusal("entry with an extra key", "bad_header", lambda: two_f32(extra=1)),
    Refusal("unknown dtype", "bad_header", lambda: two_f32(dtype="F8_E4M3")),
    Refusal("dtype lowercase", "bad_header", lambda: two_f32(dtype="f32")),
    Refusal("dtype not a string (list)", "bad_header", lambda: two_f32(dtype=["F32"])),
    Refusal("dtype not a string (object)", "bad_header", lambda: two_f32(dtype={"F32": 1})),
    Refusal("negative dimension", "bad_header", lambda: two_f32(shape=[-2])),
    Refusal("float dimension", "bad_header", lambda: two_f32(shape=[2.0])),
    Refusal("bool dimension", "bad_header", lambda: two_f32(shape=[True, 2])),
    Refusal("shape not a list", "bad_header", lambda: two_f32(shape=2)),
    Refusal("more than 8 dimensions", "bad_header", lambda: two_f32(shape=[1] * 8 + [2])),
    Refusal("offsets of three numbers", "bad_header", lambda: two_f32(data_offsets=[8, 16, 16])),
    Refusal("float offsets", "bad_header", lambda: two_f32(data_offsets=[8.0, 16])),
    Refusal("offsets not a list", "bad_header", lambda: two_f32(data_offsets="8:16")),
    Refusal("metadata value not a string", "bad_header", lambda: with_metadata(VALID, round=3)),
    Refusal(
        "metadata not an object",
        "bad_header",
        lambda: with_header(VALID, lambda h: h.update(__metadata__=["round", "2"])),
    ),
    Refusal(
        "deeply nested header json",
        "bad_header",
        lambda: join('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ),
    Refusal(
        "empty tensor with dims overflowing int64",
        "bad_header",
        lambda: empty_b([0, 2**64]),
    ),
    Refusal(
        "empty tensor whose strides overflow int64",
        "bad_header",
        lambda: empty_b([0, 2**62, 2**62]),
    ),
    # bad_offsets
    Refusal(
        "overlapping tensors",
        "bad_offsets",
        lambda: join(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            F32_PAIR * 2,
        )[:-4],
    ),
    Refusal(
        "gap between tensors",
        "bad_offsets",
        lambda: join(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            F32_PAIR * 2,
        ),
    ),
    Refusal(
        "gap at the start",
        "bad_offsets",
        lambda: join({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32_PAIR),
    ),
    Refusal("trailing bytes", "bad_offsets", lambda: VALID + b"\x00" * 4),
    Refusal("size disagrees with shape x dtype", "bad_offsets", lambda: two_f32(shape=[3])),
    Refusal("size disagrees with dtype width", "bad_offsets", lambda: two_f32(dtype="F64")),
    Refusal("begin after end", "bad_offsets", lambda: two_f32(data_offsets=[16, 8])),
    Refusal("negative begin", "bad_offsets", lambda: two_f32(data_offsets=[-8, 0])),
    # against the model's schema
    Refusal(
        "unknown tensor",
        "unknown_tensor",
        lambda: with_header(VALID, lambda h: _rename(h, "0.bias", "0.bias_extra")),
        _update,
    ),
    Refusal("missing tensor", "missing_tensor", lambda: _drop_tensor("0.bias"), _update),
    Refusal(
        "shape mismatch (transposed)",
        "shape_mismatch",
        lambda: with_header(VALID, _set("0.weight", shape=[3, 2])),
        _update,
    ),
    Refusal(
        "dtype mismatch (F32 read as I32)",
        "dtype_mismatch",
        lambda: with_header(VALID, _set("0.weight", dtype="I32")),
        _update,
    ),
    Refusal(
        "dtype mismatch (I64 buffer as F64)",
        "dtype_mismatch",
        lambda: with_header(VALID, _set("1.num_batches_tracked", dtype="F64")),
        _update,
    ),
    # non_finite
    Refusal("NaN in F32", "non_finite", _nan_in("f32", struct.pack("<f", math.nan))),
    Refusal("+Inf in F32", "non_finite", _nan_in("f32", struct.pack("<f", math.inf))),
    Refusal("-Inf in F64", "non_finite", _nan_in("f64", struct.pack("<d", -math.inf))),
    Refusal("Inf in F16", "non_finite", _nan_in("f16", b"\x00\x7c")),
    Refusal("NaN in BF16", "non_finite", _nan_in("bf16", b"\xc0\x7f")),
    Refusal(
        "NaN in an update",
        "non_finite",
        lambda: overwrite(VALID, entry_span(VALID, "0.bias")[0], struct.pack("<f", math.nan)),
        _update,
    ),
    # missing_metadata (messages level)
    *[
        Refusal(
            f"update without {key}",
            "missing_metadata",
            lambda key=key: with_metadata(VALID, **{key: None}),
            _update,
        )
        for key in ("round", "device_id", "num_samples", "base_hash", "metrics")
    ],
    Refusal(
        "update with empty device_id",
        "missing_metadata",
        lambda: with_metadata(VALID, device_id=""),
        _update,
    ),
    Refusal(
        "update without any metadata",
        "missing_metadata",
        lambda: codec.encode(state(), {}),
        _update,
    ),
    Refusal(
        "model without task",
        "missing_metadata",
        lambda: _model_payload(task=None),
        messages.decode_model,
    ),
    Refusal(
        "model without model_hash",
        "missing_metadata",
        lambda: _model_payload(model_hash=None),
        messages.decode_model,
    ),
    # bad_metadata (messages level)
    Refusal(
        "num_samples not numeric",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="five"),
        _update,
    ),
    Refusal(
        "num_samples fractional",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="1.5"),
        _update,
    ),
    Refusal(
        "num_samples non-ascii digit",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="\u0665"),
        _update,
    ),
    Refusal(
        "num_samples 0", "bad_metadata", lambda: with_metadata(VALID, num_samples="0"), _update
    ),
    Refusal(
        "num_samples negative",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="-3"),
        _update,
    ),
    Refusal(
        "num_samples beyond max_samples",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="101"),
        lambda p: _update(p, max_samples=100),
    ),
    Refusal(
        "num_samples absurdly long",
        "bad_metadata",
        lambda: with_metadata(VALID, num_samples="9" * 40),
        _update,
    ),
    Refusal("round 0", "bad_metadata", lambda: with_metadata(VALID, round="0"), _update),
    Refusal(
        "metrics not json",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics="{loss: 1}"),
        _update,
    ),
    Refusal(
        "metrics not an object",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics="[0.5]"),
        _update,
    ),
    Refusal(
        "metrics NaN",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": NaN}'),
        _update,
    ),
    Refusal(
        "metrics Infinity",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": Infinity}'),
        _update,
    ),
    Refusal(
        "metrics 1e999",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": 1e999}'),
        _update,
    ),
    Refusal(
        "metrics bool",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": true}'),
        _update,
    ),
    Refusal(
        "metrics string",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": "0.5"}'),
        _update,
    ),
    Refusal(
        "metrics int too large for a float",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics='{"train_loss": ' + "9" * 400 + "}"),
        _update,
    ),
    Refusal(
        "metrics deeply nested",
        "bad_metadata",
        lambda: with_metadata(VALID, metrics="[" * 100_000 + "]" * 100_000),
        _update,
    ),
    Refusal(
        "model_hash mismatch (edited)",
        "bad_metadata",
        lambda: _model_payload(model_hash="00" * 32),
        messages.decode_model,
    ),
    Refusal(
        "model_hash mismatch (tensor byte changed)",
        "bad_metadata",
        lambda: (lambda p: overwrite(p, entry_span(p, "0.bias")[0], b"\x01"))(_model_payload()),
        messages.decode_model,
    ),
    Refusal(
        "model round 0", "bad_metadata", lambda: _model_payload(round="0"), messages.decode_model
    ),
    Refusal(
        "task not json",
        "bad_metadata",
        lambda: _model_payload(task="{arch: linear"),
        messages.decode_model,
    ),
    Refusal(
        "task json not an object",
        "bad_metadata",
        lambda: _model_payload(task="[1, 2]"),
        messages.decode_model,
    ),
    Refusal(
        "task without arch",
        "bad_metadata",
        lambda: _model_payload(task='{"model": {}}'),
        messages.decode_model,
    ),
    Refusal(
        "task with a bad lr",
        "bad_metadata",
        lambda: _model_payload(task='{"model": {"arch": "linear"}, "train": {"lr": -1}}'),
        messages.decode_model,
    ),
    Refusal(
        "task with an unknown section",
        "bad_metadata",
        lambda: _model_payload(task='{"model": {"arch": "linear"}, "extra": {}}'),
        messages.decode_model,
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_refusal_reason(case: Refusal):
    payload = case.make()
    with pytest.raises(CodecError) as info:
        case.decode(payload)
    assert info.value.reason == case.reason, str(info.value)
    assert info.value.reason in codec.REASONS
    assert str(info.value)  # a message a person can read


def test_every_reason_has_a_refusal_case():
    assert {c.reason for c in REFUSALS} == set(codec.REASONS)


def test_the_valid_payload_itself_is_accepted_by_every_decoder_used_above():
    """Guards the cases: each refusal comes from the mutation, not from a broken base."""
    codec.decode(VALID)
    codec.decode(VALID, max_payload=len(VALID), max_header=HEADER_BYTES)
    _update(VALID)
    _update(with_metadata(VALID, num_samples="100"), max_samples=100)
    _update(with_metadata(VALID, metrics='{"a": 1, "b": -2.5e300}'))
    messages.decode_model(_model_payload())
    codec.decode(two_f32())
    codec.decode(_nan_in("f32", struct.pack("<f", 1.0))())


def test_non_finite_allowed_when_not_required():
    payload = _nan_in("f32", struct.pack("<f", math.nan))()
    decoded = codec.decode(payload, require_finite=False)
    assert math.isnan(float(decoded.tensors["f32"][0]))


def test_integer_tensors_are_not_checked_for_nan_patterns():
    payload = codec.encode({"i": torch.tensor([0x7FC00000], dtype=torch.int32)}, {})
    assert int(codec.decode(payload).tensors["i"][0]) == 0x7FC00000


# -- allocation: never more than the payload's own size -------------------------------------


def _peak_while(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
    except CodecError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.fixture
def torch_allocations(monkeypatch):
    """Element counts of every tensor the codec asks torch for (tracemalloc cannot see torch)."""
    sizes: list[int] = []
    real_empty, real_frombuffer = torch.empty, torch.frombuffer

    def empty(*args, **kwargs):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        sizes.append(math.prod(shape))
        return real_empty(*args, **kwargs)

    def frombuffer(buffer, *args, **kwargs):
        sizes.append(len(memoryview(buffer).cast("B")))
        return real_frombuffer(buffer, *args, **kwargs)

    monkeypatch.setattr(codec.torch, "empty", empty)
    monkeypatch.setattr(codec.torch, "frombuffer", frombuffer)
    return sizes


TEN_GB_SHAPE = [50_000, 50_000]  # F32: 10 GB


def _with_huge_entry(data_offsets: Callable[[int], list[int]], extra: bytes) -> bytes:
    pad = torch.arange(16_384, dtype=torch.float32)  # 64 KiB of real data
    header, data = split(codec.encode({"pad": pad}, {}))
    n = len(data)
    header["huge"] = {"dtype": "F32", "shape": TEN_GB_SHAPE, "data_offsets": data_offsets(n)}
    return join(header, data + extra)


@pytest.mark.parametrize(
    ("offsets", "extra", "reason"),
    [
        (lambda n: [n, n + 8], b"\x00" * 8, "bad_offsets"),  # 10 GB shape over 8 bytes
        (lambda n: [n, n + 4 * 50_000 * 50_000], b"\x00" * 8, "truncated"),  # offsets agree
    ],
    ids=["small offsets", "offsets past the end"],
)
def test_ten_gb_declaration_is_refused_before_allocating(offsets, extra, reason, torch_allocations):
    payload = _with_huge_entry(offsets, extra)
    with pytest.raises(CodecError) as info:
        codec.decode(payload)
    assert info.value.reason == reason
    peak = _peak_while(lambda: codec.decode(payload))
    assert peak < 3 * len(payload), f"peak {peak} bytes for a {len(payload)}-byte payload"
    assert torch_allocations == []  # refused before any tensor was made


def test_decoding_a_valid_payload_costs_about_one_copy(torch_allocations):
    """Positive control: the measurement does see the decoder's copy of the tensor bytes."""
    payload = codec.encode({"w": torch.randn(256 * 1024)}, {})  # 1 MiB
    peak = _peak_while(lambda: codec.decode(payload))
    assert len(payload) * 0.9 < peak < 2 * len(payload)
    assert sum(torch_allocations) <= 2 * len(payload)


def test_empty_tensor_with_large_dims_allocates_nothing(torch_allocations):
    payload = empty_b([0, 10**12])
    decoded = codec.decode(payload)
    assert decoded.tensors["b"].shape == (0, 10**12)
    assert decoded.tensors["b"].numel() == 0
    # what torch was asked for: the 8 bytes of ``a`` and zero elements for ``b``
    assert sorted(torch_allocations) == [0, 8], torch_allocations
    torch_allocations.clear()
    peak = _peak_while(lambda: codec.decode(payload))
    assert peak < 64 * 1024, f"peak {peak} bytes decoding a {len(payload)}-byte payload"
    assert sorted(torch_allocations) == [0, 8], torch_allocations


# -- content digest ----------------------------------------------------------------------------


def test_content_digest_ignores_signature():
    tensors, meta = state(), {"round": "3", "task": "{}"}
    plain = codec.content_digest(tensors, meta)
    assert codec.content_digest(tensors, {**meta, "signature": "abc"}) == plain
    assert codec.content_digest(tensors, {**meta, "signature": "xyz"}) == plain
    assert codec.content_digest(tensors, {**meta, "round": "4"}) != plain
    assert codec.content_digest(tensors, {**meta, "extra": ""}) != plain


def test_content_digest_changes_with_any_tensor_byte():
    tensors = {
        "w": torch.randn(2, 3),
        "n": torch.tensor(5, dtype=torch.int64),
        "h": torch.randn(2).to(torch.bfloat16),
    }
    meta = {"round": "1"}
    seen = {codec.content_digest(tensors, meta)}
    flips = 0
    for name, t in tensors.items():
        raw = t.reshape(-1).view(torch.uint8)
        for i in range(raw.numel()):
            changed = {k: v.clone() for k, v in tensors.items()}
            changed[name].reshape(-1).view(torch.uint8)[i] ^= 0x01
            seen.add(codec.content_digest(changed, meta))
            flips += 1
    assert flips == 2 * 3 * 4 + 8 + 2 * 2
    assert len(seen) == flips + 1  # every single-bit change gives a new digest


def test_content_digest_covers_names_shapes_and_dtypes():
    w = torch.arange(6, dtype=torch.float32)
    base = codec.content_digest({"w": w.reshape(2, 3)}, {})
    assert codec.content_digest({"w": w.reshape(3, 2)}, {}) != base
    assert codec.content_digest({"v": w.reshape(2, 3)}, {}) != base
    assert codec.content_digest({"w": w.reshape(2, 3).view(torch.int32)}, {}) != base
    assert codec.content_digest({"w": w.reshape(3, 2).t()}, {}) != base  # same shape, transposed
    # independent of memory layout: a strided view digests like its contiguous copy
    strided = torch.arange(12, dtype=torch.float32).reshape(2, 6)[:, ::2]
    assert not strided.is_contiguous()
    assert codec.content_digest({"w": strided}, {}) == codec.content_digest(
        {"w": strided.contiguous()}, {}
    )


def test_content_digest_survives_re_encoding():
    tensors, meta = state(), {"round": "3", "signature": "s"}
    decoded = codec.decode(codec.encode(tensors, meta))
    assert codec.content_digest(decoded.tensors, decoded.metadata) == codec.content_digest(
        tensors, meta
    )
