"""DP-FedAvg (McMahan et al. 2018): differentially private federated averaging.

Chosen by the task's ``[privacy]`` table beside ``[strategy]`` (fedavg or fedprox)::

    [privacy]
    noise_multiplier = 1.0   # sigma
    clip_norm = 1.0          # C
    delta = 1e-5             # the delta epsilon is reported at

Each round, every accepted update's delta ``w_i - g`` is clipped to L2 norm C (by the
device, asked through the round's plan, and again here: the bound on one device's
influence is what the guarantee rests on, so it is not taken on a device's word), and

    g' = g + (Σ clip(Δ_i, C) + N(0, σ² C² I)) / n

with n the round's accepted updates, each counting the same (a device's sample count
is its own claim and would change its sensitivity). The noise comes from a
cryptographic generator keyed by a secret of the run (``aggregator/privacy/noise.py``):
nobody without it can predict or subtract the noise, and a resumed run adds the same.

After every round the accountant (``aggregator/privacy/accountant.py``, Google's
``dp-accounting``, RDP) reports the (ε, δ) of the rounds so far: each round is a
Gaussian mechanism of noise multiplier σ, Poisson-subsampled at the client sampling
rate q (``fraction``; 1 without sampling). fedmq samples a fixed ⌈q·n⌉ of the
available devices rather than each independently with probability q, so the figure
is the standard approximation, as in the DP-FedAvg paper. The guarantee is at the
level of a device (all its data), against anyone who sees only the published models;
the aggregator itself still sees each clipped update (secure aggregation will hide
them).
"""

from __future__ import annotations

import math

import torch

from aggregator.fedavg import FoldedSum
from aggregator.privacy import accountant, noise
from aggregator.strategies.base import Params, Strategy, StrategyError, Tensors, Updates, cast_like
from aggregator.strategies.sums import clip_factor, delta_norm

COMPOSES_WITH = ("fedavg", "fedprox")
EFFECTIVE_KEY = "privacy.effective_noise"  # in the strategy's checkpoint state


def nonnegative_variances(weights: Tensors) -> Tensors:
    """BatchNorm's running variances clamped at 0: noise of std sigma*C/n can push one below
    0, and the model would then give NaN for every input. Post-processing of the noisy
    result, so the privacy guarantee is unchanged."""
    return {
        k: v.clamp(min=0) if k.endswith("running_var") and v.is_floating_point() else v
        for k, v in weights.items()
    }


class Private(Strategy):
    """``inner`` (fedavg or fedprox) made differentially private."""

    needs_secret = True

    def __init__(self, inner: Strategy, params: Params) -> None:
        if inner.name not in COMPOSES_WITH:
            raise StrategyError(
                f"[privacy] works with strategy {' or '.join(COMPOSES_WITH)}, not "
                f"{inner.name!r}: its result is not a sum of clipped updates"
            )
        self.inner = inner
        self.name = inner.name
        self.secure_sum = inner.secure_sum
        self.fraction, self.min_selected = inner.fraction, inner.min_selected
        self.clip_norm = None  # the privacy clip below governs
        self.noise_multiplier = params.number("noise_multiplier", None, low=0.0)
        self.dp_clip = params.number("clip_norm", None, low=0.0, low_open=True)
        self.delta = params.number("delta", 1e-5, low=0.0, high=1.0, low_open=True, high_open=True)
        for key, value in (
            ("noise_multiplier", self.noise_multiplier),
            ("clip_norm", self.dp_clip),
        ):
            if value is None:
                raise StrategyError(f"[privacy] needs {key}")
        self._key: bytes | None = None
        # secure aggregation: round -> the noise multiplier its surviving devices made
        # (sigma * sqrt(survivors / selected)); rounds not here had the nominal sigma
        self.effective: dict[int, float] = {}

    def note_secure_round(self, round_: int, survivors: int, selected: int) -> float:
        """With the noise added by the devices in shares, a round with dropouts is less
        noisy than planned: record by how much (the accountant counts it)."""
        sigma = self.noise_multiplier * math.sqrt(survivors / selected)
        self.effective[round_] = sigma
        return sigma

    def state(self) -> Tensors:
        out = dict(self.inner.state())
        if self.effective:
            last = max(self.effective)
            noise = [self.effective.get(r, math.nan) for r in range(1, last + 1)]
            out[EFFECTIVE_KEY] = torch.tensor(noise, dtype=torch.float64)
        return out

    def load_state(self, tensors) -> None:
        tensors = dict(tensors)
        noise = tensors.pop(EFFECTIVE_KEY, None)
        self.inner.load_state(tensors)
        if noise is not None:
            self.effective = {
                r + 1: float(v) for r, v in enumerate(noise.tolist()) if not math.isnan(v)
            }

    def use_secret(self, key: bytes) -> None:
        self._key = key

    def train_config(self) -> dict[str, float]:
        return {**self.inner.train_config(), "dp_clip": self.dp_clip}

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        if self._key is None:
            raise StrategyError("[privacy] needs the run's secret for its noise (not set)")
        floats = {k: v for k, v in global_weights.items() if v.dtype.is_floating_point}
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in floats.items()}
        rest = [k for k in global_weights if k not in floats]  # integer buffers
        counters = FoldedSum({k: global_weights[k] for k in rest}) if rest else None
        n = 0
        for update in updates:
            scale = clip_factor(delta_norm(update.tensors, update.base), self.dp_clip)
            for k in floats:
                d = update.tensors[k].to(torch.float64) - update.base[k].to(torch.float64)
                total[k].add_(d, alpha=scale)
            if counters is not None:
                counters.fold({k: update.tensors[k] for k in rest}, update.num_samples)
            n += 1
        std = self.noise_multiplier * self.dp_clip
        noisy = noise.gaussian_like(self._key, f"round-{updates.round}", floats, std)
        out = {k: floats[k].to(torch.float64) + (total[k] + noisy[k]) / n for k in floats}
        result = cast_like(out, global_weights)
        if counters is not None:
            result |= counters.average()  # integer buffers: FedAvg's value
        return nonnegative_variances({k: result[k] for k in global_weights})

    def sampling_rate(self) -> float:
        return self.fraction

    def privacy_report(self, rounds: int) -> dict[str, float]:
        """(ε, δ) after ``rounds`` rounds, with what it was computed from."""
        if self.effective:
            sigmas = [self.effective.get(r, self.noise_multiplier) for r in range(1, rounds + 1)]
            spent = accountant.epsilon_of_rounds(sigmas, self.sampling_rate(), self.delta)
        else:
            spent = accountant.epsilon(
                self.noise_multiplier, self.sampling_rate(), rounds, self.delta
            )
        return {
            "epsilon": spent,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.dp_clip,
            "sampling_rate": self.sampling_rate(),
            "rounds": rounds,
        }

    def describe(self) -> str:
        return (
            f"{self.inner.describe()} with differential privacy (noise_multiplier="
            f"{self.noise_multiplier:g}, clip_norm={self.dp_clip:g})"
        )
