"""The messages of a secure-aggregation round (SecAgg+) and their parsers.

Every message is a safetensors payload like the rest of the wire: metadata strings
(structured fields as JSON) and, for the masked input only, one tensor. Every one is
signed: a device's with its device key (``broker/signing.py``), the aggregator's with
its model key. Device messages go on ``secagg/<device>``, the aggregator's on
``secagg`` (retained: the round's roster, then its unmasking request) and
``inbox/<device>`` (the shares addressed to that device); a device's receipt that
it sent its masked input goes on ``receipts/<device>`` (retained), which its
neighbours read straight from the broker, so the aggregator cannot hide it.

    kind     from        fields
    keys     device      c_pk, s_pk (X25519, base64), identity (its Ed25519 key, base64),
                         cert (the federation registry's signature of that key, base64)
    roster   aggregator  devices (the keys messages' metadata, device signatures kept),
                         degree, threshold, model_hash
    shares   device      shares {recipient: sealed b-share || s_sk-share}
    deliver  aggregator  sharers (who shared), shares {sender: sealed} for this device
    masked   device      tensor "masked" (int32 bits of the uint32 vector), metrics
    sent     device      (receipt; no field beyond the common ones)
    unmask   aggregator  survivors (whose masked input arrived)
    reveal   device      b {device: share}, s {device: share}

Common metadata: format, kind, round, session, federation, run_id, device_id (device
messages), signature. Everything here is hostile until parsed: sizes are bounded
and any malformed field raises ``CodecError`` (reason ``bad_metadata``,
``missing_metadata``, or the codec's own reasons).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from broker import codec
from broker.messages import parse_metrics
from broker.secagg.plan import MAX_DEVICES, SecurePlan, bad, parse_secure_plan

FORMAT = "fedmq-secagg/1"
KINDS = ("keys", "roster", "shares", "deliver", "masked", "sent", "unmask", "reveal")
DEVICE_KINDS = ("keys", "shares", "masked", "sent", "reveal")
MAX_NEIGHBOURS = 256  # a device's neighbours: 2*ceil(log2(n)) is 30 at 20,000 devices
MAX_SEALED = 512  # bytes of one sealed share pair (base64-decoded)
MAX_SMALL = 256 * 1024  # payload bytes of any message but roster and masked
MAX_ROSTER = 16 * 1024 * 1024
MASKED = "masked"
_SESSION = re.compile(r"^[0-9a-f]{32}$")
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Sign = Callable[[dict, dict], str]


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class SecureMessage:
    kind: str
    round: int
    session: str
    federation: str
    run_id: str
    device_id: str  # "" on the aggregator's messages
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def field(self, key: str) -> str:
        value = self.metadata.get(key)
        if value is None or value == "":
            raise bad(f"{self.kind} lacks {key!r}", reason="missing_metadata")
        return value

    def json_field(self, key: str, limit: int) -> object:
        text = self.field(key)
        if len(text) > limit:
            raise bad(f"{self.kind} field {key!r} is {len(text)} characters (limit {limit})")
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise bad(f"{self.kind} field {key!r} is not JSON") from None


def encode(
    kind: str,
    *,
    round_: int,
    session: str,
    federation: str,
    run_id: str,
    device_id: str = "",
    fields: Mapping[str, object] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    sign: Sign | None = None,
) -> bytes:
    """A signed message; ``fields`` values that are not strings travel as compact JSON."""
    meta = common_metadata(kind, round_, session, federation, run_id, device_id)
    for key, value in (fields or {}).items():
        meta[key] = value if isinstance(value, str) else _compact(value)
    tensors = dict(tensors or {})
    if sign is not None:
        meta["signature"] = sign(tensors, meta)
    return codec.encode(tensors, meta)


def encode_as(
    party, kind: str, fields: Mapping[str, object], tensors: Mapping | None = None
) -> bytes:
    """``encode`` for one side of a session: ``party`` has ``round``, ``session``,
    ``federation``, ``run_id``, ``sign`` and (a device) ``device_id``."""
    return encode(
        kind,
        round_=party.round,
        session=party.session,
        federation=party.federation,
        run_id=party.run_id,
        device_id=getattr(party, "device_id", ""),
        fields=fields,
        tensors=tensors,
        sign=party.sign,
    )


def common_metadata(
    kind: str, round_: int, session: str, federation: str, run_id: str, device_id: str = ""
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "kind": kind,
        "round": str(round_),
        "session": session,
        "federation": federation,
        "run_id": run_id,
    }
    if device_id:
        meta["device_id"] = device_id
    return meta


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def decode(payload: bytes, *, max_payload: int, length: int | None = None) -> SecureMessage:
    """Parse the common part of any message; ``length``: the masked vector's size."""
    schema = None
    if length is not None:
        schema = {MASKED: codec.TensorSpec(dtype="I32", shape=(length,))}
    p = codec.decode(payload, max_payload=max_payload, schema=None)
    meta = p.metadata
    if meta.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}", reason="bad_metadata")
    kind = meta.get("kind", "")
    if kind not in KINDS:
        raise bad(f"unknown kind {kind[:20]!r}")
    if kind == "masked":
        if schema is None:
            raise bad("a masked input where none is expected")
        codec.decode(payload, max_payload=max_payload, schema=schema)  # names, shape, dtype
    elif p.tensors:
        raise bad(f"a {kind} message carries tensors")
    round_text = meta.get("round", "")
    if not (round_text.isascii() and round_text.isdigit() and 0 < len(round_text) <= 12):
        raise bad("round is not a decimal integer")
    session = meta.get("session", "")
    if not _SESSION.match(session):
        raise bad("session must be 32 hex digits")
    device_id = meta.get("device_id", "")
    if kind in DEVICE_KINDS and not _DEVICE.match(device_id):
        raise bad("device_id is missing or malformed", reason="missing_metadata")
    return SecureMessage(
        kind=kind,
        round=int(round_text),
        session=session,
        federation=meta.get("federation", ""),
        run_id=meta.get("run_id", ""),
        device_id=device_id,
        metadata=meta,
        tensors=p.tensors,
    )


# ----------------------------------------------------------------------------- fields


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str, *, size: int | None = None, limit: int = MAX_SEALED) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * limit:
        raise bad(f"{what} is not base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{what} is not base64") from None
    if (size is not None and len(data) != size) or len(data) > limit:
        raise bad(f"{what} has {len(data)} bytes")
    return data


def device_map(raw: object, what: str, limit: int = MAX_NEIGHBOURS) -> dict[str, str]:
    """A JSON object of device id -> string, bounded."""
    if not isinstance(raw, dict) or len(raw) > limit:
        raise bad(f"{what} must be an object of at most {limit} devices")
    for key, value in raw.items():
        if not isinstance(key, str) or not _DEVICE.match(key) or not isinstance(value, str):
            raise bad(f"{what} maps a malformed device id or value")
    return raw


def device_list(raw: object, what: str, limit: int = MAX_DEVICES) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise bad(f"{what} must be a list of at most {limit} device ids")
    if not all(isinstance(d, str) and _DEVICE.match(d) for d in raw) or len(set(raw)) != len(raw):
        raise bad(f"{what} holds a malformed or repeated device id")
    return tuple(raw)


@dataclass(frozen=True)
class Keys:
    device_id: str
    c_pk: bytes
    s_pk: bytes
    identity: bytes  # raw Ed25519 public key
    cert: bytes  # the registry's signature over it (b"" without a registry)
    b_hash: str  # the commitment to its self-mask seed (protocol.seed_commitment)
    metadata: dict[str, str]  # as signed by the device (kept for the roster)


def parse_keys(msg: SecureMessage) -> Keys:
    return Keys(
        device_id=msg.device_id,
        c_pk=unb64(msg.field("c_pk"), "c_pk", size=32),
        s_pk=unb64(msg.field("s_pk"), "s_pk", size=32),
        identity=unb64(msg.field("identity"), "identity", size=32),
        cert=unb64(msg.metadata.get("cert", ""), "cert", limit=256),
        b_hash=_hex64(msg.field("b_hash"), "b_hash"),
        metadata=dict(msg.metadata),
    )


def _hex64(text: str, what: str) -> str:
    if not re.match(r"^[0-9a-f]{64}$", text):
        raise bad(f"{what} must be 64 hex digits")
    return text


def masked_vector(msg: SecureMessage):  # -> numpy uint32 array
    return msg.tensors[MASKED].numpy().view("uint32")


def masked_tensor(vector) -> torch.Tensor:  # numpy uint32 -> int32 tensor of the same bits
    return torch.from_numpy(vector.view("int32"))


def metrics_of(msg: SecureMessage) -> dict[str, float]:
    return parse_metrics(msg.metadata)


def same(msg: SecureMessage, kind: str, round_: int, session: str) -> str | None:
    """Why ``msg`` is not a ``kind`` message of this round's session, or None."""
    if msg.kind != kind:
        return f"expected {kind}, got {msg.kind}"
    if msg.round != round_ or msg.session != session:
        return "for another round or session"
    return None


def roster_entries(msg: SecureMessage) -> list[dict[str, str]]:
    raw = msg.json_field("devices", MAX_ROSTER)
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_DEVICES:
        raise bad("roster devices must be a non-empty list")
    for entry in raw:
        if not isinstance(entry, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) < 4096 for k, v in entry.items()
        ):
            raise bad("roster entries must be string maps")
    return raw


def small_int(msg: SecureMessage, key: str, low: int, high: int) -> int:
    text = msg.field(key)
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or not low <= int(text) <= high:
        raise bad(f"{msg.kind} field {key!r} must be an integer in [{low}, {high}]")
    return int(text)


def ids_field(msg: SecureMessage, key: str) -> tuple[str, ...]:
    return device_list(msg.json_field(key, 64 * MAX_DEVICES + 16), f"{msg.kind} {key}")


def shares_field(msg: SecureMessage, key: str = "shares") -> dict[str, bytes]:
    raw = device_map(msg.json_field(key, 2 * MAX_SEALED * MAX_NEIGHBOURS), f"{msg.kind} {key}")
    return {d: unb64(v, f"{key}[{d}]") for d, v in raw.items()}


def sorted_ids(ids: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(ids))


__all__ = ["SecurePlan", "parse_secure_plan", "bad", "MAX_DEVICES"]
