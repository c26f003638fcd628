"""The device's SGD and Adam: bit-for-bit torch.optim's, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from broker import zoo
from broker.task import ModelSpec, TrainSpec
from device_agent import optimizers
from device_agent.trainer import train_local

MODELS = {
    "mlp": (ModelSpec(arch="mlp", args={"in_features": 8, "hidden": [16], "out_features": 3}), 8),
    "cnn1d": (
        ModelSpec(
            arch="cnn1d",
            args={"in_channels": 6, "num_classes": 3, "channels": [4, 8], "kernel_size": 3},
        ),
        (6, 20),
    ),
}
TRAINS = {
    "sgd": TrainSpec(epochs=3, batch_size=8, lr=0.05, optimizer="sgd"),
    "sgd-momentum": TrainSpec(epochs=3, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.9),
    "adam": TrainSpec(epochs=3, batch_size=8, lr=0.01, optimizer="adam"),
}


def _torch_optimizer(params, train: TrainSpec):
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)


def _ours(params, train: TrainSpec):
    if train.optimizer == "adam":
        return optimizers.Adam(params, lr=train.lr)
    return optimizers.SGD(params, lr=train.lr, momentum=train.momentum)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(TRAINS))
def test_same_weights_as_torch_optim(arch, name):
    spec, shape = MODELS[arch]
    train = TRAINS[name]
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.normal(size=(40, *np.atleast_1d(shape))).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=40))
    results = []
    for make in (_torch_optimizer, _ours):
        model = zoo.build_model(spec, seed=1)
        opt = make(model.parameters(), train)
        for _ in range(train.epochs):
            for start in range(0, 40, train.batch_size):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(X[start : start + 8]), y[start : start + 8]
                )
                loss.backward()
                opt.step()
        results.append(model.state_dict())
    changed = False
    for key, ref in results[0].items():
        assert torch.equal(ref, results[1][key]), key  # bit for bit
        changed |= not torch.equal(ref, zoo.build_model(spec, seed=1).state_dict()[key])
    assert changed  # the comparison is of trained weights, not two untouched models


def test_training_does_not_import_the_compiler():
    code = (
        "import sys, numpy as np\n"
        "from broker import zoo\n"
        "from broker.task import ModelSpec, TrainSpec\n"
        "from device_agent.trainer import train_local\n"
        "spec = ModelSpec(arch='mlp', args={'in_features': 4, 'hidden': [8], 'out_features': 2})\n"
        "X = np.random.rand(20, 4).astype('float32'); y = np.arange(20) % 2\n"
        "for opt in ('sgd', 'adam'):\n"
        "    train_local(zoo.build_model(spec, seed=0), X, y,\n"
        "                TrainSpec(epochs=1, batch_size=4, optimizer=opt), 0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_empty_parameter_list_is_refused():
    with pytest.raises(ValueError):
        optimizers.SGD([], lr=0.1)


def test_train_local_runs_with_ours():
    spec, _ = MODELS["mlp"]
    X = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    y = np.arange(30) % 3
    result = train_local(zoo.build_model(spec, seed=0), X, y, TRAINS["adam"], seed=3)
    assert result.num_samples == 30 and np.isfinite(result.train_loss)
