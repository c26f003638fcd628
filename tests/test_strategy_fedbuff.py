"""FedBuff's math by hand: staleness weights and the buffered step (no broker)."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator import strategies
from aggregator.round_updates import ListUpdates
from aggregator.strategies.base import Update
from aggregator.strategies.fedbuff import staleness_weight
from aggregator.strategies.sums import FedAvg

G1 = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(4)}  # round 1's model
G2 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(6)}  # round 2's (current)


def test_staleness_weights_are_one_over_root_one_plus_s():
    assert [staleness_weight(s) for s in range(4)] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5]
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_a_stale_update_moves_the_current_model_by_its_own_delta_down_weighted():
    fresh = Update("a", 1, {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(8)}, 2, G2)
    # trained on round 1's model: its delta is (2, 2), worth 1/sqrt(2) at staleness 1
    stale = Update("b", 3, {"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(8)}, 1, G1)
    strategy = strategies.build({"name": "fedbuff", "buffer_size": 2})
    out = strategy.aggregate(G2, ListUpdates([stale, fresh], G2, round_=2))
    k = 1 / math.sqrt(2)
    # g + (1 * (2, 0) + 3 * k * (2, 2)) / 4
    expected = torch.tensor([1.0 + (2 + 6 * k) / 4, 2.0 + (6 * k) / 4])
    assert torch.allclose(out["w"], expected, atol=1e-6), (out["w"], expected)
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 8  # counters: the mean


def test_server_lr_scales_the_step():
    fresh = Update("a", 1, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(6)}, 2, G2)
    half = strategies.build({"name": "fedbuff", "server_lr": 0.5})
    out = half.aggregate(G2, ListUpdates([fresh], G2, round_=2))
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))


def test_fresh_updates_give_fedavg_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(50, generator=gen)}
    updates = [
        Update(f"d{i}", 10 + i, {"w": torch.randn(50, generator=gen)}, 3, current) for i in range(5)
    ]
    fedbuff = strategies.build({"name": "fedbuff", "buffer_size": 5})
    fedavg = strategies.build({})
    assert isinstance(fedavg, FedAvg)
    a = fedbuff.aggregate(current, ListUpdates(updates, current, round_=3))
    b = fedavg.aggregate(current, ListUpdates(updates, current, round_=3))
    assert torch.equal(a["w"], b["w"])
