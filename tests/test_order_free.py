"""The round's result is a function of the set of accepted updates, not of their order.

A float sum depends on the order of its terms: 1 + 2**-60 - 1 is 0 one way and 2**-60
another. The aggregator folds the journal's updates in device-id order at close, so
every arrival order (and a resume that replays the journal) gives the same model.
"""

from __future__ import annotations

import random

import torch

from aggregator import strategies
from aggregator.fedavg import FoldedSum
from aggregator.journal import RoundJournal, payload_digest
from aggregator.round_updates import HeldUpdates, JournalUpdates
from aggregator.service import aggregate_round
from broker import messages

TEMPLATE = {"w": torch.zeros(3), "b": torch.zeros(1)}


def cancelling_updates() -> dict[str, tuple[dict, int]]:
    """device -> (tensors, num_samples): values whose float sum depends on the order."""
    tiny = 2.0**-60
    return {
        "dev-a": ({"w": torch.tensor([1.0, 3.0e7, 0.1]), "b": torch.tensor([1.0])}, 1),
        "dev-b": ({"w": torch.tensor([tiny, 1.0, 0.2]), "b": torch.tensor([tiny])}, 1),
        "dev-c": ({"w": torch.tensor([-1.0, -3.0e7, 0.3]), "b": torch.tensor([-1.0])}, 1),
        "dev-d": ({"w": torch.tensor([tiny, 2.0**-40, 1e-8]), "b": torch.tensor([3.0])}, 7),
        "dev-e": ({"w": torch.tensor([0.5, 2.5, -0.7]), "b": torch.tensor([2.0**-30])}, 1_000_003),
    }


def payload(device: str, tensors: dict, num_samples: int) -> bytes:
    return messages.encode_update(
        tensors,
        round_=1,
        device_id=device,
        num_samples=num_samples,
        base_hash="h",
        metrics={"train_loss": num_samples * 0.1},
        federation="f",
        run_id="r",
    )


def aggregate_in_order(tmp_path, order: list[str], updates) -> dict:
    journal = RoundJournal.open(tmp_path / "-".join(order), 1)
    for device in order:
        tensors, n = updates[device]
        p = payload(device, tensors, n)
        journal.record_accepted(payload_digest(p), device, p)
    journal.commit()
    return _aggregate(journal)


def test_twenty_arrival_orders_give_a_bit_identical_model(tmp_path):
    updates = cancelling_updates()
    rng = random.Random(0)
    orders = set()
    while len(orders) < 20:
        order = list(updates)
        rng.shuffle(order)
        orders.add(tuple(order))
    results = [aggregate_in_order(tmp_path, list(order), updates) for order in sorted(orders)]
    first = results[0]
    for result in results[1:]:
        for name in TEMPLATE:
            assert torch.equal(result.weights[name], first.weights[name]), name
        assert result.metrics == first.metrics
        assert result.devices == sorted(updates) and result.samples == first.samples


def test_the_arrival_order_fold_would_not_be(tmp_path):
    """The test above can fail: folding in arrival order gives different models."""
    updates = cancelling_updates()
    seen = set()
    for order in (["dev-a", "dev-b", "dev-c"], ["dev-a", "dev-c", "dev-b"]):
        folded = FoldedSum(TEMPLATE)
        for device in order:
            folded.fold(*updates[device])
        seen.add(tuple(folded.average()["b"].tolist()))
    assert len(seen) == 2  # 1 + 2**-60 - 1 == 0 but 1 - 1 + 2**-60 == 2**-60


def test_a_replayed_journal_gives_the_same_model(tmp_path):
    """Resume: the journal reopened from disk aggregates to the same model."""
    updates = cancelling_updates()
    live = aggregate_in_order(tmp_path, ["dev-e", "dev-b", "dev-a", "dev-d", "dev-c"], updates)
    reopened = RoundJournal.open(tmp_path / "dev-e-dev-b-dev-a-dev-d-dev-c", 1)
    replayed = _aggregate(reopened)
    for name in TEMPLATE:
        assert torch.equal(live.weights[name], replayed.weights[name])
    assert [row["device"] for row in replayed.device_rows] == sorted(updates)


def _aggregate(journal: RoundJournal):
    updates = JournalUpdates(journal, TEMPLATE, base_of=lambda round_: TEMPLATE, round_=1)
    return aggregate_round(strategies.build({}), TEMPLATE, updates)


def _held_round(tmp_path, order, updates, budget=1 << 20):
    """A journal and the same updates held as admission decoded them (in arrival order)."""
    journal = RoundJournal.open(tmp_path / "held", 1)
    held = HeldUpdates(budget)
    for device in order:
        p = payload(device, *updates[device])
        journal.record_accepted(payload_digest(p), device, p)
        held.add(device, messages.decode_update(p, copy=False), len(p))
    journal.commit()
    return journal, held


def test_a_small_round_held_in_memory_gives_the_journal_s_model_without_reading_it(tmp_path):
    """The close folds a small round's updates as admission decoded them, in device-id
    order: the same model, bit for bit, as reading the journal back; and it does not read
    the journal (its payload file is gone, and the close still works)."""
    updates = cancelling_updates()
    order = ["dev-e", "dev-b", "dev-a", "dev-d", "dev-c"]
    journal, held = _held_round(tmp_path, order, updates)
    from_disk = _aggregate(journal)
    journal.blobs_path.unlink()  # a read-back would fail now
    result = aggregate_round(
        strategies.build({}),
        TEMPLATE,
        JournalUpdates(journal, TEMPLATE, lambda round_: TEMPLATE, round_=1, held=held),
    )
    for name in TEMPLATE:
        assert torch.equal(result.weights[name], from_disk.weights[name]), name
    assert result.metrics == from_disk.metrics and result.device_rows == from_disk.device_rows


def test_held_updates_are_used_only_when_they_are_the_journal_s_and_within_budget(tmp_path):
    updates = cancelling_updates()
    journal, held = _held_round(tmp_path, list(updates), updates)
    assert held.matching(journal.accepted_view()) is not None
    assert held.matching(list(updates)[:-1]) is None  # not the same set: read the journal
    assert HeldUpdates().matching(journal.accepted_view()) is None  # a resumed round
    size = len(payload("dev-a", *updates["dev-a"]))
    _, over = _held_round(tmp_path / "over", list(updates), updates, budget=3 * size)
    assert over.overflowed and over.matching(list(updates)[:3]) is None  # all let go
