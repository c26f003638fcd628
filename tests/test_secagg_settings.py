"""The task's [secure_aggregation] table: what it accepts, what it refuses and why."""

from __future__ import annotations

import pytest

from aggregator import strategies
from aggregator.secure_settings import secure_settings
from broker.errors import TaskError
from broker.task import TaskSpec
from fedmq.synthetic import BLOBS_TASK


def settings(table, strategy=None, privacy=None):
    return secure_settings(table, strategies.build(strategy or {}, privacy))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_strategies_that_need_each_update_are_refused(name):
    with pytest.raises(TaskError, match=rf"needs a strategy that is a sum.*'{name}' needs each"):
        settings({"enabled": True}, {"name": name})


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_sums_are_accepted(name):
    assert settings({"clip_range": 0.5}, {"name": name}).clip_range == 0.5


def test_refusals_name_the_key():
    with pytest.raises(TaskError, match="clip_norm cannot be used with"):
        settings({"enabled": True}, {"name": "fedavg", "clip_norm": 1.0})
    with pytest.raises(TaskError, match=r"\[secure_aggregation\] key\(s\) clip mean nothing"):
        settings({"clip": 1.0})
    with pytest.raises(TaskError, match="max_weight must be 1 with"):
        settings({"max_weight": 100}, privacy={"noise_multiplier": 1.0, "clip_norm": 1.0})
    with pytest.raises(TaskError, match="clip_range must be"):
        settings({"clip_range": 0})


def test_with_privacy_devices_add_the_noise_in_shares():
    s = settings({"enabled": True}, privacy={"noise_multiplier": 2.0, "clip_norm": 0.5})
    assert s.max_weight == 1 and s.clip_range == pytest.approx(0.5 * (1 + 12))
    plan = s.plan(16)
    assert plan.noise == pytest.approx(2.0 * 0.5 / 4)  # sigma C / sqrt(n')
    assert plan.selected == 16 and len(plan.session) == 32 and s.plan(16).session != plan.session


def test_the_bare_table_turns_it_on(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(BLOBS_TASK + "\n[secure_aggregation]\n")
    task = TaskSpec.load(path)
    assert task.secure_aggregation == {"enabled": True}
    assert settings(task.secure_aggregation).clip_range == 1.0
    assert TaskSpec.from_json(task.to_json()) == task  # it travels in the model's task
    assert settings({"enabled": False}) is None and settings({}) is None
