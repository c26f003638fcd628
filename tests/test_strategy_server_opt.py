"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad): hand-worked steps, agreement with
torch.optim over several rounds, bit-identical resume from their state, parameter checks.

Pure: no broker. The round's updates are a plain list of ``Update`` in device-id order
(``aggregate`` only iterates over them)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aggregator.strategies import STRATEGIES, StrategyError, build
from aggregator.strategies.base import Update
from aggregator.strategies.server_opt import (
    adam_second_moment,
    adaptive_step,
    fedadagrad_step,
    fedavgm_step,
    pseudo_gradient,
    yogi_second_moment,
)

F64 = torch.float64


def t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def updates(global_weights, models):
    """``models``: {device: (num_samples, tensors)} -> the round's updates in device-id order."""
    return [
        Update(device, n, tensors, 0, global_weights)
        for device, (n, tensors) in sorted(models.items())
    ]


def close(a, b, **tol):
    return all(torch.allclose(a[k], b[k], **tol) for k in b) and set(a) == set(b)


# -- hand-worked steps ---------------------------------------------------------------------------


def two_devices():
    """Devices a (1 sample) and b (3 samples) that always return the same models: their
    weighted mean is w = [1.5, 5.0], b = 1.25 whatever the global model."""
    return {
        "a": (1, {"w": t(0.0, 2.0), "b": t(0.5)}),
        "b": (3, {"w": t(2.0, 6.0), "b": t(1.5)}),
    }


def test_pseudo_gradient_is_global_minus_the_weighted_mean():
    g = {"w": t(1.0, 2.0), "b": t(0.5)}
    avg = build({"name": "fedavg"}).aggregate(g, updates(g, two_devices()))
    assert torch.equal(avg["w"], t(1.5, 5.0)) and torch.equal(avg["b"], t(1.25))
    grad = pseudo_gradient(g, avg)
    assert torch.equal(grad["w"], t(-0.5, -3.0)) and torch.equal(grad["b"], t(-0.75))


def test_fedavgm_two_rounds_by_hand():
    s = build({"name": "fedavgm", "server_lr": 0.5, "momentum": 0.9})
    g = {"w": t(1.0, 2.0), "b": t(0.5)}
    # round 1: grad = [-0.5, -3], -0.75; buf = grad; w = g - 0.5 buf
    g = s.aggregate(g, updates(g, two_devices()))
    assert close(g, {"w": t(1.25, 3.5), "b": t(0.875)}, rtol=0, atol=1e-15)
    # round 2: grad = [-0.25, -1.5], -0.375; buf = 0.9 [-0.5, -3] + grad = [-0.7, -4.2], -1.05
    g = s.aggregate(g, updates(g, two_devices()))
    assert close(g, {"w": t(1.6, 5.6), "b": t(1.4)}, rtol=0, atol=1e-14)
    assert torch.allclose(s.state()["m/w"], t(-0.7, -4.2), rtol=0, atol=1e-15)
    assert int(s.state()["step"]) == 2


def test_fedadam_first_step_by_hand_with_and_without_bias_correction():
    g = {"w": t(1.0, 2.0), "b": t(0.5)}
    table = {"name": "fedadam", "eta": 0.1, "beta1": 0.9, "beta2": 0.999, "tau": 1e-3}
    corrected = build(table).aggregate(g, updates(g, two_devices()))
    # m_hat = grad, v_hat = grad^2: w - eta grad / (|grad| + tau)
    expected = {
        "w": t(1.0 + 0.1 * 0.5 / (0.5 + 1e-3), 2.0 + 0.1 * 3.0 / (3.0 + 1e-3)),
        "b": t(0.5 + 0.1 * 0.75 / (0.75 + 1e-3)),
    }
    assert close(corrected, expected, rtol=1e-13, atol=0)
    # Algorithm 2: m = 0.1 grad, sqrt(v) = sqrt(0.001) |grad|: steps sqrt(10) times longer
    plain = build({**table, "bias_correction": False}).aggregate(g, updates(g, two_devices()))
    r = 0.001**0.5
    expected = {
        "w": t(1.0 + 0.1 * 0.05 / (r * 0.5 + 1e-3), 2.0 + 0.1 * 0.3 / (r * 3.0 + 1e-3)),
        "b": t(0.5 + 0.1 * 0.075 / (r * 0.75 + 1e-3)),
    }
    assert close(plain, expected, rtol=1e-13, atol=0)


def test_fedyogi_two_steps_by_hand():
    """beta1 = 0.5, beta2 = 0.75, eta = tau = 1, no bias correction, grads [2, -1] then [0.5, -3].
    Step 1: m = [1, -0.5], v = 0.25 g^2 = [1, 0.25]. Step 2: m = [0.75, -1.75];
    v[0] = 1 - 0.25*0.25 (v > g^2) = 0.9375, v[1] = 0.25 + 0.25*9 (v < g^2) = 2.5
    (Adam's would be 0.8125 and 2.4375)."""
    kw = dict(
        second_moment=yogi_second_moment,
        eta=1.0,
        beta1=0.5,
        beta2=0.75,
        tau=1.0,
        bias_correction=False,
    )
    w0 = {"w": t(0.0, 0.0)}
    w1, m, v = adaptive_step(w0, {"w": t(2.0, -1.0)}, {}, {}, 1, **kw)
    assert torch.equal(m["w"], t(1.0, -0.5)) and torch.equal(v["w"], t(1.0, 0.25))
    assert torch.allclose(w1["w"], t(-0.5, 0.5 / 1.5), rtol=0, atol=1e-16)
    w2, m, v = adaptive_step(w1, {"w": t(0.5, -3.0)}, m, v, 2, **kw)
    assert torch.equal(m["w"], t(0.75, -1.75)) and torch.equal(v["w"], t(0.9375, 2.5))
    expected = t(-0.5 - 0.75 / (0.9375**0.5 + 1), 0.5 / 1.5 + 1.75 / (2.5**0.5 + 1))
    assert torch.allclose(w2["w"], expected, rtol=0, atol=1e-15)
    assert torch.equal(adam_second_moment(t(1.0, 0.25), t(0.25, 9.0), 0.75), t(0.8125, 2.4375))


def test_fedadagrad_two_steps_by_hand():
    """eta = tau = 1, grads [3, -4] then [4, 0]: v = [9, 16] then [25, 16]."""
    w1, v = fedadagrad_step({"w": t(0.0, 0.0)}, {"w": t(3.0, -4.0)}, {}, eta=1.0, tau=1.0)
    assert torch.equal(v["w"], t(9.0, 16.0)) and torch.equal(w1["w"], t(-0.75, 0.8))
    w2, v = fedadagrad_step(w1, {"w": t(4.0, 0.0)}, v, eta=1.0, tau=1.0)
    assert torch.equal(v["w"], t(25.0, 16.0))
    assert torch.allclose(w2["w"], t(-0.75 - 4 / 6, 0.8), rtol=0, atol=1e-16)


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg_bit_for_bit():
    torch.manual_seed(0)
    g = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    server_opt = build({"name": "fedavgm", "server_lr": 1.0, "momentum": 0.0})
    fedavg = build({"name": "fedavg"})
    for _ in range(3):
        models = {
            device: (n, {k: v + torch.randn_like(v) for k, v in g.items()})
            for device, n in [("x", 3), ("y", 7), ("z", 1)]
        }
        stepped = server_opt.aggregate(g, updates(g, models))
        averaged = fedavg.aggregate(g, updates(g, models))
        assert all(torch.equal(stepped[k], averaged[k]) for k in g)
        assert all(stepped[k].dtype == torch.float32 for k in g)
        g = stepped


def test_clip_norm_applies_before_the_step():
    g = {"w": t(0.0, 0.0)}
    models = {"a": (1, {"w": t(3.0, 4.0)}), "b": (1, {"w": t(0.0, 0.0)})}  # a's delta: norm 5
    s = build({"name": "fedavgm", "momentum": 0.0, "server_lr": 2.0, "clip_norm": 1.0})
    out = s.aggregate(g, updates(g, models))
    # a clipped to [0.6, 0.8]; mean [0.3, 0.4]; grad [-0.3, -0.4]; w = 0 - 2 grad
    assert torch.allclose(out["w"], t(0.6, 0.8), rtol=0, atol=1e-15)


# -- agreement with torch.optim over rounds -------------------------------------------------------

DEVICES = [("d0", 5), ("d1", 2), ("d2", 9)]


def simulate(table, rounds=5, dtype=F64, seed=7):
    """A federation of three devices whose models are the global one plus seeded noise; yields
    (global before, the round's device models, global after) for each round."""
    gen = torch.Generator().manual_seed(seed)
    g = {
        "w": torch.randn(3, 2, generator=gen, dtype=dtype),
        "b": torch.randn(2, generator=gen, dtype=dtype),
        "bn.num_batches_tracked": torch.tensor(4, dtype=torch.int64),
    }
    strategy = build(table)
    for r in range(rounds):
        models = {}
        for i, (device, n) in enumerate(DEVICES):
            tensors = {
                "w": g["w"] + 0.3 * torch.randn(3, 2, generator=gen, dtype=dtype),
                "b": g["b"] + 0.3 * torch.randn(2, generator=gen, dtype=dtype),
                "bn.num_batches_tracked": torch.tensor(4 + 10 * (r + 1) + i, dtype=torch.int64),
            }
            models[device] = (n, tensors)
        new = strategy.aggregate(g, updates(g, models))
        yield g, models, new
        g = new


def reference_grad(params, models):
    """The pseudo-gradient written out: current params minus the sample-weighted mean."""
    total = sum(n for n, _ in models.values())
    return {
        k: p.detach() - sum(n * m[k].to(F64) for n, m in models.values()) / total
        for k, p in params.items()
    }


TORCH_CASES = [
    ({"name": "fedavgm"}, lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)),
    (
        {"name": "fedavgm", "server_lr": 0.3, "momentum": 0.5},
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5),
    ),
    ({"name": "fedadam"}, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-3)),
    (
        {"name": "fedadam", "eta": 0.2, "beta1": 0.5, "beta2": 0.9, "tau": 1e-6},
        lambda p: torch.optim.Adam(p, lr=0.2, betas=(0.5, 0.9), eps=1e-6),
    ),
    ({"name": "fedadagrad"}, lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-3)),
    (
        {"name": "fedadagrad", "eta": 0.5, "tau": 1e-8},
        lambda p: torch.optim.Adagrad(p, lr=0.5, eps=1e-8),
    ),
]


@pytest.mark.parametrize("table, make_optimizer", TORCH_CASES, ids=lambda c: str(c))
def test_agrees_with_torch_optim_over_five_rounds(table, make_optimizer):
    params = None
    for g, models, new in simulate(table):
        if params is None:
            params = {k: g[k].clone().requires_grad_(True) for k in ("w", "b")}
            optimizer = make_optimizer(list(params.values()))
        for k, grad in reference_grad(params, models).items():
            params[k].grad = grad
        optimizer.step()
        for k in ("w", "b"):
            assert torch.allclose(new[k], params[k].detach(), rtol=1e-12, atol=1e-14), (k, table)
        counts = [m["bn.num_batches_tracked"] for _, m in models.values()]
        assert new["bn.num_batches_tracked"].dtype == torch.int64
        assert int(new["bn.num_batches_tracked"]) == round(
            sum(n * int(c) for (n, _), c in zip(models.values(), counts)) / 16
        )


def reference_adaptive(grads, *, yogi, eta, beta1, beta2, tau, bias_correction, w0):
    """Reddi et al.'s Algorithm 2 for one coordinate, in plain Python floats."""
    w, m, v, out = w0, 0.0, 0.0, []
    for step, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        if yogi:
            v = v - (1 - beta2) * g * g * (1 if v > g * g else -1 if v < g * g else 0)
        else:
            v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m, v
        if bias_correction:
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        w = w - eta * m_hat / (math.sqrt(v_hat) + tau)
        out.append(w)
    return out


@pytest.mark.parametrize("name", ["fedyogi", "fedadam"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_adaptive_strategies_follow_a_plain_reference_loop(name, bias_correction):
    """FedYogi has no torch counterpart; it (and FedAdam without bias correction) are checked
    against Algorithm 2 written coordinate by coordinate."""
    hp = {"eta": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}
    table = {"name": name, "bias_correction": bias_correction, **hp}
    history = list(simulate(table, rounds=6))
    g0 = history[0][0]
    for k in ("w", "b"):
        for idx in range(g0[k].numel()):
            # the pseudo-gradients the strategy saw, coordinate idx of tensor k
            grads = [float(reference_grad(g, models)[k].flatten()[idx]) for g, models, _ in history]
            expected = reference_adaptive(
                grads,
                yogi=name == "fedyogi",
                bias_correction=bias_correction,
                w0=float(g0[k].flatten()[idx]),
                **hp,
            )
            got = [float(new[k].flatten()[idx]) for _, _, new in history]
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_yogi_first_step_is_adams_first_step():
    yogi = [new for _, _, new in simulate({"name": "fedyogi"}, rounds=1)][0]
    adam = [new for _, _, new in simulate({"name": "fedadam"}, rounds=1)][0]
    assert all(torch.equal(yogi[k], adam[k]) for k in adam)
    yogi2 = [new for _, _, new in simulate({"name": "fedyogi"}, rounds=2)][1]
    adam2 = [new for _, _, new in simulate({"name": "fedadam"}, rounds=2)][1]
    assert not torch.equal(yogi2["w"], adam2["w"])  # the second moments part after step 1


def test_float32_model_stays_float32_and_near_the_float64_run():
    table = {"name": "fedadam", "eta": 0.05}
    f32 = list(simulate(table, dtype=torch.float32))
    for _, _, new in f32:
        assert new["w"].dtype == torch.float32 and new["b"].dtype == torch.float32
    f64 = list(simulate(table, dtype=F64))
    assert torch.allclose(f32[-1][2]["w"].double(), f64[-1][2]["w"], atol=1e-5)


# -- state: resume bit-identically ---------------------------------------------------------------

ALL = [
    {"name": "fedavgm", "server_lr": 0.7},
    {"name": "fedadam", "eta": 0.1},
    {"name": "fedadam", "eta": 0.1, "bias_correction": False},
    {"name": "fedyogi", "eta": 0.1},
    {"name": "fedadagrad"},
]


@pytest.mark.parametrize("table", ALL, ids=lambda t: str(t))
def test_state_round_trips_through_a_checkpoint_bit_for_bit(table):
    history = list(simulate(table, rounds=5))
    # a run that stopped after round 3, its state saved as a checkpoint would save it
    first = build(table)
    for g, models, _ in history[:3]:
        first.aggregate(g, updates(g, models))
    saved = st_save(first.state())
    assert int(first.state()["step"]) == 3
    assert all(v.dtype == F64 for k, v in first.state().items() if k != "step")
    resumed = build(table)
    resumed.load_state(st_load(saved))
    for g, models, new in history[3:]:
        out = resumed.aggregate(g, updates(g, models))
        assert all(torch.equal(out[k], new[k]) for k in new)  # same as the run never stopped
    assert int(resumed.state()["step"]) == 5


@pytest.mark.parametrize("table", ALL, ids=lambda t: str(t))
def test_a_fresh_strategy_has_no_state_and_accepts_none(table):
    s = build(table)
    assert s.state() == {}
    s.load_state({})
    g, models, new = next(simulate(table))
    out = s.aggregate(g, updates(g, models))
    assert all(torch.equal(out[k], new[k]) for k in new)
    keys = set(s.state())
    assert "step" in keys and not any("num_batches_tracked" in k for k in keys)


def test_state_keys_name_the_moments():
    s = build({"name": "fedadam"})
    g, models, _ = next(simulate({"name": "fedadam"}))
    s.aggregate(g, updates(g, models))
    assert set(s.state()) == {"step", "m/w", "m/b", "v/w", "v/b"}
    s = build({"name": "fedadagrad"})
    s.aggregate(g, updates(g, models))
    assert set(s.state()) == {"step", "v/w", "v/b"}


@pytest.mark.parametrize(
    "name, state, says",
    [
        ("fedadagrad", {"step": t(1, dtype=torch.int64), "m/w": t(1.0)}, "m/w"),
        ("fedadam", {"step": t(1, dtype=torch.int64), "x/w": t(1.0), "v/w": t(1.0)}, "x/w"),
        ("fedadam", {"m/w": t(1.0), "v/w": t(1.0)}, "incomplete"),  # no step
        ("fedadam", {"step": t(1, dtype=torch.int64), "m/w": t(1.0)}, "incomplete"),  # no v
        (
            "fedavgm",
            {"step": t(1, dtype=torch.int64), "m/w": t(1.0, dtype=torch.float32)},
            "float64",
        ),
        ("fedavgm", {"step": t(0.5), "m/w": t(1.0)}, "step"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(name, state, says):
    with pytest.raises(StrategyError, match=says):
        build({"name": name}).load_state(state)


def test_a_state_for_another_model_is_refused_at_the_next_round():
    s = build({"name": "fedavgm"})
    s.load_state({"step": t(2, dtype=torch.int64), "m/w": t(1.0, 2.0, 3.0), "m/b": t(0.0, 0.0)})
    g, models, _ = next(simulate({"name": "fedavgm"}))  # w is 3x2 here
    with pytest.raises(StrategyError, match="w"):
        s.aggregate(g, updates(g, models))
    assert int(s.state()["step"]) == 2  # a refused round changes nothing


def test_inputs_are_not_modified():
    table = {"name": "fedadam"}
    history = list(simulate(table, rounds=2))
    s = build(table)
    for g, models, _ in history:
        g_before = {k: v.clone() for k, v in g.items()}
        models_before = {d: {k: v.clone() for k, v in m.items()} for d, (_, m) in models.items()}
        state_before = {k: v.clone() for k, v in s.state().items()}
        held = s.state()
        s.aggregate(g, updates(g, models))
        assert all(torch.equal(g[k], g_before[k]) for k in g)
        assert all(
            torch.equal(m[k], models_before[d][k]) for d, (_, m) in models.items() for k in m
        )
        assert all(torch.equal(held[k], state_before[k]) for k in held)  # old state untouched
    buf = {"w": t(1.0, 2.0)}
    fedavgm_step({"w": t(0.0, 0.0)}, {"w": t(1.0, 1.0)}, buf, server_lr=1.0, momentum=0.5)
    assert torch.equal(buf["w"], t(1.0, 2.0))


# -- parameters ----------------------------------------------------------------------------------


def test_registered_with_their_defaults():
    assert {"fedavgm", "fedadam", "fedyogi", "fedadagrad"} <= set(STRATEGIES)
    assert build({"name": "fedavgm"}).describe() == "fedavgm(server_lr=1, momentum=0.9)"
    assert build({"name": "fedadam"}).describe() == (
        "fedadam(eta=0.01, beta1=0.9, beta2=0.99, tau=0.001, bias_correction=true)"
    )
    assert (
        build({"name": "fedyogi", "bias_correction": False})
        .describe()
        .startswith("fedyogi(eta=0.01, beta1=0.9, beta2=0.99, tau=0.001, bias_correction=false")
    )
    assert build({"name": "fedadagrad"}).describe() == "fedadagrad(eta=0.1, tau=0.001)"


@pytest.mark.parametrize(
    "table, key",
    [
        ({"name": "fedavgm", "server_lr": 0}, "server_lr"),
        ({"name": "fedavgm", "momentum": 1.0}, "momentum"),
        ({"name": "fedavgm", "momentum": -0.1}, "momentum"),
        ({"name": "fedadam", "eta": -1}, "eta"),
        ({"name": "fedadam", "beta1": 1}, "beta1"),
        ({"name": "fedadam", "beta2": 1.5}, "beta2"),
        ({"name": "fedadam", "tau": 0}, "tau"),
        ({"name": "fedadam", "bias_correction": "yes"}, "bias_correction"),
        ({"name": "fedyogi", "tau": -1e-3}, "tau"),
        ({"name": "fedyogi", "eta": "0.1"}, "eta"),
        ({"name": "fedadagrad", "eta": 0}, "eta"),
        ({"name": "fedadagrad", "tau": float("nan")}, "tau"),
        ({"name": "fedadagrad", "beta1": 0.9}, "beta1"),  # Adagrad here has no first moment
        ({"name": "fedavgm", "eta": 0.1}, "eta"),  # FedAvgM's rate is server_lr
        ({"name": "fedadam", "clip_norm": 0}, "clip_norm"),
    ],
)
def test_bad_parameters_are_refused_by_name(table, key):
    with pytest.raises(StrategyError, match=key):
        build(table)


def test_flag_takes_booleans_and_one_or_zero():
    assert build({"name": "fedadam", "bias_correction": 0}).bias_correction is False
    assert build({"name": "fedadam", "bias_correction": True}).bias_correction is True
    with pytest.raises(StrategyError, match="bias_correction"):
        build({"name": "fedadam", "bias_correction": 2})
