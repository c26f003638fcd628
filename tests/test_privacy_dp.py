"""DP-FedAvg: clipping and noise as stated, epsilon from the accountant, on the wire."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator import strategies
from aggregator.privacy import accountant
from aggregator.round_updates import ListUpdates
from aggregator.strategies.base import StrategyError, Update
from device_agent.hooks import TrainingHooks, clip_update

KEY = bytes(range(32))
G = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "n": torch.tensor(2)}


def private(sigma: float, clip: float, key: bytes = KEY, **strategy):
    s = strategies.build(strategy or {}, {"noise_multiplier": sigma, "clip_norm": clip})
    s.use_secret(key)
    return s


def update(device: str, delta: list[float], samples: int = 1, base=G, round_: int = 3):
    w = base["w"] + torch.tensor(delta)
    return Update(device, samples, {"w": w, "n": torch.tensor(4)}, round_, base)


def test_without_noise_it_is_the_unweighted_mean_of_the_clipped_deltas():
    updates = [
        update("a", [3.0, 4.0, 0.0, 0.0], samples=100),  # norm 5 -> clipped to 2: (1.2, 1.6)
        update("b", [0.0, 0.0, 1.0, 0.0], samples=1),  # norm 1: kept
    ]
    out = private(0.0, 2.0).aggregate(G, ListUpdates(updates, G, round_=3))
    expected = torch.tensor([1.0 + 1.2 / 2, 1.0 + 1.6 / 2, 1.0 + 0.5, 1.0])
    assert torch.allclose(out["w"], expected, atol=1e-6), out["w"]
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # counters: FedAvg's value


def test_the_aggregator_clips_even_an_update_the_device_did_not_clip():
    huge = [update("a", [1e6, 0.0, 0.0, 0.0])]
    out = private(0.0, 0.5).aggregate(G, ListUpdates(huge, G, round_=3))
    assert torch.allclose(out["w"], torch.tensor([1.5, 1.0, 1.0, 1.0]))


def test_the_noise_has_std_sigma_times_clip_over_n_and_is_keyed():
    big = {"w": torch.zeros(200_000)}
    zero = [
        Update(f"d{i}", 1, {"w": torch.zeros(200_000)}, 5, big) for i in range(4)
    ]  # every delta 0: the result is the noise / n
    sigma, clip, n = 1.5, 2.0, 4
    out = private(sigma, clip).aggregate(big, ListUpdates(zero, big, round_=5))["w"]
    std = float(out.double().std())
    print(f"noise std {std:.5f}, expected {sigma * clip / n:.5f}")
    assert abs(std - sigma * clip / n) < 0.01 * sigma * clip / n
    assert abs(float(out.double().mean())) < 5 * sigma * clip / n / math.sqrt(out.numel())
    again = private(sigma, clip).aggregate(big, ListUpdates(zero, big, round_=5))["w"]
    other_round = private(sigma, clip).aggregate(big, ListUpdates(zero, big, round_=6))["w"]
    other_key = private(sigma, clip, key=bytes(32)).aggregate(
        big, ListUpdates(zero, big, round_=5)
    )["w"]
    assert torch.equal(out, again)  # a resumed run adds the same noise
    assert not torch.equal(out, other_round) and not torch.equal(out, other_key)


def test_privacy_composes_only_with_sums_and_names_its_keys():
    with pytest.raises(StrategyError, match=r"\[privacy\] works with strategy fedavg or fedprox"):
        strategies.build({"name": "median"}, {"noise_multiplier": 1.0, "clip_norm": 1.0})
    with pytest.raises(StrategyError, match=r"\[privacy\] needs noise_multiplier"):
        strategies.build({}, {"clip_norm": 1.0})
    with pytest.raises(StrategyError, match=r"\[privacy\] clip_norm must be > 0"):
        strategies.build({}, {"noise_multiplier": 1.0, "clip_norm": 0})
    with pytest.raises(StrategyError, match=r"\[privacy\] key\(s\) sigma mean nothing"):
        strategies.build({}, {"noise_multiplier": 1.0, "clip_norm": 1.0, "sigma": 2})
    prox = strategies.build({"name": "fedprox", "mu": 0.1}, {"noise_multiplier": 1, "clip_norm": 3})
    assert prox.plan(1, (), 0).train == {"proximal_mu": 0.1, "dp_clip": 3.0}


def test_the_device_clips_its_update_when_the_round_asks():
    g = {"w": torch.zeros(3), "n": torch.tensor(1)}
    trained = {"w": torch.tensor([3.0, 0.0, 4.0]), "n": torch.tensor(7)}
    sent = TrainingHooks.from_settings({"dp_clip": 1.0}).finish(g, trained)
    assert torch.allclose(sent["w"], torch.tensor([0.6, 0.0, 0.8])) and int(sent["n"]) == 7
    assert TrainingHooks.from_settings({}).finish(g, trained) is trained
    assert clip_update(g, trained, 10.0)["w"] is trained["w"]


def test_epsilon_is_the_accountants_after_every_round():
    strategy = private(1.1, 1.0, fraction=0.5)
    reports = [strategy.privacy_report(t) for t in (1, 5, 10)]
    assert [r["sampling_rate"] for r in reports] == [0.5] * 3
    for r in reports:
        assert r["epsilon"] == accountant.epsilon(1.1, 0.5, r["rounds"], 1e-5)
    assert reports[0]["epsilon"] < reports[1]["epsilon"] < reports[2]["epsilon"]


def test_noise_never_leaves_a_batchnorm_variance_negative():
    """sigma*C/n noise on a variance near 0 would make it negative and the model NaN."""
    g = {"bn.running_var": torch.full((1000,), 1e-3), "w": torch.zeros(1000)}
    ups = [Update(f"d{i}", 1, {k: v.clone() for k, v in g.items()}, 2, g) for i in range(2)]
    out = private(1.0, 1.0).aggregate(g, ListUpdates(ups, g, round_=2))
    assert float(out["bn.running_var"].min()) == 0.0  # clamped, not negative
    assert float(out["w"].min()) < 0  # the weights keep their noise
