"""The device side of strategies: the round's plan on the wire and the training hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from broker import messages
from broker.errors import CodecError
from broker.task import ModelSpec, TaskSpec, TrainSpec
from broker.zoo import build_model
from device_agent.hooks import TrainingHooks
from device_agent.trainer import train_local

TASK = TaskSpec(model=ModelSpec("mlp", {"in_features": 4, "out_features": 3, "hidden": [8]}))


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(64, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1).astype(np.int64)
    return X, y


def _distance(a: torch.nn.Module, b: dict) -> float:
    return sum(float(((p - b[n]) ** 2).sum()) for n, p in a.state_dict().items()) ** 0.5


def test_the_plan_travels_signed_in_the_model_and_is_read_back():
    model = build_model(TASK.model)
    plan = {"selected": ["b", "a"], "train": {"proximal_mu": 0.5}}
    payload, _ = messages.encode_model(model.state_dict(), 3, TASK, plan=plan)
    msg = messages.decode_model(payload)
    assert msg.selected == ("b", "a") and msg.train_settings == {"proximal_mu": 0.5}
    assert msg.selects("a") and not msg.selects("c")
    plain = messages.decode_model(messages.encode_model(model.state_dict(), 3, TASK)[0])
    assert plain.selected is None and plain.selects("anyone") and plain.train_settings == {}


@pytest.mark.parametrize(
    "plan",
    [
        "[1, 2]",
        '{"selected": "a"}',
        '{"selected": [1]}',
        '{"train": {"mu": "x"}}',
        '{"train": {"mu": NaN}}',
        '{"other": 1}',
        json.dumps({"train": {f"k{i}": 1 for i in range(17)}}),
        json.dumps({"selected": ["d" * 100] * 6000}),
        "[" * 100_000,
    ],
)
def test_a_malformed_plan_is_refused_as_bad_metadata(plan):
    with pytest.raises(CodecError) as err:
        messages.parse_plan(plan)
    assert err.value.reason == "bad_metadata"


def test_a_device_refuses_a_training_setting_it_does_not_know():
    with pytest.raises(CodecError, match="clip_and_noise") as err:
        TrainingHooks.from_settings({"clip_and_noise": 1.0})
    assert err.value.reason == "unknown_setting"
    assert TrainingHooks.from_settings({"proximal_mu": 0.1}).proximal_mu == 0.1


def test_the_proximal_term_keeps_the_local_model_near_the_global_one():
    X, y = _data()
    train = TrainSpec(epochs=5, batch_size=16, lr=0.1)
    start = build_model(TASK.model, seed=1)
    global_weights = {k: v.clone() for k, v in start.state_dict().items()}
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        model = build_model(TASK.model, seed=1)
        train_local(model, X, y, train, seed=7, hooks=TrainingHooks(proximal_mu=mu))
        distances[mu] = _distance(model, global_weights)
    print("distance from the global model by mu:", distances)
    assert distances[0.0] > distances[1.0] > distances[10.0] > 0


def test_mu_zero_trains_exactly_as_without_hooks():
    X, y = _data(1)
    train = TrainSpec(epochs=2, batch_size=16, lr=0.1)
    a, b = build_model(TASK.model, seed=2), build_model(TASK.model, seed=2)
    train_local(a, X, y, train, seed=3)
    train_local(b, X, y, train, seed=3, hooks=TrainingHooks(proximal_mu=0.0))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name])
