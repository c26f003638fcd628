"""The seed tutorial on fedmq: bob and alice train nn.Linear(2,1) over a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from broker import zoo
from broker.task import TaskSpec
from tests.helpers import join

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bob_and_alice"
pytestmark = pytest.mark.mosquitto


def centralized_gd(task: TaskSpec, steps: int) -> dict[str, torch.Tensor]:
    """Full-batch gradient descent on the pooled four points, mean loss."""
    model = zoo.build_model(task.model, seed=task.seed)
    X = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32)
    y = torch.tensor([[0], [0], [1], [1]], dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=task.train.lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    return model.state_dict()


def test_five_federated_rounds_equal_five_centralized_steps(federation, tmp_path):
    fed = federation(devices=["bob", "alice"])
    task = TaskSpec.load(EXAMPLE / "task.toml")
    agg = fed.aggregator(tmp_path / "run", task, rounds=5, min_devices=2)
    agg_thread = fed.in_thread(agg.run, timeout=60)
    agents = [
        fed.in_thread(fed.agent(d, EXAMPLE / f"{d}.csv", exit_when_done=True).run, timeout=60)
        for d in ("bob", "alice")
    ]
    assert join(agg_thread, 90) == 0
    for t in agents:
        assert join(t, 30) == 0

    federated = agg.weights
    central = centralized_gd(task, 5)
    for name in central:
        np.testing.assert_allclose(federated[name].numpy(), central[name].numpy(), atol=1e-5)
    losses = [row["metrics"]["train_loss"] for row in agg.run_dir.metrics()]
    assert len(losses) == 5 and losses[-1] < losses[0]
