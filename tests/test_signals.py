"""The small JSON messages a device or an operator can send: bounded, typed, fuzzed.

Any byte string given to ``parse_status``, ``parse_control`` or ``parse_presence`` either
parses or raises ``CodecError`` with one of the documented reasons: never anything else
(the aggregator's loop used to die on a nesting bomb's RecursionError).
"""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.inbox import Inbound, Inbox
from broker import signals
from broker.errors import CodecError

REASONS = {"too_large", "not_json", "bad_fields"}
PARSERS = [signals.parse_status, signals.parse_control, signals.parse_presence]
FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
FIELDS = ["status", "device_id", "round", "reason", "command", "instance", "issued_at", "pid"]
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)


def judge(parser, payload: bytes) -> str:
    try:
        parser(payload)
    except CodecError as exc:
        assert exc.reason in REASONS, (parser.__name__, exc.reason)
        return exc.reason
    return "ok"


# Each generated example goes to every parser: 400 examples each, as when the test was
# parametrized by parser, for a third of the generating (most of the time: the nested JSON).
@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_by_reason(data):
    for parser in PARSERS:
        judge(parser, data)


@FUZZ
@given(obj=objects)
def test_any_json_object_parses_or_is_refused_by_reason(obj):
    payload = json.dumps(obj).encode()
    for parser in PARSERS:
        judge(parser, payload)


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_nesting_bombs_are_refused(parser):
    assert judge(parser, b"[" * 100_000) == "too_large"
    assert judge(parser, b"[" * 1000 + b"]" * 1000) in ("not_json", "too_large")
    deep = b'{"status": ' + b"[" * 900 + b"]" * 900 + b"}"
    assert judge(parser, deep) in ("not_json", "too_large", "bad_fields")


def test_a_status_a_device_sends_parses():
    payload = signals.encode_status("training", "bob", round_=3, capabilities={"torch": "2"})
    assert signals.parse_status(payload) == signals.DeviceStatus("training", 3)
    assert signals.parse_status(b"").status == "offline"  # retained status cleared
    for bad in (
        b'{"status": "rebooting"}',
        b'{"status": 1}',
        b'{"status": "online", "round": 1.5}',
    ):
        with pytest.raises(CodecError):
            signals.parse_status(bad)


def test_control_is_acted_on_only_by_its_instance_and_only_while_fresh():
    control = signals.parse_control(signals.encode_control("stop", "abc", issued_at=1000.0))
    assert signals.control_is_for(control, "abc", now=1010.0) == ""
    assert "another aggregator instance" in signals.control_is_for(control, "def", now=1010.0)
    assert "ago" in signals.control_is_for(control, "abc", now=1000.0 + 3600)
    with pytest.raises(CodecError):
        signals.parse_control(json.dumps({"command": "stop"}).encode())  # names no instance
    with pytest.raises(CodecError):
        signals.parse_control(json.dumps({"command": "rm -rf", "instance": "abc"}).encode())


def test_running_elsewhere_rules():
    mine = signals.Presence("online", "me", host="here", pid=1)
    alive = lambda pid: pid == 42  # noqa: E731
    other = signals.Presence("online", "them", host="here", pid=42, heartbeat=100.0)
    assert "pid 42" in signals.running_elsewhere(other, mine, 100.0, alive)
    dead = signals.Presence("online", "them", host="here", pid=43, heartbeat=100.0)
    assert signals.running_elsewhere(dead, mine, 100.0, alive) == ""  # SIGKILLed: take over
    remote = signals.Presence("online", "them", host="there", pid=42, heartbeat=100.0)
    assert "heartbeat" in signals.running_elsewhere(remote, mine, 110.0, alive, 10.0)
    assert signals.running_elsewhere(remote, mine, 200.0, alive, 10.0) == ""  # stale
    gone = signals.Presence("offline", "them", host="here", pid=42)
    assert signals.running_elsewhere(gone, mine, 100.0, alive) == ""
    assert signals.running_elsewhere(None, mine, 100.0, alive) == ""


def test_the_inbox_is_bounded_in_bytes_not_only_in_messages():
    inbox = Inbox(max_items=64, max_bytes=100)
    assert inbox.put(Inbound("t", b"x" * 60, 1, 1), lambda: False)
    waiting, second_in = threading.Event(), threading.Event()

    def still_waiting() -> bool:  # put() asks this only while the item does not fit
        waiting.set()
        return False

    def put_second():
        inbox.put(Inbound("t", b"y" * 60, 2, 1), still_waiting)
        second_in.set()

    threading.Thread(target=put_second, daemon=True).start()
    assert waiting.wait(5)  # 120 bytes would exceed the bound: the sender waits
    assert not second_in.is_set() and inbox.bytes == 60
    taken = inbox.take(10, timeout=1)
    assert [i.mid for i in taken] == [1]
    assert not second_in.wait(0.3)  # taken but still being handled: still no room
    inbox.done(taken)
    assert second_in.wait(5)  # room again
    inbox.done(inbox.take(10, timeout=1))
    big = Inbound("t", b"z" * 1000, 3, 1)  # larger than the bound: let into an empty inbox
    assert inbox.put(big, lambda: False) and inbox.bytes == 1000
    assert not inbox.put(Inbound("t", b"w", 4, 1), lambda: True)  # stopping: gives up


def test_of_two_aggregators_past_the_start_check_the_younger_yields():
    older = signals.Presence("online", "aaa", since=100.0)
    younger = signals.Presence("online", "bbb", since=200.0)
    assert signals.yields_to(younger, older) and not signals.yields_to(older, younger)
    assert not signals.yields_to(younger, signals.Presence("offline", "aaa", since=100.0))
    assert not signals.yields_to(younger, younger) and not signals.yields_to(younger, None)
    twin = signals.Presence("online", "ccc", since=200.0)  # same start: the id decides
    assert signals.yields_to(twin, younger) != signals.yields_to(younger, twin)


def test_status_reason_round_trips_and_is_bounded():
    """A device says why it skipped a round; a reason past MAX_REASON is refused both ways."""
    said = "CPU at 81.0 °C, ceiling 75 °C"
    payload = signals.encode_status("skipped", "bob", round_=3, reason=said)
    assert signals.parse_status(payload) == signals.DeviceStatus("skipped", 3, said)
    longest = "x" * signals.MAX_REASON
    assert signals.parse_status(signals.encode_status("skipped", "b", reason=longest)).reason
    with pytest.raises(ValueError, match="limit 200"):
        signals.encode_status("skipped", "bob", reason=longest + "x")
    too_long = json.dumps({"status": "skipped", "device_id": "b", "reason": longest + "x"})
    assert judge(signals.parse_status, too_long.encode()) == "bad_fields"
    assert judge(signals.parse_status, b'{"status": "skipped", "reason": 7}') == "bad_fields"
