"""The poisoned updates of device_agent/attacks.py, on hand-checked numbers, and the demo's
choice of attackers and strategy parameters (fedmq/demo/attacks.py)."""

from __future__ import annotations

import math

import pytest
import torch

from broker.errors import ConfigError, FedmqError
from device_agent.attacks import (
    DEFAULT_SCALES,
    KINDS,
    Attacker,
    delta_norm,
    expected_gaussian_norm,
    poison,
)
from fedmq.demo.attacks import (
    attacker_count,
    choose_attackers,
    parse_strategy_params,
    plan_attack,
    robust_defaults,
    strategy_table,
)

# g = global, w = trained: delta = w - g is [3, 0] on "w" and [-4] on "b", so ||delta|| = 5;
# "n" is an integer buffer (BatchNorm's num_batches_tracked)
G = {
    "w": torch.tensor([1.0, 2.0]),
    "b": torch.tensor([0.5]),
    "n": torch.tensor(7, dtype=torch.int64),
}
W = {
    "w": torch.tensor([4.0, 2.0]),
    "b": torch.tensor([-3.5]),
    "n": torch.tensor(9, dtype=torch.int64),
}


def test_delta_norm_is_over_floating_tensors_only():
    assert delta_norm(W, G) == 5.0  # the int counter (9 - 7) is not part of it


def test_sign_flip_sends_g_minus_s_delta():
    out = poison("sign_flip", G, W, 2.0)
    assert out["w"].tolist() == [1.0 - 6.0, 2.0]  # 1 - 2*3, 2 - 2*0
    assert out["b"].tolist() == [0.5 + 8.0]  # 0.5 - 2*(-4)
    assert out["n"].item() == 9 and out["n"].dtype == torch.int64  # passes through as trained


def test_scale_sends_g_plus_s_delta():
    out = poison("scale", G, W, 3.0)
    assert out["w"].tolist() == [10.0, 2.0]  # 1 + 3*3
    assert out["b"].tolist() == [-11.5]  # 0.5 + 3*(-4)
    assert out["n"].item() == 9
    same = poison("scale", G, W, 1.0)  # S = 1: the honest update
    assert all(torch.equal(same[k], W[k]) for k in W)


def test_constant_sends_s_in_every_weight():
    out = poison("constant", G, W, -0.25)
    assert out["w"].tolist() == [-0.25, -0.25] and out["b"].tolist() == [-0.25]
    assert out["n"].item() == 9
    assert out["w"].dtype == torch.float32


def test_noise_has_the_stated_expected_norm_and_is_seeded():
    big = {"w": torch.zeros(400), "b": torch.zeros(100)}
    trained = {"w": torch.full((400,), 0.1), "b": torch.zeros(100)}  # ||delta|| = sqrt(4) = 2
    assert delta_norm(trained, big) == pytest.approx(2.0)
    norms = []
    for seed in range(200):
        out = poison("noise", big, trained, 3.0, seed=seed)
        norms.append(delta_norm(out, big))
    mean = sum(norms) / len(norms)
    # E||z|| = 6; the chi distribution's spread in 500 dimensions is about 6 / sqrt(1000),
    # so the mean of 200 draws is within 1 % of 6 with room to spare
    assert mean == pytest.approx(6.0, rel=0.01)
    a = poison("noise", big, trained, 3.0, seed=1)
    b = poison("noise", big, trained, 3.0, seed=1)
    c = poison("noise", big, trained, 3.0, seed=2)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    # centred on g, not on w: the mean of many draws comes back to the global model
    mean_w = sum(poison("noise", big, trained, 3.0, seed=s)["w"] for s in range(200)) / 200
    assert mean_w.abs().mean() < 0.05


def test_expected_gaussian_norm():
    assert expected_gaussian_norm(1) == pytest.approx(math.sqrt(2 / math.pi))  # E|z|
    assert expected_gaussian_norm(2) == pytest.approx(math.sqrt(math.pi / 2))  # Rayleigh mean
    assert expected_gaussian_norm(10_000) == pytest.approx(math.sqrt(10_000 - 0.5), rel=1e-6)


def test_inputs_are_not_modified_and_unknown_kinds_refused():
    before = {k: v.clone() for k, v in W.items()}
    for kind in KINDS:
        poison(kind, G, W, DEFAULT_SCALES[kind], seed=0)
    assert all(torch.equal(W[k], before[k]) for k in W)
    with pytest.raises(ConfigError, match="attack must be one of"):
        poison("flip", G, W, 1.0)
    with pytest.raises(ConfigError, match="finite"):
        poison("scale", G, W, math.inf)


def test_attacker_hook_is_deterministic_per_device_and_model():
    hook = Attacker.create("noise", None, "watch-3")
    assert hook.scale == DEFAULT_SCALES["noise"]
    assert torch.equal(hook(G, W)["w"], hook(G, W)["w"])
    other = Attacker.create("noise", None, "watch-4")
    assert not torch.equal(hook(G, W)["w"], other(G, W)["w"])
    assert "g - 4*delta" in Attacker.create("sign_flip", 4, "x").describe()


def test_cli_lists_the_same_attack_kinds():
    from fedmq.cli import ATTACK_KINDS

    assert ATTACK_KINDS == KINDS


# ------------------------------------------------------------------ the demo's choices


def test_attacker_count():
    assert attacker_count(10, 0.2) == 2
    assert attacker_count(10, 0.0) == 0
    assert attacker_count(10, 0.29) == 2
    assert attacker_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert attacker_count(3, 0.2) == 1  # above 0: at least one
    for bad in (-0.1, 0.5, 0.7, math.nan):
        with pytest.raises(ConfigError, match="0 <= F < 0.5"):
            attacker_count(10, bad)
    with pytest.raises(ConfigError, match="not a minority"):
        attacker_count(2, 0.1)


def test_attackers_are_chosen_from_the_seed():
    a = choose_attackers(10, 2, seed=0)
    assert a == choose_attackers(10, 2, seed=0) and len(set(a)) == 2
    assert all(0 <= k < 10 for k in a) and list(a) == sorted(a)
    assert len({choose_attackers(10, 2, seed=s) for s in range(10)}) > 3


def test_plan_attack():
    assert plan_attack(None, 10, None, None, 0) is None
    plan = plan_attack("sign_flip", 10, None, None, 0)
    assert plan.scale == DEFAULT_SCALES["sign_flip"] and len(plan.attackers) == 2
    assert plan_attack("scale", 10, 0.3, 2.5, 0).scale == 2.5
    with pytest.raises(ConfigError, match="--attack must be one of"):
        plan_attack("flip", 10, None, None, 0)
    with pytest.raises(ConfigError, match="need --attack"):
        plan_attack(None, 10, 0.2, None, 0)


def test_parse_strategy_params():
    table = parse_strategy_params(["f=2", "beta=0.25", "mode=fast", "on=true"])
    assert table == {"f": 2, "beta": 0.25, "mode": "fast", "on": True}
    assert isinstance(table["f"], int)
    for bad in ("f", "=2", "name=median"):
        with pytest.raises(ConfigError):
            parse_strategy_params([bad])


def test_robust_defaults_follow_the_attackers():
    assert robust_defaults("trimmed_mean", 10, 2) == {"beta": 0.2}
    assert robust_defaults("multi_krum", 10, 2) == {"f": 2}
    assert robust_defaults("bulyan", 10, 2) == {"f": 1}  # n >= 4f + 3 allows no more
    assert robust_defaults("bulyan", 11, 2) == {"f": 2}
    assert robust_defaults("median", 10, 2) == {}
    assert robust_defaults("multi_krum", 10, 0) == {}


def test_strategy_table_is_validated():
    assert strategy_table(None, {}, 10, 2) == {}
    assert strategy_table("median", {}, 10, 2) == {"name": "median"}
    assert strategy_table("trimmed_mean", {"beta": 0.3}, 10, 2) == {
        "name": "trimmed_mean",
        "beta": 0.3,
    }
    with pytest.raises(FedmqError, match=r"\[strategy\] name"):
        strategy_table("medain", {}, 10, 2)
    with pytest.raises(FedmqError, match="nope"):
        strategy_table("median", {"nope": 1}, 10, 2)
    with pytest.raises(ConfigError, match="needs --strategy"):
        strategy_table(None, {"f": 1}, 10, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attack", "scale", "--attackers", "0.5"], "0 <= F < 0.5"),
        (["--attack", "scale", "--attackers", "-0.1"], "0 <= F < 0.5"),
        (["--attack", "flip"], "'flip' is not one of"),
        (["--strategy", "medain"], "[strategy] name must be one of"),
        (["--strategy", "median", "--strategy-param", "beta=0.2"], "beta"),
        (["--strategy-param", "f=1"], "needs --strategy"),
        (["--attack-scale", "2"], "need --attack"),
        (["--attack", "scale", "--devices", "2"], "not a minority"),
    ],
)
def test_demo_refuses_bad_attack_and_strategy_options_before_starting(tmp_path, args, message):
    from click.testing import CliRunner

    from fedmq.cli import main

    result = CliRunner().invoke(main, ["demo", "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code in (1, 2), result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing was started


def test_demo_help_documents_the_default_scales():
    from click.testing import CliRunner

    from fedmq.cli import main

    text = " ".join(CliRunner().invoke(main, ["demo", "--help"]).output.split())
    for kind, scale in DEFAULT_SCALES.items():
        assert f"{kind} {scale:g}" in text


def test_the_device_side_imports_nothing_of_the_aggregator_or_the_cli():
    """An attacker is an ordinary agent: device_agent (attacks included) stands on broker/."""
    import subprocess
    import sys

    code = (
        "import sys, device_agent.agent, device_agent.attacks; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fedmq', 'aggregator'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
