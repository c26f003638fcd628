"""Aggregation strategies, chosen by the task file's ``[strategy]`` table.

``build({"name": "fedadam", "eta": 0.01})`` validates the table (an error names the
key) and returns the strategy. The interface is in ``base.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aggregator.strategies.base import Params, RoundPlan, Strategy, StrategyError, Update
from aggregator.strategies.fedbuff import FedBuff
from aggregator.strategies.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
from aggregator.strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from aggregator.strategies.sums import FedAvg, FedProx

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedBuff,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        Bulyan,
    )
}


def build(table: Mapping[str, Any] | None, privacy: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy of a task's ``[strategy]`` table, made differentially private by its
    ``[privacy]`` table if it has one (``private.py``)."""
    table = dict(table or {})
    name = table.get("name", "fedavg")
    if name not in STRATEGIES:
        raise StrategyError(
            f"[strategy] name must be one of {', '.join(sorted(STRATEGIES))}, got {name!r}"
        )
    params = Params(table)
    strategy = STRATEGIES[name](params)
    params.done(name)
    if privacy:
        from aggregator.strategies.private import Private  # needs dp-accounting

        privacy_params = Params(privacy, section="privacy")
        strategy = Private(strategy, privacy_params)
        privacy_params.done("privacy")
    return strategy


__all__ = ["RoundPlan", "STRATEGIES", "Strategy", "StrategyError", "Update", "build"]
