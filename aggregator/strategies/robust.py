"""Byzantine-robust strategies: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan.

Each reads the round's deltas as a ``DeltaMatrix`` on disk (``updates.matrix``,
clipped to ``clip_norm`` when set), works on one block of columns at a time (and,
for Krum and Bulyan, on the n x n matrix of squared distances), and returns
``global + robust_delta``. See ``aggregator/update_matrix.py`` for the memory bound.

Conventions shared by all five:

- Unweighted: a device's ``num_samples`` gives it no extra say. It is the device's
  own claim, so weighting by it would let one lying device buy the majority the
  rules are there to deny it.
- Integer buffers (``num_batches_tracked``) are counters, not deltas: they get
  FedAvg's value (sample-weighted mean, rounded; ``DeltaMatrix.buffer_mean``).
- Ties go to the first device id (updates are read in device-id order), so the
  result is a function of the set of updates, never of their arrival order.
- Sums over rows run in row order, one row at a time, so a coordinate's result does
  not depend on how the columns were blocked. (Krum's distances are sums over
  blocks; a different blocking could move them by an ulp, but the blocking is a
  function of n alone, so a replayed round computes the same bits.)
- None of them is a sum of the updates: they need each device's delta in the
  clear, so they do not compose with secure aggregation or with site aggregators.
- Krum, Multi-Krum and Bulyan record the device ids they kept in ``last_selected``
  (sorted) for the engine to log; they refuse a round with too few updates for
  their ``f`` with ``TooFewUpdates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from aggregator.strategies.base import Params, Strategy, StrategyError, Tensors, Updates, cast_like


class TooFewUpdates(StrategyError):
    """A round has fewer updates than the strategy needs for its parameters."""

    reason = "too_few_updates"


# -- pure functions on column blocks (X: n x k float64, one row per update) -------------------
def sum_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows' sum, added in row order (the same bits whatever the column blocking)."""
    total = x[0].clone()
    for row in x[1:]:
        total += row
    return total


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per column, the middle value; for an even number of rows, the mean of the two middle
    values (``torch.median`` would return the lower one, biasing the result downward)."""
    n = x.shape[0]
    ordered = torch.sort(x, dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trim_count(beta: float, n: int) -> int:
    """``floor(beta * n)``, robust to ``beta * n`` landing a hair under an integer
    (0.29 * 100 = 28.999999999999996)."""
    return math.floor(beta * n + 1e-9)


def trimmed_mean(x: torch.Tensor, trim: int) -> torch.Tensor:
    """Per column, drop the ``trim`` largest and ``trim`` smallest values and mean the rest
    (Yin et al. 2018)."""
    n = x.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} from each end of {n} values")
    kept = torch.sort(x, dim=0).values[trim : n - trim]
    return sum_rows(kept) / (n - 2 * trim)


def closest_to_median_mean(x: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column, the mean of the ``beta`` values closest to the column's median (Bulyan's
    second stage); equal distances go to the earlier row."""
    if not 1 <= beta <= x.shape[0]:
        raise ValueError(f"beta must be in 1..{x.shape[0]}, got {beta}")
    distance = (x - coordinate_median(x)).abs_()
    nearest = torch.argsort(distance, dim=0, stable=True)[:beta]
    return sum_rows(x.gather(0, nearest)) / beta


def mean_of_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The unweighted mean of the given rows."""
    return sum_rows(x[list(rows)]) / len(rows)


# -- pure functions on the n x n squared-distance matrix ---------------------------------------
def krum_scores(distances: torch.Tensor, neighbours: int) -> torch.Tensor:
    """score_i = sum of the squared distances from i to its ``neighbours`` nearest others."""
    n = distances.shape[0]
    if not 0 <= neighbours <= n - 1:
        raise ValueError(f"{n} updates have no {neighbours} nearest others")
    others = distances.clone()
    others.fill_diagonal_(math.inf)
    return torch.sort(others, dim=1).values[:, :neighbours].sum(dim=1)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ties to the lower index, in score order."""
    values = scores.tolist()
    return sorted(range(len(values)), key=lambda i: (values[i], i))[:count]


def krum_select(distances: torch.Tensor, f: int) -> int:
    """Blanchard et al. 2017: the update whose n - f - 2 nearest others are closest."""
    return lowest(krum_scores(distances, distances.shape[0] - f - 2), 1)[0]


def multi_krum_select(distances: torch.Tensor, f: int, m: int) -> list[int]:
    """The m updates with the lowest Krum scores (scores computed once, on all n)."""
    return lowest(krum_scores(distances, distances.shape[0] - f - 2), m)


def bulyan_select(distances: torch.Tensor, f: int, theta: int) -> list[int]:
    """El Mhamdi et al. 2018: ``theta`` updates chosen one at a time by Krum on those not yet
    chosen, scores recomputed on that remaining set. The last picks (fewer than 2f + 3 left)
    are below Krum's own bound; their scores count max(r - f - 2, 1) neighbours (of the r
    remaining) so that they still follow the geometry. Returned sorted."""
    remaining = list(range(distances.shape[0]))
    chosen = []
    for _ in range(theta):
        sub = distances[remaining][:, remaining]
        neighbours = min(max(len(remaining) - f - 2, 1), len(remaining) - 1)
        chosen.append(remaining.pop(lowest(krum_scores(sub, neighbours), 1)[0]))
    return sorted(chosen)


# -- the strategies ---------------------------------------------------------------------------
def _apply(
    global_weights: Tensors, matrix, rule: Callable[[torch.Tensor], torch.Tensor]
) -> Tensors:
    """``global + rule(deltas)``, the rule applied to one column block at a time, in the model's
    dtypes, with the integer buffers at FedAvg's value."""
    flat = torch.empty(matrix.d, dtype=torch.float64)
    for start, stop, x in matrix.columns():
        flat[start:stop] = rule(x)
        del x  # before the next block is read
    out = {}
    deltas = matrix.unflatten(flat)  # views of flat: the sums below land in place
    buffers = matrix.buffer_mean()
    for name, value in global_weights.items():
        if name in deltas:
            moved = deltas[name].add_(value)  # global + delta, float64
            out[name] = cast_like({name: moved}, global_weights)[name]
        else:
            out[name] = buffers[name]
    return out


def _need(n: int, needed: int, who: str, formula: str = "") -> None:
    """Refuse a round of ``n`` updates when ``who`` (the strategy and the parameter that sets
    the bound) needs ``needed``."""
    if n < needed:
        bound = f"{formula} = {needed}" if formula else f"{needed}"
        raise TooFewUpdates(f"[strategy] {who} needs at least {bound} updates, got {n}")


class Median(Strategy):
    """Coordinate-wise median of the deltas (Yin et al. 2018); for an even number of updates,
    the mean of the two middle values."""

    name = "median"

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        _need(len(updates), 1, "median")
        with updates.matrix(self.clip_norm) as matrix:
            return _apply(global_weights, matrix, coordinate_median)


class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the floor(beta * n) largest and smallest values."""

    name = "trimmed_mean"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.beta = params.number("beta", 0.1, low=0.0, high=0.5, high_open=True)

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        _need(len(updates), 1, "trimmed_mean")
        with updates.matrix(self.clip_norm) as matrix:
            trim = trim_count(self.beta, matrix.n)
            return _apply(global_weights, matrix, lambda x: trimmed_mean(x, trim))

    def describe(self) -> str:
        return f"trimmed_mean beta={self.beta:g}"


class Krum(Strategy):
    """Blanchard et al. 2017: the one delta closest to its n - f - 2 nearest others; needs
    n >= 2f + 3."""

    name = "krum"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.f = params.integer("f", 1, low=0)
        self.last_selected: tuple[str, ...] = ()

    @property
    def min_updates(self) -> int:
        return 2 * self.f + 3

    def _check(self, n: int) -> None:
        _need(n, 2 * self.f + 3, f"{self.name} with f={self.f}", "2f+3")

    def _select(self, distances: torch.Tensor) -> list[int]:
        return [krum_select(distances, self.f)]

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        self.last_selected = ()
        self._check(len(updates))
        with updates.matrix(self.clip_norm) as matrix:
            rows = self._select(matrix.pairwise_sq_distances())
            self.last_selected = tuple(matrix.devices[i] for i in rows)
            return _apply(global_weights, matrix, lambda x: mean_of_rows(x, rows))

    def describe(self) -> str:
        return f"{self.name} f={self.f}"


class MultiKrum(Krum):
    """Blanchard et al. 2017: the unweighted mean of the m deltas with the lowest Krum scores
    (default m = n - f)."""

    name = "multi_krum"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.m = params.integer("m", None, low=1)

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 0)

    def _check(self, n: int) -> None:
        super()._check(n)
        if self.m is not None:
            _need(n, self.m, f"multi_krum with m={self.m}")

    def _select(self, distances: torch.Tensor) -> list[int]:
        n = distances.shape[0]
        return sorted(
            multi_krum_select(distances, self.f, n - self.f if self.m is None else self.m)
        )

    def describe(self) -> str:
        return f"multi_krum f={self.f}" + ("" if self.m is None else f" m={self.m}")


class Bulyan(Krum):
    """El Mhamdi et al. 2018: theta = n - 2f deltas chosen by repeated Krum, then per coordinate
    the mean of the beta = theta - 2f values closest to their median; needs n >= 4f + 3."""

    name = "bulyan"

    @property
    def min_updates(self) -> int:
        return 4 * self.f + 3

    def _check(self, n: int) -> None:
        _need(n, 4 * self.f + 3, f"bulyan with f={self.f}", "4f+3")

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        self.last_selected = ()
        self._check(len(updates))
        with updates.matrix(self.clip_norm) as matrix:
            theta = matrix.n - 2 * self.f
            rows = bulyan_select(matrix.pairwise_sq_distances(), self.f, theta)
            self.last_selected = tuple(matrix.devices[i] for i in rows)
            beta = theta - 2 * self.f
            return _apply(global_weights, matrix, lambda x: closest_to_median_mean(x[rows], beta))
