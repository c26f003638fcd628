#!/usr/bin/env python
"""Fuzz the update decoder: mutate valid update payloads, decode them, classify the outcome.

Every mutated payload must either decode into a valid ``UpdateMessage`` (right tensors,
finite weights, sane metadata) or be refused with a ``CodecError``; any other exception,
or an accepted message that breaks the schema, is a crash. Exit code 1 if there is one.

    .venv/bin/python scripts/fuzz_codec.py --cases 20000 --seed 0

The mutation functions here are plain functions of a ``random.Random``; the hypothesis
test in ``tests/test_fuzz_codec.py`` drives the same functions with a hypothesis-controlled
``Random`` so that failures shrink.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from broker import codec, messages  # noqa: E402
from broker.errors import CodecError  # noqa: E402

# -- the valid payloads we start from ------------------------------------------------------

BASE_HASH = "ab" * 32
METADATA = dict(
    round_=3,
    device_id="dev-1",
    num_samples=17,
    base_hash=BASE_HASH,
    metrics={"train_loss": 0.5, "eval_accuracy": 0.75},
)


def base_tensor_sets() -> list[dict[str, torch.Tensor]]:
    """Small state dicts: a model with an int64 buffer, and one of every wire dtype."""
    gen = torch.Generator().manual_seed(1234)
    model = {
        "0.weight": torch.randn(2, 3, generator=gen),
        "0.bias": torch.randn(2, generator=gen),
        "1.weight": torch.ones(2),
        "1.bias": torch.zeros(2),
        "1.running_mean": torch.zeros(2),
        "1.running_var": torch.ones(2),
        "1.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }
    mixed = {
        "d": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "h": torch.randn(4, generator=gen).to(torch.float16),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "i": torch.arange(3, dtype=torch.int32),
        "s": torch.arange(2, dtype=torch.int16),
        "c": torch.tensor([-1, 2], dtype=torch.int8),
        "u": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.5),
    }
    return [model, mixed]


def base_cases() -> list[tuple[bytes, dict[str, codec.TensorSpec]]]:
    """(valid update payload, its schema) pairs."""
    return [(messages.encode_update(t, **METADATA), codec.schema_of(t)) for t in base_tensor_sets()]


# -- payload surgery -------------------------------------------------------------------------


def split(payload: bytes) -> tuple[dict, bytes] | None:
    """(header dict, data section) of a well-formed payload; None if it does not parse."""
    if len(payload) < 8:
        return None
    (n,) = struct.unpack("<Q", payload[:8])
    if 8 + n > len(payload):
        return None
    try:
        header = json.loads(payload[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, payload[8 + n :]) if isinstance(header, dict) else None


def join(header_text: str | bytes, data: bytes, *, pad: bool = True) -> bytes:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


INTERESTING_INTS = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    -1,
    -2,
    255,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 7,
    10**20,
    10**400,
]
DTYPE_NAMES = [*codec.DTYPES, "F8_E4M3", "U16", "U32", "U64", "C64", "f32", "", "BOOL "]
INTERESTING_BYTES = [0x00, 0x01, 0x20, 0x22, 0x2C, 0x2D, 0x30, 0x39, 0x5B, 0x5D, 0x7B, 0x7D, 0xFF]
INTERESTING_STRINGS = [
    "",
    "0",
    "1",
    "-1",
    "01",
    "+5",
    " 5",
    "1e3",
    "1.5",
    "9" * 18,
    "9" * 19,
    "9" * 40,
    "\u0663",  # ARABIC-INDIC DIGIT THREE: isdigit() but not ASCII
    "NaN",
    "null",
    "dev-1",
    "dev-2",
    BASE_HASH,
    "\x00",
]
INTERESTING_METRICS = [
    "{}",
    "[]",
    "null",
    "3",
    '"x"',
    "{",
    '{"a": NaN}',
    '{"a": Infinity}',
    '{"a": -Infinity}',
    '{"a": 1e999}',
    '{"a": true}',
    '{"a": "1"}',
    '{"a": null}',
    '{"a": [1]}',
    '{"a": ' + "9" * 400 + "}",
    '{"a": -' + "9" * 400 + "}",
    '{"a": ' + "9" * 5000 + "}",
    '{"a": 1, "a": NaN}',
    '{"a": 1.7976931348623157e308}',
    '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
]
DEEP = "\x00DEEP\x00"  # placeholder replaced by a deeply nested JSON array after dumping


def random_json(rng: random.Random, depth: int = 0):
    """A random JSON value, biased towards the ones a header parser trips on."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind in (2, 3):
        return rng.choice(INTERESTING_INTS)
    if kind == 4:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 4.0, 1e308, float("nan"), float("inf")])
    if kind == 5:
        return rng.choice(DTYPE_NAMES + INTERESTING_STRINGS)
    if kind in (6, 7):  # shape- or offsets-like list of ints
        return [rng.choice(INTERESTING_INTS) for _ in range(rng.randrange(0, 10))]
    if kind in (8, 9):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 10:
        return {
            rng.choice(["dtype", "shape", "data_offsets", "x", ""]): random_json(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    return DEEP if rng.random() < 0.5 else rng.choice(list(codec.DTYPES))


def _dump_header(rng: random.Random, header: dict) -> str:
    text = json.dumps(header)  # NaN / Infinity allowed on purpose: the decoder must cope
    placeholder = json.dumps(DEEP)
    if placeholder in text:
        n = rng.choice([50, 1000, 100_000])
        text = text.replace(placeholder, "[" * n + "]" * n)
    return text


def header_rewrite(rng: random.Random, payload: bytes) -> bytes:
    """Rewrite the JSON header: fields, entries, metadata; re-serialise with a fitting length."""
    parts = split(payload)
    if parts is None:
        return byte_overwrite(rng, payload)
    header, data = parts
    meta = header.get("__metadata__")
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(12)
    if names and op <= 3:  # one field of one entry -> random JSON
        entry = header[rng.choice(names)]
        if isinstance(entry, dict):
            entry[rng.choice(["dtype", "shape", "data_offsets"])] = random_json(rng)
    elif names and op == 4:  # plausible but wrong shape / dtype / offsets
        entry = header[rng.choice(names)]
        if isinstance(entry, dict):
            field = rng.choice(["dtype", "shape", "data_offsets"])
            if field == "dtype":
                entry["dtype"] = rng.choice(DTYPE_NAMES)
            elif field == "shape":
                entry["shape"] = [
                    rng.choice([0, 1, 2, 3, 4, 6, 2**40]) for _ in range(rng.randrange(4))
                ]
            elif isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
                i = rng.randrange(len(entry["data_offsets"]))
                if isinstance(entry["data_offsets"][i], int):
                    entry["data_offsets"][i] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 2**40])
    elif names and op == 5:  # swap two entries' offsets
        a, b = rng.choice(names), rng.choice(names)
        ea, eb = header[a], header[b]
        if isinstance(ea, dict) and isinstance(eb, dict):
            ea["data_offsets"], eb["data_offsets"] = eb.get("data_offsets"), ea.get("data_offsets")
    elif names and op == 6:  # drop a key, add a key, rename, duplicate or delete an entry
        name = rng.choice(names)
        entry = header[name]
        sub = rng.randrange(5)
        if sub == 0 and isinstance(entry, dict) and entry:
            del entry[rng.choice(list(entry))]
        elif sub == 1 and isinstance(entry, dict):
            entry[rng.choice(["extra", "dtype", "offsets"])] = random_json(rng)
        elif sub == 2:
            header[name + rng.choice(["_", ".x", "", "\u00e9"])] = header.pop(name)
        elif sub == 3:
            header[name + "_copy"] = json.loads(json.dumps(entry))
        else:
            del header[name]
    elif op in (7, 8) and isinstance(meta, dict):  # one metadata value
        key = rng.choice(["round", "num_samples", "device_id", "base_hash", "metrics", "format"])
        sub = rng.randrange(4)
        if sub == 0:
            meta.pop(key, None)
        elif key == "metrics" or sub == 1:
            meta[key] = rng.choice(INTERESTING_METRICS)
        elif sub == 2:
            meta[key] = rng.choice(INTERESTING_STRINGS)
        else:
            meta[key] = random_json(rng)  # not even a string
    elif op == 9:  # the whole metadata map
        header["__metadata__"] = random_json(rng)
    elif op == 10 and names:  # the whole entry
        header[rng.choice(names)] = random_json(rng)
    else:  # a new entry (or a replaced one), often empty and placed at the end
        begin = rng.choice([0, len(data), len(data)])
        header[rng.choice(["new", "0.weight", "h", "empty"])] = {
            "dtype": rng.choice(DTYPE_NAMES),
            "shape": [
                rng.choice([0, 1, 2, 2**31, 2**62, 2**63, 2**64]) for _ in range(rng.randrange(5))
            ],
            "data_offsets": [begin, begin + rng.choice([0, 0, 4])],
        }
    return join(_dump_header(rng, header), data, pad=rng.random() < 0.8)


def bit_flip(rng: random.Random, payload: bytes) -> bytes:
    if not payload:
        return payload
    buf = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def byte_overwrite(rng: random.Random, payload: bytes) -> bytes:
    if not payload:
        return payload
    buf = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(buf)


def truncate(rng: random.Random, payload: bytes) -> bytes:
    if rng.random() < 0.5 and len(payload) > 1:
        return payload[: len(payload) - rng.randint(1, min(16, len(payload)))]
    return payload[: rng.randrange(len(payload) + 1)]


def insert(rng: random.Random, payload: bytes) -> bytes:
    i = rng.randrange(len(payload) + 1)
    blob = bytes(rng.choice(INTERESTING_BYTES) for _ in range(rng.randint(1, 16)))
    return payload[:i] + blob + payload[i:]


def delete(rng: random.Random, payload: bytes) -> bytes:
    if not payload:
        return payload
    i = rng.randrange(len(payload))
    return payload[:i] + payload[i + rng.randint(1, 16) :]


def length_field(rng: random.Random, payload: bytes) -> bytes:
    """Rewrite the 8-byte header length: off by a little, zero, or absurd."""
    (n,) = struct.unpack("<Q", payload[:8]) if len(payload) >= 8 else (0,)
    new = rng.choice(
        [n - 1, n + 1, n - 8, n + 8, 0, len(payload), 2**20, 2**20 + 1, 2**32, 2**64 - 1]
    )
    return struct.pack("<Q", new % 2**64) + payload[8:]


SPECIAL_FLOATS = [
    struct.pack("<f", math.nan),
    struct.pack("<f", math.inf),
    struct.pack("<f", -math.inf),
    struct.pack("<d", math.nan),
    struct.pack("<d", math.inf),
    b"\x00\x7c",  # f16 +inf
    b"\x00\xfe",  # f16 nan
    b"\x80\x7f",  # bf16 +inf
    b"\xc0\x7f",  # bf16 nan
]


def special_floats(rng: random.Random, payload: bytes) -> bytes:
    """Write NaN / Inf bit patterns into the data section."""
    parts = split(payload)
    start = len(payload) - len(parts[1]) if parts else 8
    if start >= len(payload):
        return payload
    blob = rng.choice(SPECIAL_FLOATS)
    i = rng.randrange(start, len(payload))
    i -= (i - start) % len(blob)
    return payload[:i] + blob + payload[i + len(blob) :]


def splice(rng: random.Random, payload: bytes, others: list[bytes]) -> bytes:
    other = rng.choice(others)
    return payload[: rng.randrange(len(payload) + 1)] + other[rng.randrange(len(other) + 1) :]


MUTATIONS: list[tuple[str, Callable[[random.Random, bytes], bytes]]] = [
    ("bit_flip", bit_flip),
    ("byte_overwrite", byte_overwrite),
    ("truncate", truncate),
    ("insert", insert),
    ("delete", delete),
    ("length_field", length_field),
    ("header_rewrite", header_rewrite),
    ("header_rewrite", header_rewrite),
    ("header_rewrite", header_rewrite),
    ("special_floats", special_floats),
]


def mutate(
    rng: random.Random, payload: bytes, others: list[bytes] | None = None, steps: int | None = None
) -> tuple[bytes, list[str]]:
    """Apply 1-3 random mutations; returns the payload and the names of what was done."""
    trail = []
    for _ in range(steps if steps is not None else rng.randint(1, 3)):
        if others and rng.random() < 0.05:
            payload = splice(rng, payload, others)
            trail.append("splice")
            continue
        name, fn = rng.choice(MUTATIONS)
        payload = fn(rng, payload)
        trail.append(name)
    return payload, trail


# -- judging one case -------------------------------------------------------------------------


class InvalidAccept(AssertionError):
    """The decoder accepted a message that breaks the schema or the metadata rules."""


def check_valid(msg: messages.UpdateMessage, schema, max_samples: int) -> None:
    if schema is not None:
        if set(msg.tensors) != set(schema):
            raise InvalidAccept(f"tensors {sorted(msg.tensors)} != schema {sorted(schema)}")
        for name, spec in schema.items():
            t = msg.tensors[name]
            if codec.dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != tuple(spec.shape):
                raise InvalidAccept(f"{name}: {t.dtype}{tuple(t.shape)} does not match {spec}")
    for name, t in msg.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidAccept(f"{name} holds NaN or Inf")
    if not (isinstance(msg.round, int) and msg.round >= 1):
        raise InvalidAccept(f"round {msg.round!r}")
    if not (isinstance(msg.num_samples, int) and 1 <= msg.num_samples <= max_samples):
        raise InvalidAccept(f"num_samples {msg.num_samples!r}")
    for key in ("device_id", "base_hash"):
        if not (isinstance(getattr(msg, key), str) and getattr(msg, key)):
            raise InvalidAccept(f"{key} {getattr(msg, key)!r}")
    for k, v in msg.metrics.items():
        if not (isinstance(k, str) and isinstance(v, float) and math.isfinite(v)):
            raise InvalidAccept(f"metric {k!r} = {v!r}")


def judge(payload: bytes, schema, max_samples: int = messages.DEFAULT_MAX_SAMPLES) -> str:
    """'accepted' or 'refused:<reason>'; any other exception propagates (a crash).

    ``schema=None`` decodes without a model to compare against (as ``decode_model`` and a
    checkpoint load do): only the payload's own consistency and the metadata are checked.
    """
    try:
        msg = messages.decode_update(payload, schema=schema, max_samples=max_samples)
    except CodecError as exc:
        if exc.reason not in codec.REASONS:
            raise InvalidAccept(f"refusal reason {exc.reason!r} is not in REASONS") from None
        return f"refused:{exc.reason}"
    check_valid(msg, schema, max_samples)
    return "accepted"


# -- the command -----------------------------------------------------------------------------


def run(cases: int, seed: int, schemaless: float = 0.25) -> int:
    rng = random.Random(seed)
    bases = base_cases()
    payloads = [p for p, _ in bases]
    outcomes: Counter = Counter()
    crashes: dict[str, tuple[int, str, list[str], bytes]] = {}
    crash_count = 0
    started = time.perf_counter()

    def one(i: int) -> None:
        nonlocal crash_count
        base, schema = bases[rng.randrange(len(bases))]
        if rng.random() < schemaless:
            schema = None
        payload, trail = mutate(rng, base, payloads)
        try:
            outcomes[judge(payload, schema)] += 1
        except Exception as exc:  # noqa: BLE001 - the point is to catch everything
            crash_count += 1
            kind = f"{type(exc).__module__}.{type(exc).__name__} at {_where(exc)}"
            if kind not in crashes:
                first_line = (str(exc).splitlines() or [""])[0][:200]
                trail = [*trail, "(no schema)" if schema is None else "(schema)"]
                crashes[kind] = (i, first_line, trail, payload)

    try:
        from rich.progress import Progress
    except ImportError:  # pragma: no cover - rich is a dependency; plain fallback anyway
        Progress = None
    if Progress is not None and sys.stderr.isatty():
        with Progress(transient=True) as progress:
            task = progress.add_task("fuzzing decode_update", total=cases)
            for i in range(cases):
                one(i)
                progress.advance(task)
    else:
        step = max(1, cases // 10)
        for i in range(cases):
            one(i)
            if (i + 1) % step == 0 or i + 1 == cases:
                print(
                    f"  {i + 1}/{cases} cases ({100 * (i + 1) // cases}%), "
                    f"{crash_count} crashes, {time.perf_counter() - started:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    elapsed = time.perf_counter() - started
    _report(cases, seed, elapsed, outcomes, crashes, crash_count)
    return 1 if crash_count else 0


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame in the project (not in this script): one bug, one row."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(str(ROOT)) and not f.filename.endswith("fuzz_codec.py")
    ]
    frame = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    try:
        name = str(Path(frame.filename).relative_to(ROOT))
    except ValueError:
        name = frame.filename
    return f"{name}:{frame.lineno}"


def _report(cases, seed, elapsed, outcomes, crashes, crash_count) -> None:
    from rich.console import Console
    from rich.table import Table

    accepted = outcomes.get("accepted", 0)
    refused = {k.split(":", 1)[1]: n for k, n in outcomes.items() if k.startswith("refused:")}
    print(
        f"cases tried: {cases} (seed {seed}, {elapsed:.1f}s)   accepted: {accepted}   "
        f"refused: {sum(refused.values())}   crashes: {crash_count}"
    )
    table = Table(title="refused by reason")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason in codec.REASONS:
        table.add_row(reason, str(refused.get(reason, 0)))
    Console().print(table)
    if not crashes:
        print("crashes: none")
        return
    print(f"crashes: {crash_count} ({len(crashes)} kind(s)), one example of each:")
    for kind, (i, message, trail, payload) in crashes.items():
        print(f"  {kind}, first at case {i}: {message}")
        print(f"    mutations: {' -> '.join(trail)}")
        print(f"    payload ({len(payload)} bytes): {payload[:160]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000, help="mutated payloads to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutator")
    parser.add_argument(
        "--schemaless",
        type=float,
        default=0.25,
        help="fraction of cases decoded without a schema (like decode_model)",
    )
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    return run(args.cases, args.seed, args.schemaless)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    sys.exit(main())
