"""The small JSON messages of the wire contract: device status, aggregator presence, control.

Whoever can publish on these topics is not trusted, so each parser bounds the
payload's size before reading it, survives any byte string (nesting bombs
included), checks every field's type and raises ``CodecError`` with a reason:

    too_large   longer than the topic's limit
    not_json    not UTF-8 JSON, or nested too deeply to read
    bad_fields  JSON, but not an object of the fields below with their types

``status/<device>`` (device, retained; also its last will)::

    {"status": "online" | "training" | "offline" | "skipped", "device_id": "...",
     "round": 3, "capabilities": {...}, "reason": "..."}

A ``reason`` (at most ``MAX_REASON`` characters) says why a device skipped a round:
not selected, or its owner's limits ("outside training hours 08:00-18:00").

``aggregator`` (aggregator, retained; also its last will)::

    {"status": "online" | "offline", "instance": "<hex>", "run_id": "<hex>",
     "host": "...", "pid": 123, "since": <unix time>, "heartbeat": <unix time>}

``control`` (operator)::

    {"command": "pause" | "resume" | "stop", "instance": "<hex>", "issued_at": <unix time>}

A control command names the aggregator process it is meant for (the
``instance`` of its presence message, new at every start), so a command queued
for an aggregator that has since died never stops the next one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from broker.errors import CodecError

MAX_STATUS_BYTES = 4096
MAX_PRESENCE_BYTES = 1024
MAX_CONTROL_BYTES = 1024
DEVICE_STATES = ("online", "training", "offline", "skipped")
MAX_REASON = 200  # characters of a status's reason: why a device skipped a round
COMMANDS = ("pause", "resume", "stop")
CONTROL_MAX_AGE = 120.0  # seconds; clocks of operator and aggregator may differ a little


def _object(payload: bytes, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise CodecError(f"{len(payload)} bytes (limit {limit})", reason="too_large")
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CodecError("not a JSON object", reason="not_json") from None
    if not isinstance(value, dict):
        raise CodecError("not a JSON object", reason="bad_fields")
    return value


def _field(obj: dict, key: str, kinds: type | tuple[type, ...], *, required: bool = True):
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):  # no field is a boolean
        raise CodecError(f"field {key!r} is missing or of the wrong type", reason="bad_fields")
    if isinstance(value, float) and not math.isfinite(value):
        raise CodecError(f"field {key!r} is not finite", reason="bad_fields")
    if isinstance(value, str) and len(value) > 256:
        raise CodecError(f"field {key!r} is too long", reason="bad_fields")
    return value


# -- device status -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceStatus:
    status: str
    round: int | None = None
    reason: str = ""


def encode_status(
    status: str,
    device_id: str,
    *,
    round_: int | None = None,
    capabilities: dict | None = None,
    reason: str = "",
) -> bytes:
    if len(reason) > MAX_REASON:
        raise ValueError(f"status reason of {len(reason)} characters (limit {MAX_REASON})")
    body: dict[str, Any] = {"status": status, "device_id": device_id}
    if capabilities:
        body["capabilities"] = capabilities
    if round_ is not None:
        body["round"] = round_
    if reason:
        body["reason"] = reason
    return json.dumps(body).encode()


def parse_status(payload: bytes) -> DeviceStatus:
    """A device's retained status; an empty payload (retained status cleared) is offline."""
    if not payload:
        return DeviceStatus("offline")
    obj = _object(payload, MAX_STATUS_BYTES)
    status = _field(obj, "status", str)
    if status not in DEVICE_STATES:
        raise CodecError(f"unknown status {status[:40]!r}", reason="bad_fields")
    round_ = _field(obj, "round", int, required=False)
    reason = _field(obj, "reason", str, required=False) or ""
    if len(reason) > MAX_REASON:
        raise CodecError(f"reason longer than {MAX_REASON} characters", reason="bad_fields")
    return DeviceStatus(status, round_, reason)


# -- aggregator presence -------------------------------------------------------------------------
@dataclass(frozen=True)
class Presence:
    status: str  # online | offline
    instance: str
    run_id: str = ""
    host: str = ""
    pid: int = 0
    since: float = 0.0
    heartbeat: float = 0.0

    def encode(self, **changes) -> bytes:
        return json.dumps({**self.__dict__, **changes}).encode()


def parse_presence(payload: bytes) -> Presence | None:
    """The aggregator's retained presence; None when there is none (empty payload)."""
    if not payload:
        return None
    obj = _object(payload, MAX_PRESENCE_BYTES)
    status = _field(obj, "status", str)
    if status not in ("online", "offline"):
        raise CodecError(f"unknown presence {status[:40]!r}", reason="bad_fields")
    return Presence(
        status=status,
        instance=_field(obj, "instance", str),
        run_id=_field(obj, "run_id", str, required=False) or "",
        host=_field(obj, "host", str, required=False) or "",
        pid=_field(obj, "pid", int, required=False) or 0,
        since=float(_field(obj, "since", (int, float), required=False) or 0.0),
        heartbeat=float(_field(obj, "heartbeat", (int, float), required=False) or 0.0),
    )


# -- control -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Control:
    command: str
    instance: str
    issued_at: float = field(default=0.0)


def encode_control(command: str, instance: str, issued_at: float | None = None) -> bytes:
    if command not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}")
    when = time.time() if issued_at is None else issued_at
    return json.dumps({"command": command, "instance": instance, "issued_at": when}).encode()


def parse_control(payload: bytes) -> Control:
    obj = _object(payload, MAX_CONTROL_BYTES)
    command = _field(obj, "command", str)
    if command not in COMMANDS:
        raise CodecError(f"unknown command {command[:40]!r}", reason="bad_fields")
    return Control(
        command=command,
        instance=_field(obj, "instance", str),
        issued_at=float(_field(obj, "issued_at", (int, float))),
    )


def control_is_for(control: Control, instance: str, now: float | None = None) -> str:
    """'' when ``control`` is meant for aggregator ``instance`` and fresh, else why not."""
    if control.instance != instance:
        return "meant for another aggregator instance"
    age = (time.time() if now is None else now) - control.issued_at
    if abs(age) > CONTROL_MAX_AGE:
        return f"issued {age:.0f}s ago (limit {CONTROL_MAX_AGE:g}s)"
    return ""


PRESENCE_STALE = 3.5  # heartbeats missed before an aggregator on another host counts as gone


def running_elsewhere(
    other: Presence | None,
    mine: Presence,
    now: float,
    pid_alive,
    heartbeat: float = 10.0,
) -> str:
    """Why the aggregator ``other`` (the retained presence) still runs, or '' if it does not.

    An aggregator that died without its last will reaching the broker yet (SIGKILL, a
    few seconds ago) leaves ``online`` behind: on this host its pid tells; elsewhere its
    heartbeat must be fresh."""
    if other is None or other.status != "online" or other.instance == mine.instance:
        return ""
    where = f"pid {other.pid} on {other.host or '?'}"
    if other.host == mine.host:
        return f"{where}, alive" if other.pid and pid_alive(other.pid) else ""
    age = now - other.heartbeat
    if age <= PRESENCE_STALE * heartbeat:
        return f"{where}, last heartbeat {age:.0f}s ago"
    return ""


def yields_to(mine: Presence, other: Presence | None) -> bool:
    """Two aggregators of one federation got past the start-up check (a race): the one
    that started later stops, so they do not take the session from each other for ever."""
    if other is None or other.status != "online" or other.instance == mine.instance:
        return False
    return (other.since, other.instance) < (mine.since, mine.instance)
