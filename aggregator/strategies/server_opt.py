"""Server optimizers: the round's FedAvg mean read as a gradient, and an optimizer step along it.

Each round the sample-weighted mean of the devices' models, ``avg``
(``sums.weighted_mean``, with ``clip_norm``), gives the pseudo-gradient
``grad = global - avg`` over the model's floating-point tensors, and an optimizer
on the server takes one step along it (Reddi et al. 2021, "Adaptive Federated
Optimization"). ``avg`` is a sum of the updates, so these compose with secure
aggregation and with sites just as FedAvg does. Integer buffers (BatchNorm's
``num_batches_tracked``) are counters, not weights: they take ``avg``'s value.

| strategy   | parameters (default)                           | follows                           |
|------------|------------------------------------------------|-----------------------------------|
| fedavgm    | server_lr (1.0), momentum (0.9)                | Hsu et al. 2019; torch SGD        |
| fedadam    | eta (0.01), beta1 (0.9), beta2 (0.99),         | Reddi et al. 2021, Alg. 2;        |
|            | tau (1e-3), bias_correction (true)             | torch Adam                        |
| fedyogi    | as fedadam                                     | Reddi et al. 2021, Alg. 2 (Yogi:  |
|            |                                                | Zaheer et al. 2018)               |
| fedadagrad | eta (0.1), tau (1e-3)                          | Reddi et al. 2021, Alg. 2 with    |
|            |                                                | beta1 = 0; torch Adagrad          |

"torch X" means: the same step as ``torch.optim.SGD(lr=server_lr, momentum=momentum)``,
``torch.optim.Adam(lr=eta, betas=(beta1, beta2), eps=tau)`` or
``torch.optim.Adagrad(lr=eta, eps=tau)`` given ``grad`` as the gradient (the tests check it).

Where fedmq departs from the paper, and why:

- Algorithm 2 has no bias correction. ``bias_correction = true`` (the default) divides
  the moments by ``1 - beta^t`` as Adam does (Kingma & Ba 2015, and ``torch.optim.Adam``),
  so that the first rounds' steps do not depend on the betas: without it they are scaled
  by ``(1 - beta1^t) / sqrt(1 - beta2^t)`` (1 at t = 1 with 0.9 and 0.99, but 3.2 with
  0.9 and 0.999); ``bias_correction = false`` gives Algorithm 2 exactly. (Flower's FedAdam folds the
  correction into ``eta``, which differs from torch's only in where ``tau`` sits.)
- Algorithm 2 starts the second moment at ``v >= tau^2``; fedmq starts it at 0, as
  torch and Flower do, so the first step of FedAdam and FedYogi coincide.
- Algorithm 2's FedAdagrad keeps a first moment too; fedmq's is plain Adagrad
  (``beta1 = 0``, as in Flower's FedAdagrad), so it agrees with ``torch.optim.Adagrad``.
- Defaults: ``beta1 = 0.9`` and ``beta2 = 0.99`` are the paper's; the paper tunes ``eta``
  and ``tau`` per task, so ours are Flower's FedYogi's (``eta = 0.01``, ``tau = 1e-3``) for
  Adam and Yogi, and ``eta = 0.1`` (Flower's FedAdagrad) with the same ``tau`` for Adagrad
  (Flower's FedAdam and FedAdagrad use ``tau = 1e-9``, which makes the first step
  ``eta * sign(grad)`` in every coordinate).
- FedAvgM's ``momentum = 0.9`` is the common choice (Hsu et al. sweep it; Flower's
  default is 0). ``server_lr = 1`` with ``momentum = 0`` is FedAvg.

The steps are pure functions of dicts of tensors (new tensors and new state out, inputs
untouched), in float64, with the weights cast back to the model's dtypes. The state
(moments, kept in float64, and the step count) goes into the round's checkpoint under
``m/<tensor>``, ``v/<tensor>`` and ``step``, so a resumed run steps bit-identically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from aggregator.strategies.base import (
    Params,
    Strategy,
    StrategyError,
    Tensors,
    Updates,
    cast_like,
)
from aggregator.strategies.sums import weighted_mean

F64 = torch.float64


def pseudo_gradient(global_weights: Mapping[str, torch.Tensor], avg: Tensors) -> Tensors:
    """``global - avg`` in float64 over the floating-point tensors: the direction the
    devices moved the model, reversed, so that an optimizer descends along it."""
    return {
        name: value.to(F64) - avg[name].to(F64)
        for name, value in global_weights.items()
        if value.dtype.is_floating_point
    }


def _zeros_like(grad: Tensors) -> Tensors:
    return {name: torch.zeros_like(g) for name, g in grad.items()}


def fedavgm_step(
    weights: Tensors, grad: Tensors, buf: Tensors, *, server_lr: float, momentum: float
) -> tuple[Tensors, Tensors]:
    """Heavy-ball SGD (Hsu et al. 2019): ``buf = momentum * buf + grad`` (``buf = grad`` on the
    first step, ``buf`` empty), ``w = w - server_lr * buf``. Returns (weights, buf)."""
    new_buf = {
        name: g.clone() if name not in buf else momentum * buf[name] + g for name, g in grad.items()
    }
    new = {name: weights[name].to(F64) - server_lr * b for name, b in new_buf.items()}
    return cast_like(new, weights), new_buf


def adam_second_moment(v: torch.Tensor, g2: torch.Tensor, beta2: float) -> torch.Tensor:
    """Adam: an exponential moving average of the squared gradient."""
    return beta2 * v + (1.0 - beta2) * g2


def yogi_second_moment(v: torch.Tensor, g2: torch.Tensor, beta2: float) -> torch.Tensor:
    """Yogi: moves ``v`` towards ``g^2`` by at most ``(1 - beta2) g^2``, so a few large
    gradients do not make it forget small ones as fast as Adam does."""
    return v - (1.0 - beta2) * g2 * torch.sign(v - g2)


def adaptive_step(
    weights: Tensors,
    grad: Tensors,
    m: Tensors,
    v: Tensors,
    step: int,
    *,
    second_moment: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
    bias_correction: bool,
) -> tuple[Tensors, Tensors, Tensors]:
    """One step of FedAdam or FedYogi (Reddi et al. 2021, Alg. 2), the ``step``-th (from 1):
    ``m = beta1 m + (1 - beta1) g``; ``v = second_moment(v, g^2)``;
    ``w = w - eta m_hat / (sqrt(v_hat) + tau)``, where the hats divide by ``1 - beta^step``
    when ``bias_correction`` is on. Empty ``m``, ``v``: zeros. Returns (weights, m, v)."""
    m = m or _zeros_like(grad)
    v = v or _zeros_like(grad)
    if bias_correction:
        step_size = eta / (1.0 - beta1**step)
        v_scale = (1.0 - beta2**step) ** 0.5
    else:
        step_size, v_scale = eta, 1.0
    new_m, new_v, new = {}, {}, {}
    for name, g in grad.items():
        new_m[name] = beta1 * m[name] + (1.0 - beta1) * g
        new_v[name] = second_moment(v[name], g * g, beta2)
        denom = new_v[name].sqrt() / v_scale + tau
        new[name] = weights[name].to(F64) - step_size * new_m[name] / denom
    return cast_like(new, weights), new_m, new_v


def fedadagrad_step(
    weights: Tensors, grad: Tensors, v: Tensors, *, eta: float, tau: float
) -> tuple[Tensors, Tensors]:
    """Adagrad: ``v = v + g^2``; ``w = w - eta g / (sqrt(v) + tau)``. Returns (weights, v)."""
    v = v or _zeros_like(grad)
    new_v = {name: v[name] + g * g for name, g in grad.items()}
    new = {
        name: weights[name].to(F64) - eta * g / (new_v[name].sqrt() + tau)
        for name, g in grad.items()
    }
    return cast_like(new, weights), new_v


class ServerOptimizer(Strategy):
    """A server optimizer: FedAvg's mean, read as a pseudo-gradient, and one step along it.
    Subclasses name their moments (``slots``, the state's key prefixes) and the step."""

    slots: tuple[str, ...] = ()
    secure_sum = True  # a step along FedAvg's mean

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.steps = 0  # optimizer steps taken: the rounds aggregated so far
        self.moments: dict[str, Tensors] = {slot: {} for slot in self.slots}

    def _step(
        self, weights: Tensors, grad: Tensors, moments: dict[str, Tensors], step: int
    ) -> tuple[Tensors, dict[str, Tensors]]:
        raise NotImplementedError

    def aggregate(self, global_weights: Tensors, updates: Updates) -> Tensors:
        avg = weighted_mean(global_weights, updates, self.clip_norm)
        grad = pseudo_gradient(global_weights, avg)
        self._check_moments(grad)
        weights = {name: global_weights[name] for name in grad}
        stepped, moments = self._step(weights, grad, self.moments, self.steps + 1)
        self.moments, self.steps = moments, self.steps + 1  # only once the step succeeded
        return {name: stepped.get(name, avg[name]) for name in global_weights}

    def _check_moments(self, grad: Tensors) -> None:
        for slot, tensors in self.moments.items():
            if not tensors:
                continue
            wrong = sorted(
                name
                for name in set(tensors) | set(grad)
                if name not in tensors
                or name not in grad
                or tensors[name].shape != grad[name].shape
            )
            if wrong:
                raise StrategyError(
                    f"strategy {self.name!r}: its state {slot}/ does not fit the model "
                    f"(tensor(s) {', '.join(wrong[:5])})"
                )

    def state(self) -> Tensors:
        if self.steps == 0:
            return {}
        out = {"step": torch.tensor(self.steps, dtype=torch.int64)}
        for slot, tensors in self.moments.items():
            out.update({f"{slot}/{name}": value for name, value in tensors.items()})
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        moments: dict[str, Tensors] = {slot: {} for slot in self.slots}
        steps = 0
        for key, value in tensors.items():
            slot, sep, name = key.partition("/")
            if key == "step":
                if value.numel() != 1 or value.dtype.is_floating_point or int(value) < 1:
                    raise StrategyError(
                        f"strategy {self.name!r}: the checkpoint's step is not a count"
                    )
                steps = int(value)
            elif sep and slot in moments:
                if value.dtype != F64:
                    raise StrategyError(
                        f"strategy {self.name!r}: the checkpoint's {key!r} is not float64"
                    )
                moments[slot][name] = value
            else:
                raise StrategyError(
                    f"strategy {self.name!r} does not know the checkpoint's state {key!r}"
                )
        if tensors and (steps == 0 or len({frozenset(t) for t in moments.values()}) > 1):
            raise StrategyError(
                f"strategy {self.name!r}: the checkpoint's state is incomplete (it needs "
                f"step, and {' and '.join(s + '/' for s in self.slots)} for the same tensors)"
            )
        self.moments, self.steps = moments, steps


class FedAvgM(ServerOptimizer):
    """Hsu et al. 2019: FedAvg with server momentum, ``torch.optim.SGD``'s heavy ball."""

    name = "fedavgm"
    slots = ("m",)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.server_lr = params.number("server_lr", 1.0, low=0.0, low_open=True)
        self.momentum = params.number("momentum", 0.9, low=0.0, high=1.0, high_open=True)

    def _step(self, weights, grad, moments, step):
        new, buf = fedavgm_step(
            weights, grad, moments["m"], server_lr=self.server_lr, momentum=self.momentum
        )
        return new, {"m": buf}

    def describe(self) -> str:
        return f"{self.name}(server_lr={self.server_lr:g}, momentum={self.momentum:g})"


class FedAdam(ServerOptimizer):
    """Reddi et al. 2021: Adam on the server (see the module's notes on bias correction)."""

    name = "fedadam"
    slots = ("m", "v")
    second_moment = staticmethod(adam_second_moment)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.eta = params.number("eta", 0.01, low=0.0, low_open=True)
        self.beta1 = params.number("beta1", 0.9, low=0.0, high=1.0, high_open=True)
        self.beta2 = params.number("beta2", 0.99, low=0.0, high=1.0, high_open=True)
        self.tau = params.number("tau", 1e-3, low=0.0, low_open=True)
        self.bias_correction = params.flag("bias_correction", True)

    def _step(self, weights, grad, moments, step):
        new, m, v = adaptive_step(
            weights,
            grad,
            moments["m"],
            moments["v"],
            step,
            second_moment=self.second_moment,
            eta=self.eta,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
            bias_correction=self.bias_correction,
        )
        return new, {"m": m, "v": v}

    def describe(self) -> str:
        return (
            f"{self.name}(eta={self.eta:g}, beta1={self.beta1:g}, beta2={self.beta2:g}, "
            f"tau={self.tau:g}, bias_correction={str(self.bias_correction).lower()})"
        )


class FedYogi(FedAdam):
    """Reddi et al. 2021: Yogi on the server; FedAdam with Yogi's additive second moment."""

    name = "fedyogi"
    second_moment = staticmethod(yogi_second_moment)


class FedAdagrad(ServerOptimizer):
    """Reddi et al. 2021: Adagrad on the server (without Algorithm 2's first moment)."""

    name = "fedadagrad"
    slots = ("v",)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.eta = params.number("eta", 0.1, low=0.0, low_open=True)
        self.tau = params.number("tau", 1e-3, low=0.0, low_open=True)

    def _step(self, weights, grad, moments, step):
        new, v = fedadagrad_step(weights, grad, moments["v"], eta=self.eta, tau=self.tau)
        return new, {"v": v}

    def describe(self) -> str:
        return f"{self.name}(eta={self.eta:g}, tau={self.tau:g})"
