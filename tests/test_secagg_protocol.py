"""SecAgg+ between SecureClients and a SecureRound, every message through its wire
format (signed, parsed), without a broker: the sum equals FedAvg's within the
quantization error, with and without dropouts; nothing unmasks one device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.secure_round import SecureFailure
from broker.errors import CodecError
from broker.secagg import quantize
from device_agent.secure_client import Refused
from tests.secagg_sim import Fleet, decode, fedavg, plan_for, run_round


def _updates(n: int, size: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(size, generator=g), "b": torch.randn(7, generator=g)}
    ids = [f"dev{i:02d}" for i in range(n)]
    trained = {
        d: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for d in ids
    }
    samples = {d: 50 + 37 * i for i, d in enumerate(ids)}
    return ids, base, trained, samples


def _bound(n: int, clip: float = 1.0, max_weight: int = 10_000, survivors: int | None = None):
    """Worst-case error of the weighted mean from quantization: each device rounds each
    coordinate by at most one step, and the sum is divided by Σ a_i."""
    step = 2 * clip / quantize.levels_for(n)
    return step * (survivors or n)


def test_secure_sum_equals_fedavg_within_quantization() -> None:
    ids, base, trained, samples = _updates(10)
    fleet = Fleet(ids)
    out = run_round(fleet, base, trained, samples)
    weights, total_samples = out.server.result()
    expected = fedavg(base, trained, samples, ids)
    weight_sum = sum(samples.values()) / 10_000
    tol = _bound(10) / weight_sum * 2
    for k in base:
        err = (weights[k].to(torch.float64) - expected[k]).abs().max().item()
        assert err <= tol, (k, err, tol)
        assert err > 0  # it is quantized: an exact match would mean nothing was
    assert abs(total_samples - sum(samples.values())) < 1e-3 * sum(samples.values())


def test_thirty_percent_dropout_after_sharing_equals_fedavg_over_survivors() -> None:
    ids, base, trained, samples = _updates(10, seed=1)
    dropped = {"dev02", "dev05", "dev09"}
    out = run_round(Fleet(ids), base, trained, samples, drop_after_shares=dropped)
    survivors = [d for d in ids if d not in dropped]
    assert out.server.survivors == tuple(survivors)
    assert set(out.server.dropped) == dropped
    weights, _ = out.server.result()
    expected = fedavg(base, trained, samples, survivors)
    weight_sum = sum(samples[d] for d in survivors) / 10_000
    for k in base:
        err = (weights[k].to(torch.float64) - expected[k]).abs().max().item()
        assert err <= _bound(10, survivors=7) / weight_sum * 2, (k, err)
    # the aggregator rebuilt the mask keys of exactly the dropped devices, b of the others
    assert set(out.server.s_shares) <= dropped and set(out.server.b_shares) == set(survivors)


def test_no_masked_input_reveals_its_device_update() -> None:
    """Every masked input is indistinguishable from uniform noise and uncorrelated with
    its device's true (quantized) vector."""
    ids, base, trained, samples = _updates(8, size=2000, seed=2)
    out = run_round(Fleet(ids), base, trained, samples)
    for payload in out.wire:
        msg = decode(payload, out.server.length) if b'"masked"' in payload[:200] else None
        if msg is None or msg.kind != "masked":
            continue
        masked = msg.tensors["masked"].numpy().view(np.uint32).astype(np.float64)
        d = msg.device_id
        true = np.concatenate(
            [(trained[d][k] - base[k]).to(torch.float64).reshape(-1).numpy() for k in sorted(base)]
        )
        r = np.corrcoef(masked[:-1], true)[0, 1]
        assert abs(r) < 5 / np.sqrt(true.size)  # chance level (5 sigma)
        assert abs(masked.mean() / 2**32 - 0.5) < 0.05  # uniform: 7.7 sigma


def test_fewer_than_t_survivors_answering_fails_and_unmasks_nothing() -> None:
    ids, base, trained, samples = _updates(10, seed=3)
    silent = set(ids[:8])  # only two survivors reveal: below every device's threshold
    out = run_round(Fleet(ids), base, trained, samples, silent_at_unmask=silent)
    assert out.server.missing()
    with pytest.raises(SecureFailure, match=r"fewer than t survivors answered\); nothing was"):
        out.server.result()


def test_device_refuses_to_reveal_the_key_of_a_device_that_sent_its_input() -> None:
    ids, base, trained, samples = _updates(6, seed=4)
    out = run_round(Fleet(ids), base, trained, samples, unmask=False)
    server = out.server
    victim = ids[0]
    # a lying aggregator leaves the victim out of the survivors, to get its mask key
    server.survivors = tuple(d for d in ids if d != victim)
    lie = server._encode("unmask", {"survivors": list(server.survivors)})
    neighbour = next(d for d in server.survivors if victim in server.neighbours[d])
    with pytest.raises(Refused, match=f"mask key of {victim}, whose receipt says it sent"):
        out.clients[neighbour].on_unmask(decode(lie))


def test_device_refuses_a_roster_with_a_substituted_key() -> None:
    """The aggregator cannot swap in keys of its own: advertisements carry the device's
    signature, checked with its registry-certified key."""
    from broker.secagg import keys, wire

    ids, base, *_ = _updates(5, seed=5)
    fleet = Fleet(ids)
    plan = plan_for(5)
    server = fleet.aggregator_round(plan, 1, "h" * 64, base)
    clients = {d: fleet.client(d, plan, 1, "h" * 64) for d in ids}
    for c in clients.values():
        server.take_keys(decode(c.keys_message()))
    victim = server.advertised[ids[1]]
    forged = dict(victim.metadata, s_pk=wire.b64(keys.KeyPair.generate().public))
    server.advertised[ids[1]] = wire.parse_keys(
        wire.SecureMessage("keys", 1, plan.session, "", "", ids[1], forged)
    )
    roster = decode(server.roster_message())
    with pytest.raises(Refused, match="signature does not match"):
        clients[ids[0]].on_roster(roster)


def test_a_bad_share_is_stepped_around_when_spares_exist() -> None:
    ids, base, trained, samples = _updates(10, seed=6)
    out = run_round(Fleet(ids), base, trained, samples)
    server = out.server
    victim = server.survivors[0]
    shares = server.b_shares[victim]
    assert len(shares) > server.threshold  # spares exist
    first = min(shares)
    shares[first] = (shares[first] + 1) % (2**521 - 1)  # a lying neighbour
    weights, _ = server.result()  # still unmasks, around the bad share
    expected = fedavg(base, trained, samples, ids)
    assert (weights["w"].double() - expected["w"]).abs().max() < 1e-3


def test_masked_input_after_the_survivors_are_named_is_refused() -> None:
    ids, base, trained, samples = _updates(5, seed=7)
    out = run_round(Fleet(ids), base, trained, samples, drop_after_shares={ids[2]})
    late = out.clients[ids[2]]
    vector = late.masked_vector(base, trained[ids[2]], samples[ids[2]])
    payload = late.masked_message(vector, {})
    with pytest.raises(CodecError, match="after the survivors"):
        out.server.take_masked(decode(payload, out.server.length), len(payload))


def test_upload_overhead_is_small() -> None:
    ids, base, trained, samples = _updates(20, size=20_000, seed=8)
    out = run_round(Fleet(ids), base, trained, samples)
    plain = 4 * sum(v.numel() for v in base.values())
    worst = max(out.upload_bytes.values())
    assert worst / plain < 1.3, worst / plain


def test_dp_noise_added_in_shares_sums_to_sigma_times_clip():
    """Each of n' devices adds N(0, (sigma C / sqrt(n'))^2): the sum carries sigma C, and
    nobody but the sum ever held noise enough to hide it (each share is 1/sqrt(n'))."""
    n, sigma, clip = 10, 1.5, 0.2
    ids, base, _, _ = _updates(n, size=20_000, seed=9)
    same = {d: {k: v.clone() for k, v in base.items()} for d in ids}  # zero deltas
    plan = plan_for(n, clip=4.0, max_weight=1, noise=sigma * clip / n**0.5)
    out = run_round(Fleet(ids), base, same, dict.fromkeys(ids, 5), plan=plan)
    weights, samples = out.server.result()
    assert abs(samples - n) < 1e-6  # max_weight 1: every device counts the same
    noise_sum = (weights["w"].double() - base["w"].double()) * n  # mean * n = the sum
    std = float(noise_sum.std())
    print(f"noise std of the sum {std:.4f}, expected sigma*C = {sigma * clip:.4f}")
    assert abs(std - sigma * clip) < 0.03 * sigma * clip


def test_epsilon_with_dropouts_counts_the_noise_the_survivors_made():
    from aggregator import strategies
    from aggregator.privacy import accountant

    s = strategies.build({}, {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5})
    nominal = s.privacy_report(3)["epsilon"]
    assert nominal == accountant.epsilon(1.0, 1.0, 3, 1e-5)  # the library's own figure
    # composing three equal rounds one by one is the library's self-composition
    assert abs(accountant.epsilon_of_rounds([1.0] * 3, 1.0, 1e-5) - nominal) < 1e-9
    for r in (1, 2, 3):
        s.note_secure_round(r, survivors=10, selected=10)
    assert abs(s.privacy_report(3)["epsilon"] - nominal) < 1e-9
    s.note_secure_round(3, survivors=7, selected=10)  # 30% dropped in round 3
    worse = s.privacy_report(3)["epsilon"]
    expected = accountant.epsilon_of_rounds([1.0, 1.0, 0.7**0.5], 1.0, 1e-5)
    assert worse == expected and worse > nominal
    restored = strategies.build({}, {"noise_multiplier": 1.0, "clip_norm": 1.0})
    restored.load_state(s.state())  # the effective noise survives a resume
    assert restored.privacy_report(3)["epsilon"] == worse


def test_integer_buffers_come_out_as_fedavg_rounds_them():
    """BatchNorm's batch counter grows by dozens a round, far outside the weights' range."""
    ids, base, trained, samples = _updates(5, seed=10)
    base["count"] = torch.tensor(100)
    for i, d in enumerate(ids):
        trained[d]["count"] = torch.tensor(100 + 30 + i)  # batches trained this round
    # weights near 1: the counters' weighted deltas (~30) are far beyond clip 1.0
    out = run_round(Fleet(ids), base, trained, samples, plan=plan_for(5, max_weight=200))
    weights, _ = out.server.result()
    expected = fedavg(base, trained, samples, ids)["count"]
    assert weights["count"].dtype == torch.int64
    assert int(weights["count"]) == int(expected.round()), (weights["count"], expected)
