"""``[train] evaluate = false``: devices skip scoring the round's model on their data.

On by default (federated evaluation: eval_loss and eval_accuracy in each update's
metrics and in the round's); off, the update carries only its training metrics and the
round still closes with them.
"""

from __future__ import annotations

import pytest

from broker.task import TaskSpec
from fedmq.synthetic import BLOBS_TASK, write_blobs
from tests.helpers import join

pytestmark = pytest.mark.mosquitto


@pytest.mark.parametrize("evaluate", [True, False])
def test_devices_evaluate_unless_the_task_says_not_to(federation, tmp_path, evaluate):
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    task_path = tmp_path / "task.toml"
    task_path.write_text(
        BLOBS_TASK.replace("[train]", f"[train]\nevaluate = {str(evaluate).lower()}")
    )
    task = TaskSpec.load(task_path)
    assert task.train.evaluate is evaluate
    agg = fed.aggregator(tmp_path / "run", task, rounds=1, min_devices=1, deadline=60)
    thread = fed.in_thread(agg.run)
    bob = fed.agent("bob", files["bob"], exit_when_done=True)
    trained = []
    bob.on_event = lambda kind, info: trained.append(info) if kind == "trained" else None
    assert join(fed.in_thread(bob.run, timeout=60), 60) == 0
    assert join(thread, 60) == 0
    sent = trained[0]["metrics"]
    row = agg.run_dir.metrics()[0]["metrics"]
    assert "train_loss" in sent and "train_loss" in row
    for key in ("eval_loss", "eval_accuracy"):
        assert (key in sent) is evaluate and (key in row) is evaluate
