"""``write_together``'s order of operations: what a crash at any point can leave.

A round's commit writes the checkpoint, appends the metrics lines, then replaces
``state.json``, which makes them the run's. state.json's bytes are synced in the same wait
as the others' (one wait for the disk fewer on the close's critical path), but its rename
must come after the checkpoint's rename is durable, or a crash could leave a state.json
naming a checkpoint that is not there.
"""

from __future__ import annotations

import os

import pytest

from aggregator import durable


def _record(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_the_commit_record_is_renamed_after_the_rest_is_durable(tmp_path, monkeypatch):
    ckpt_dir, run = tmp_path / "checkpoints", tmp_path
    ckpt, metrics, state = ckpt_dir / "round_3.safetensors", run / "metrics.jsonl", run / "s.json"
    state.write_bytes(b"old")
    calls = _record(monkeypatch)
    durable.write_together({ckpt: b"weights"}, {metrics: '{"round": 3}'}, then={state: b"new"})

    assert ckpt.read_bytes() == b"weights" and state.read_bytes() == b"new"
    assert metrics.read_text() == '{"round": 3}\n'
    step = {call: i for i, call in enumerate(calls)}
    synced_data = [step[("fsync", str(p))] for p in (ckpt_dir / ".round_3.safetensors.tmp",)]
    synced_data += [step[("fsync", str(metrics))], step[("fsync", str(run / ".s.json.tmp"))]]
    ckpt_renamed, ckpt_dir_synced = step[("rename", str(ckpt))], step[("fsync", str(ckpt_dir))]
    state_renamed, run_synced = step[("rename", str(state))], step[("fsync", str(run))]
    # every file's bytes (state.json's too) before any rename; the checkpoint's rename
    # durable before state.json is renamed; state.json's rename durable before returning
    assert max(synced_data) < ckpt_renamed < ckpt_dir_synced < state_renamed < run_synced
    assert run_synced == len(calls) - 1


def test_a_failure_before_the_renames_leaves_the_commit_record_as_it_was(tmp_path):
    state = tmp_path / "state.json"
    state.write_bytes(b"old")
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")  # a checkpoint "directory" that is a file: mkdir fails
    with pytest.raises(OSError):
        durable.write_together({blocked / "round_3.safetensors": b"w"}, {}, then={state: b"new"})
    assert state.read_bytes() == b"old"
