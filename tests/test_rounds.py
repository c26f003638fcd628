"""Round rules (admit, close_decision), the round journal and the run directory."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from aggregator.checkpoint import RunDir, RunSpec, RunState
from aggregator.journal import RoundJournal, payload_digest
from aggregator.rounds import (
    ACCEPTED,
    CLOSE,
    DUPLICATE,
    LATE,
    REJECTED,
    SHORT,
    WAIT,
    Verdict,
    admit,
    close_decision,
)
from broker import codec
from broker.errors import ConfigError, FedmqError
from broker.task import ModelSpec, TaskSpec

# -- admit ---------------------------------------------------------------------------------

GOOD = dict(
    topic_device="bob",
    meta_device="bob",
    update_round=5,
    base_hash="h5",
    current_round=5,
    current_hash="h5",
    accepted_devices=("alice",),
)


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        ({}, Verdict(ACCEPTED)),
        ({"meta_device": "mallory"}, Verdict(REJECTED, "wrong_device")),
        ({"update_round": 4, "base_hash": "h4"}, Verdict(LATE)),
        ({"update_round": 6}, Verdict(REJECTED, "future_round")),
        ({"base_hash": "h4"}, Verdict(REJECTED, "stale")),
        ({"accepted_devices": ("alice", "bob")}, Verdict(DUPLICATE)),
    ],
    ids=["accepted", "wrong_device", "late", "future_round", "stale", "duplicate"],
)
def test_admit_verdicts(changes, verdict):
    assert admit(**{**GOOD, **changes}) == verdict


def test_admit_precedence():
    # a spoofed device id is rejected even for an old round; an old round is late even if
    # its base hash is old too; a duplicate must still be for the current model
    assert admit(**{**GOOD, "meta_device": "eve", "update_round": 1}).reason == "wrong_device"
    assert admit(**{**GOOD, "update_round": 1, "base_hash": "x"}) == Verdict(LATE)
    stale_dup = {**GOOD, "base_hash": "old", "accepted_devices": {"bob"}}
    assert admit(**stale_dup) == Verdict(REJECTED, "stale")


# -- close_decision -------------------------------------------------------------------------


def decide(**kw) -> str:
    args = dict(
        accepted=2,
        min_devices=2,
        present={"a", "b"},
        reporters={"a", "b"},
        elapsed=1.0,
        deadline=None,
    )
    return close_decision(**{**args, **kw})


def test_close_when_quorum_and_every_present_device_reported():
    assert decide() == CLOSE
    assert decide(present={"a"}, reporters={"a", "b", "c"}) == CLOSE
    assert decide(present=set(), accepted=2) == CLOSE


def test_wait_while_a_present_device_has_not_reported():
    assert decide(present={"a", "b", "c"}) == WAIT
    assert decide(present={"a", "b", "c"}, deadline=10.0, elapsed=9.99) == WAIT


def test_wait_for_the_quorum_even_if_everyone_present_reported():
    assert decide(accepted=1, present={"a"}, reporters={"a"}, deadline=10.0) == WAIT


def test_deadline_with_quorum_closes():
    assert decide(present={"a", "b", "c"}, deadline=10.0, elapsed=10.0) == CLOSE
    assert decide(present={"a", "b", "c"}, deadline=10.0, elapsed=99.0) == CLOSE


def test_deadline_without_quorum_is_short():
    assert decide(accepted=1, present={"a", "b", "c"}, deadline=10.0, elapsed=10.0) == SHORT
    assert decide(accepted=0, reporters=set(), deadline=0.0, elapsed=0.0) == SHORT


def test_no_deadline_waits_forever():
    assert decide(accepted=1, present={"a", "b", "c"}, elapsed=1e9) == WAIT
    assert decide(accepted=0, reporters=set(), elapsed=1e9) == WAIT


# -- the round journal ------------------------------------------------------------------------


def test_journal_records_and_counts(tmp_path):
    journal = RoundJournal.open(tmp_path, 3)
    assert journal.path == tmp_path / "rounds" / "000003" / "journal.jsonl"
    p_bob, p_alice = b"bob's update", b"alice's update"
    journal.record_accepted(payload_digest(p_bob), "bob", p_bob)
    journal.record(payload_digest(b"junk"), "eve", REJECTED, "non_finite", reports=True)
    journal.record(payload_digest(b"junk2"), None, REJECTED, "not_safetensors")
    journal.record_accepted(payload_digest(p_alice), "alice", p_alice)
    journal.record(payload_digest(b"old"), "carol", LATE)  # another round's: not a report
    journal.record(payload_digest(b"forged"), "dave", REJECTED, "bad_signature")

    assert journal.accepted_devices() == ["bob", "alice"]
    assert list(journal.accepted()) == [("bob", p_bob), ("alice", p_alice)]
    assert journal.blobs_path.read_bytes() == p_bob + p_alice  # committed by accepted()
    assert journal.reporters() == {"bob", "eve", "alice"}
    assert list(journal.accepted(by_device=True)) == [("alice", p_alice), ("bob", p_bob)]
    assert journal.records_of("bob") == 1 and journal.records_of("zed") == 0
    counts = journal.counts()
    assert counts["outcomes"] == {ACCEPTED: 2, REJECTED: 3, LATE: 1}
    assert counts["rejected"] == {"non_finite": 1, "not_safetensors": 1, "bad_signature": 1}
    assert payload_digest(p_bob) == hashlib.sha256(p_bob).hexdigest()


def test_journal_survives_reopen_and_dedups_by_digest(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    payload = b"an update"
    digest = payload_digest(payload)
    assert not journal.seen(digest)
    journal.record_accepted(digest, "bob", payload)
    journal.record(payload_digest(b"dup"), "bob", DUPLICATE)
    assert journal.seen(digest)
    journal.commit()

    again = RoundJournal.open(tmp_path, 1)
    assert again.entries == journal.entries
    assert again.seen(digest) and again.seen(payload_digest(b"dup"))
    assert not again.seen(payload_digest(b"never sent"))
    assert list(again.accepted()) == [("bob", payload)]
    assert RoundJournal.open(tmp_path, 2).entries == []  # rounds are separate


def test_journal_ignores_a_torn_last_line(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    journal.record(payload_digest(b"a"), "bob", LATE)
    journal.commit()
    with journal.path.open("a") as fh:
        fh.write('{"digest": "beef", "device": "alice", "outc')  # crash mid-write
    again = RoundJournal.open(tmp_path, 1)
    assert [e["device"] for e in again.entries] == ["bob"]
    assert not again.seen("beef")


def test_journal_entry_recorded_after_a_torn_line_survives_the_next_reopen(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    journal.record(payload_digest(b"a"), "bob", LATE)
    journal.commit()
    with journal.path.open("a") as fh:
        fh.write('{"digest": "beef", "dev')
    resumed = RoundJournal.open(tmp_path, 1)
    resumed.record_accepted(payload_digest(b"c"), "carol", b"c")
    resumed.commit()  # from here it may be acknowledged to the broker
    assert RoundJournal.open(tmp_path, 1).accepted_devices() == ["carol"]


def test_journal_drops_an_accepted_line_whose_payload_is_missing(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    journal.record_accepted(payload_digest(b"x"), "bob", b"x")
    journal.record_accepted(payload_digest(b"yz"), "alice", b"yz")
    journal.commit()
    with journal.blobs_path.open("r+b") as fh:
        fh.truncate(2)  # the lines reached the disk, alice's payload did not
    assert RoundJournal.open(tmp_path, 1).accepted_devices() == ["bob"]


def test_journal_drops_an_accepted_line_whose_payload_does_not_match(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    journal.record_accepted(payload_digest(b"x"), "bob", b"x")
    journal.commit()
    journal.blobs_path.write_bytes(b"y")
    assert RoundJournal.open(tmp_path, 1).accepted_devices() == []


def test_journal_remove(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    journal.record_accepted(payload_digest(b"x"), "bob", b"x")
    journal.remove()
    assert not journal.directory.exists()
    assert RoundJournal.open(tmp_path, 1).entries == []


# -- the run directory --------------------------------------------------------------------------

TASK = TaskSpec(model=ModelSpec("linear", {"in_features": 2}), seed=1)
SPEC = RunSpec(federation="fed", task_json=TASK.to_json(), rounds=3, min_devices=2)


def model_tensors(value: float) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.full((1, 2), value),
        "bias": torch.tensor([value]),
        "n": torch.tensor(int(value), dtype=torch.int64),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_rundir_create_commit_load_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    state = run.create(SPEC, model_tensors(0.0))
    assert state.completed_round == 0 and run.exists()
    assert run.checkpoint_path(0).exists()

    spec, loaded_state, tensors = RunDir(run.path).load()
    assert spec == SPEC and spec.task == TASK
    assert loaded_state.completed_round == 0
    assert_same(tensors, model_tensors(0.0))

    state.totals = {"accepted": 2, "rejected": {"stale": 1}}
    run.commit(state, 1, model_tensors(1.5), {"round": 1, "train_loss": 0.5})
    run.commit(state, 2, model_tensors(2.5), {"round": 2, "train_loss": 0.25})
    spec, loaded_state, tensors = RunDir(run.path).load()
    assert loaded_state == RunState(
        completed_round=2,
        checkpoint="checkpoints/round-000002.safetensors",
        totals={"accepted": 2, "rejected": {"stale": 1}},
    )
    assert_same(tensors, model_tensors(2.5))
    assert [m["round"] for m in run.metrics()] == [1, 2]
    # every checkpoint is a plain safetensors file with its round in the metadata
    payload = run.checkpoint_path(1).read_bytes()
    assert codec.decode(payload).metadata == {"round": "1"}


def test_rundir_refuses_to_create_over_an_existing_run(tmp_path):
    run = RunDir(tmp_path)
    run.create(SPEC, model_tensors(0.0))
    run.commit(run.load()[1], 1, model_tensors(1.0), {"round": 1})
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        RunDir(tmp_path).create(SPEC, model_tensors(9.0))
    assert RunDir(tmp_path).load()[1].completed_round == 1  # untouched


def test_rundir_load_without_a_run(tmp_path):
    with pytest.raises(ConfigError, match="no run to resume"):
        RunDir(tmp_path / "empty").load()


def test_rundir_load_with_a_corrupt_state(tmp_path):
    run = RunDir(tmp_path)
    run.create(SPEC, model_tensors(0.0))
    run.state_json.write_text("{not json")
    with pytest.raises(FedmqError, match="cannot read the run's state"):
        run.load()


def test_rundir_drops_metrics_beyond_the_committed_round(tmp_path):
    run = RunDir(tmp_path)
    state = run.create(SPEC, model_tensors(0.0))
    run.commit(state, 1, model_tensors(1.0), {"round": 1, "loss": 1.0})
    # a crash after round 2's metrics line and before its state.json: round 2 did not happen
    with run.metrics_jsonl.open("a") as fh:
        fh.write(json.dumps({"round": 2, "loss": 0.5}) + "\n")
    _, state, tensors = run.load()
    assert state.completed_round == 1
    assert_same(tensors, model_tensors(1.0))
    assert run.metrics() == [{"round": 1, "loss": 1.0}]
    # replaying round 2 leaves exactly one line for it
    run.commit(state, 2, model_tensors(2.0), {"round": 2, "loss": 0.4})
    assert run.metrics() == [{"round": 1, "loss": 1.0}, {"round": 2, "loss": 0.4}]


def test_rundir_repairs_a_torn_metrics_line(tmp_path):
    run = RunDir(tmp_path)
    state = run.create(SPEC, model_tensors(0.0))
    run.commit(state, 1, model_tensors(1.0), {"round": 1})
    with run.metrics_jsonl.open("a") as fh:
        fh.write('{"round": 2, "lo')
    _, state, _ = run.load()
    assert run.metrics_jsonl.read_text().endswith("\n")
    run.commit(state, 2, model_tensors(2.0), {"round": 2})
    assert [m["round"] for m in run.metrics()] == [1, 2]


def test_a_run_directory_is_held_by_one_aggregator_at_a_time(tmp_path):
    """flock: a second holder is refused with the first one's pid; the lock goes with the
    process (also on SIGKILL), or on unlock."""
    first = RunDir(tmp_path / "run")
    first.lock()
    with pytest.raises(ConfigError, match=rf"in use by another aggregator \(pid {os.getpid()}\)"):
        RunDir(tmp_path / "run").lock()
    first.unlock()
    second = RunDir(tmp_path / "run")
    second.lock()
    second.unlock()


def test_an_offline_that_came_with_a_broker_restart_is_awaited_for_a_grace_period():
    from aggregator.rounds import present_devices

    status = {"a": "online", "b": "offline", "c": "offline", "d": "training"}
    offline_at = {"b": 99.0, "c": 50.0}  # b's will fired as the broker went down at 100
    kw = {"offline_at": offline_at, "grace": 30.0}
    assert present_devices(status, link_lost_at=None, relinked_at=None, now=200, **kw) == {
        "a",
        "d",
    }
    # just seen going offline: maybe the broker going down, wait a moment before believing it
    fresh = present_devices(status, link_lost_at=None, relinked_at=None, now=100, **kw)
    assert fresh == {"a", "b", "d"}
    during = present_devices(status, link_lost_at=100.0, relinked_at=None, now=103, **kw)
    assert during == {"a", "b", "d"}  # c went offline long before: not the restart's doing
    after = present_devices(status, link_lost_at=100.0, relinked_at=102.0, now=120, **kw)
    assert after == {"a", "b", "d"}
    expired = present_devices(status, link_lost_at=100.0, relinked_at=102.0, now=132.5, **kw)
    assert expired == {"a", "d"}


def test_journal_keeps_reporters_and_accepted_as_lines_come_and_after_reopening(tmp_path):
    journal = RoundJournal.open(tmp_path, 1)
    accepted = journal.accepted_view()
    journal.record_accepted(payload_digest(b"payload"), "bob", b"payload")
    journal.record("b" * 64, "carol", DUPLICATE, reports=True)
    journal.record("c" * 64, "mallory", REJECTED, "bad_signature", reports=False)
    assert "bob" in accepted and "carol" not in accepted  # the view follows the journal
    assert journal.accepted_count() == 1
    assert journal.reporters() == {"bob", "carol"}
    journal.close()
    again = RoundJournal.open(tmp_path, 1)
    assert again.reporters() == {"bob", "carol"} and list(again.accepted_view()) == ["bob"]


def test_inbox_budget_is_about_one_model_within_floor_and_limit():
    from aggregator.service import INBOX_BYTES, INBOX_FLOOR, inbox_budget

    assert inbox_budget(INBOX_BYTES, 19_240) == INBOX_FLOOR  # small models: a full batch
    assert 64 * 19_872 < INBOX_FLOOR
    assert inbox_budget(INBOX_BYTES, 4_000_000) == max(4_000_000, INBOX_FLOOR)
    assert inbox_budget(INBOX_BYTES, 40_000_000) == 40_000_000
    assert inbox_budget(INBOX_BYTES, 10**12) == INBOX_BYTES
    assert inbox_budget(1_000, 40_000_000) == 1_000  # an explicit smaller limit holds
