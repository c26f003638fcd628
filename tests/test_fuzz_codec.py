"""Property: any mutation of a valid update payload decodes to a valid message or a CodecError.

The mutations are those of ``scripts/fuzz_codec.py`` (loaded by path: ``scripts/`` is not a
package), driven by a hypothesis-controlled ``Random`` so that a failure shrinks to a small
sequence of choices. The script runs the same mutator for tens of thousands of cases.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import codec, messages

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_codec.py"


def _load_fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_codec", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_module()
BASES = fuzz.base_cases()
OTHERS = [p for p, _ in BASES]

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    # the autouse seeding fixture in conftest is harmless across examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _judge(payload: bytes, schema) -> str:
    """Like fuzz.judge, but an unexpected exception fails the test with the payload shown."""
    try:
        return fuzz.judge(payload, schema)
    except fuzz.InvalidAccept:
        raise
    except Exception as exc:  # judge itself turns a CodecError into "refused:<reason>"
        pytest.fail(f"decode_update raised {type(exc).__name__}: {exc!r} on {payload[:200]!r}")


def test_bases_are_valid_and_accepted():
    for payload, schema in BASES:
        assert fuzz.judge(payload, schema) == "accepted"
        msg = messages.decode_update(payload, schema=schema)
        assert (msg.round, msg.device_id, msg.num_samples) == (3, "dev-1", 17)


@FUZZ_SETTINGS
@given(
    base=st.integers(0, len(BASES) - 1),
    rng=st.randoms(use_true_random=False),
    steps=st.integers(1, 3),
    with_schema=st.booleans(),
)
def test_mutated_update_is_accepted_valid_or_refused_with_a_reason(base, rng, steps, with_schema):
    payload, schema = BASES[base]
    mutated, _trail = fuzz.mutate(rng, payload, OTHERS, steps=steps)
    outcome = _judge(mutated, schema if with_schema else None)
    assert outcome == "accepted" or outcome.removeprefix("refused:") in codec.REASONS


def _json_values():
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from(fuzz.INTERESTING_INTS)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.sampled_from(fuzz.DTYPE_NAMES)
        | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=12,
    )


@FUZZ_SETTINGS
@given(
    base=st.integers(0, len(BASES) - 1),
    which=st.integers(0, 100),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    value=_json_values(),
    with_schema=st.booleans(),
)
def test_header_field_rewritten_with_any_json_is_handled(base, which, field, value, with_schema):
    """Offsets, shape or dtype of one entry replaced by an arbitrary JSON value."""
    payload, schema = BASES[base]
    header, data = fuzz.split(payload)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[which % len(names)]][field] = value
    raw = json.dumps(header).encode()
    mutated = struct.pack("<Q", len(raw)) + raw + data
    outcome = _judge(mutated, schema if with_schema else None)
    assert outcome == "accepted" or outcome.removeprefix("refused:") in codec.REASONS


@FUZZ_SETTINGS
@given(key=st.sampled_from(["round", "num_samples", "metrics"]), value=st.text(max_size=30))
def test_metadata_value_rewritten_with_any_text_is_handled(key, value):
    payload, schema = BASES[0]
    header, data = fuzz.split(payload)
    header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    outcome = _judge(struct.pack("<Q", len(raw)) + raw + data, schema)
    assert outcome == "accepted" or outcome.removeprefix("refused:") in codec.REASONS


def test_the_script_runs_a_small_budget_cleanly(capsys):
    assert fuzz.main(["--cases", "300", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "cases tried: 300" in out
    assert "crashes: none" in out
