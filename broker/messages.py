"""The two safetensors messages of the wire contract and their required metadata.

``model`` (aggregator, retained)::

    format      "fedmq/1"
    round       decimal integer >= 1
    task        the task spec as canonical JSON
    model_hash  hex SHA-256 of the tensors, round, task, federation and run (see ``model_hash``)
    federation  the federation's name
    run_id      the run's random id, fixed when the run is created (kept on --resume)
    final       "1" on the last model of a finished run (optional)
    plan        JSON object, the strategy's word to the devices for this round (optional):
                ``selected`` (device ids; absent: every device trains) and ``train``
                (extra training settings, e.g. ``{"proximal_mu": 0.01}``; a device refuses
                a setting it does not know)
    signature   Ed25519 signature of the aggregator (optional, see broker/signing.py)

``updates/<device_id>`` (device)::

    format       "fedmq/1"
    round        the round it was trained for
    device_id    must equal the topic's device id
    num_samples  decimal integer in [1, max_samples]
    base_hash    the model_hash of the global model it was trained from
    federation   copied from the model it was trained from
    run_id       copied from the model it was trained from
    metrics      JSON object of finite numbers (train_loss, eval_loss, eval_accuracy, ...),
                 at most MAX_METRICS names of at most MAX_METRIC_NAME characters
    encoding     how the tensors are compressed (only with the task's [compression]):
                 ``Compression.label``, e.g. "int8/channel" or "topk/0.01"
    partial      (a site's update only, ``aggregator/upstream.py``) JSON
                 ``{"devices": n, "site_federation": name}``: the update is the FedAvg of
                 n devices of that site, ``num_samples`` their total; informational (the
                 weight is ``num_samples``), signed like the rest
    signature    Ed25519 signature of the device (optional, see broker/signing.py)

An update carries the device's full locally trained weights (not a delta), unless
the task has a ``[compression]`` table: then it carries the delta from the model it
trained from, encoded as broker/compression.py says, and must name that encoding.
The signature covers the tensors as sent, and every metadata key but itself, so it
binds the update to its federation and run: the aggregator refuses one from
elsewhere (``wrong_run``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from broker.codec import Payload, Schema, content_digest, decode, encode
from broker.compression import check as check_compressed
from broker.compression import wire_schema as compressed_schema
from broker.compression_settings import Compression
from broker.errors import CodecError
from broker.secagg.plan import SecurePlan, parse_secure_plan
from broker.task import TaskSpec

FORMAT = "fedmq/1"
DEFAULT_MAX_SAMPLES = 10_000_000
MAX_METRICS = 32  # metric names one update may carry
MAX_METRIC_NAME = 64  # characters
MAX_METRICS_JSON = 4096  # bytes of the metrics metadata string
MAX_PLAN_JSON = 512 * 1024  # bytes of the plan metadata string (room for ~20,000 device ids)
MAX_TRAIN_SETTINGS = 16


def model_hash(
    tensors: Mapping[str, torch.Tensor],
    round_: int,
    task_json: str,
    *,
    federation: str = "",
    run_id: str = "",
) -> str:
    binding = {"round": str(round_), "task": task_json}
    if federation or run_id:
        binding |= {"federation": federation, "run_id": run_id}
    return content_digest(tensors, binding).hex()


@dataclass(frozen=True)
class ModelMessage:
    round: int
    task: TaskSpec
    task_json: str
    model_hash: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    final: bool = False
    federation: str = ""
    run_id: str = ""
    selected: tuple[str, ...] | None = None  # None: every device trains this round
    train_settings: dict[str, float] = field(default_factory=dict)
    secure: SecurePlan | None = None  # the round's secure aggregation, if it has one

    def selects(self, device_id: str) -> bool:
        return self.selected is None or device_id in self.selected


@dataclass(frozen=True)
class UpdateMessage:
    round: int
    device_id: str
    num_samples: int
    base_hash: str
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    federation: str = ""  # "" when the sender left it out: the aggregator refuses that
    run_id: str = ""
    encoding: str = ""  # "": full weights; else compressed (``compression.decode``)


def encode_model(
    tensors: Mapping[str, torch.Tensor],
    round_: int,
    task: TaskSpec,
    *,
    final: bool = False,
    federation: str = "",
    run_id: str = "",
    plan: Mapping | None = None,
    sign: Callable[[Mapping[str, torch.Tensor], dict[str, str]], str] | None = None,
) -> tuple[bytes, str]:
    """The ``model`` payload for ``round_`` and its model hash; ``sign`` adds a signature
    (over every metadata key, the plan included)."""
    task_json = task.to_json()
    digest = model_hash(tensors, round_, task_json, federation=federation, run_id=run_id)
    meta = {"format": FORMAT, "round": str(round_), "task": task_json, "model_hash": digest}
    if federation or run_id:
        meta |= {"federation": federation, "run_id": run_id}
    if final:
        meta["final"] = "1"
    if plan:
        meta["plan"] = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    if sign is not None:
        meta["signature"] = sign(tensors, meta)
    return encode(tensors, meta), digest


def decode_model(payload: bytes, **limits) -> ModelMessage:
    p = decode(payload, **limits)
    meta = p.metadata
    round_ = _int(meta, "round", minimum=1)
    task_json = _required(meta, "task")
    try:
        task = TaskSpec.from_json(task_json)
    except Exception as exc:  # TaskError; anything else is equally a bad task
        raise CodecError(f"metadata 'task' is invalid: {exc}", reason="bad_metadata") from None
    digest = _required(meta, "model_hash")
    federation, run_id = meta.get("federation", ""), meta.get("run_id", "")
    if model_hash(p.tensors, round_, task_json, federation=federation, run_id=run_id) != digest:
        raise CodecError("model_hash does not match the model's content", reason="bad_metadata")
    selected, train_settings, secure = parse_plan(meta.get("plan", ""))
    return ModelMessage(
        round=round_,
        task=task,
        task_json=task_json,
        model_hash=digest,
        tensors=p.tensors,
        metadata=meta,
        final=meta.get("final") == "1",
        federation=federation,
        run_id=run_id,
        selected=selected,
        train_settings=train_settings,
        secure=secure,
    )


def parse_plan(
    text: str,
) -> tuple[tuple[str, ...] | None, dict[str, float], SecurePlan | None]:
    """A model's ``plan`` metadata -> (selected device ids or None, training settings,
    secure aggregation or None)."""
    if not text:
        return None, {}, None

    def bad(why: str) -> CodecError:
        return CodecError(f"metadata 'plan' {why}", reason="bad_metadata")

    if len(text) > MAX_PLAN_JSON:
        raise bad(f"is {len(text)} characters (limit {MAX_PLAN_JSON})")
    try:
        plan = json.loads(text)
    except (ValueError, RecursionError):
        raise bad("is not JSON") from None
    if not isinstance(plan, dict) or set(plan) - {"selected", "train", "secure"}:
        raise bad("must be an object with only 'selected', 'train' and 'secure'")
    selected = plan.get("selected")
    if selected is not None:
        if not isinstance(selected, list) or not all(
            isinstance(d, str) and 0 < len(d) <= 128 for d in selected
        ):
            raise bad("'selected' must be a list of device ids")
        selected = tuple(selected)
    train = plan.get("train", {})
    if (
        not isinstance(train, dict)
        or len(train) > MAX_TRAIN_SETTINGS
        or not all(
            isinstance(k, str)
            and 0 < len(k) <= MAX_METRIC_NAME
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            for k, v in train.items()
        )
    ):
        raise bad(f"'train' must map at most {MAX_TRAIN_SETTINGS} names to finite numbers")
    secure = None if "secure" not in plan else parse_secure_plan(plan["secure"])
    if secure is not None and selected is None:
        raise bad("a secure round must name its selected devices")
    return selected, {k: float(v) for k, v in train.items()}, secure


def encode_update(tensors: Mapping[str, torch.Tensor], **fields) -> bytes:
    """An update payload, unsigned; ``fields`` are ``update_metadata``'s."""
    return encode(tensors, update_metadata(**fields))


def update_metadata(
    *,
    round_: int,
    device_id: str,
    num_samples: int,
    base_hash: str,
    metrics: Mapping[str, float],
    federation: str = "",
    run_id: str = "",
    encoding: str = "",
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "round": str(round_),
        "device_id": device_id,
        "num_samples": str(num_samples),
        "base_hash": base_hash,
        "metrics": json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True),
    }
    if federation or run_id:
        meta |= {"federation": federation, "run_id": run_id}
    if encoding:
        meta["encoding"] = encoding
    return meta


def decode_update(
    payload: bytes,
    *,
    schema: Schema | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    compression: Compression | None = None,
    **limits,
) -> UpdateMessage:
    """With ``schema`` (the model's), the update must be encoded as ``compression`` says
    (None: plain weights): its tensors are checked against the schema that implies."""
    settings = compression if compression is not None and compression.active else None

    def wire_schema(meta: dict[str, str]) -> Schema:
        assert schema is not None
        sent, expected = meta.get("encoding", ""), settings.label if settings else ""
        if sent != expected:
            raise CodecError(
                f"update is encoded as {sent or 'plain weights'!r}, the task asks for "
                f"{expected or 'plain weights'!r}",
                reason="bad_metadata",
            )
        return schema if settings is None else compressed_schema(schema, settings)

    p: Payload = decode(payload, schema=None if schema is None else wire_schema, **limits)
    if settings is not None and schema is not None:
        check_compressed(p.tensors, settings, schema)
    meta = p.metadata
    metrics = parse_metrics(meta)
    return UpdateMessage(
        round=_int(meta, "round", minimum=1),
        device_id=_required(meta, "device_id"),
        num_samples=_int(meta, "num_samples", minimum=1, maximum=max_samples),
        base_hash=_required(meta, "base_hash"),
        metrics=metrics,
        tensors=p.tensors,
        metadata=meta,
        federation=meta.get("federation", ""),
        run_id=meta.get("run_id", ""),
        encoding=meta.get("encoding", ""),
    )


def parse_partial(meta: Mapping[str, str]) -> int | None:
    """How many devices a site's partial result stands for; None for a device's own update
    (or a ``partial`` that is not a positive count)."""
    text = meta.get("partial")
    if not text or len(text) > 256:
        return None
    try:
        devices = json.loads(text).get("devices")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= 10**9:
        return None
    return devices


def parse_metrics(meta: Mapping[str, str]) -> dict[str, float]:
    """The ``metrics`` metadata of a device's message: a bounded JSON object of finite
    numbers; ``CodecError`` otherwise."""
    metrics_raw = _required(meta, "metrics")
    if len(metrics_raw) > MAX_METRICS_JSON:
        raise CodecError(
            f"metadata 'metrics' is {len(metrics_raw)} characters (limit {MAX_METRICS_JSON})",
            reason="bad_metadata",
        )
    try:
        metrics = json.loads(metrics_raw)
    except (ValueError, RecursionError):
        raise CodecError("metadata 'metrics' is not JSON", reason="bad_metadata") from None
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise CodecError(
            f"metadata 'metrics' must be an object of at most {MAX_METRICS} numbers",
            reason="bad_metadata",
        )
    if not all(
        isinstance(k, str)
        and 0 < len(k) <= MAX_METRIC_NAME
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (math.isfinite(v) if isinstance(v, float) else abs(v) < 2**1023)  # float(v) fits
        for k, v in metrics.items()
    ):
        raise CodecError(
            "metadata 'metrics' must map names of 1-64 characters to finite numbers",
            reason="bad_metadata",
        )
    return {k: float(v) for k, v in metrics.items()}


def _required(meta: Mapping[str, str], key: str) -> str:
    value = meta.get(key)
    if value is None or value == "":
        raise CodecError(f"metadata {key!r} is missing", reason="missing_metadata")
    return value


def _int(meta: Mapping[str, str], key: str, *, minimum: int, maximum: int | None = None) -> int:
    text = _required(meta, key)
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise CodecError(
            f"metadata {key!r} = {text[:40]!r} is not a decimal integer", reason="bad_metadata"
        )
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise CodecError(f"metadata {key!r} = {value} is outside {bound}", reason="bad_metadata")
    return value
