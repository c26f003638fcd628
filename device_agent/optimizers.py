"""SGD and Adam for local training, without ``torch.optim``.

``torch.optim``'s optimizers import ``torch._dynamo`` (the compiler) on their first use:
``Optimizer.__init__`` and ``zero_grad`` are wrapped by ``torch._disable_dynamo`` and
``step`` by ``_use_grad_for_differentiable``, and each of them imports it lazily. That costs
a device seconds of CPU and tens of MB before its first update, for nothing: an agent never
compiles. These two do the same arithmetic as ``torch.optim``'s single-tensor CPU path
(the default on CPU), in the same order, so the trained weights are bit-for-bit the same
(``tests/test_device_optimizers.py`` checks it against ``torch.optim``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Optimizer:
    def __init__(self, params: Iterable[torch.Tensor], lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class SGD(_Optimizer):
    """``torch.optim.SGD(params, lr, momentum)`` (no dampening, weight decay or Nesterov)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0):
        super().__init__(params, lr)
        self.momentum = float(momentum)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self._buffers[i]
                if buf is None:
                    buf = self._buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            param.add_(grad, alpha=-self.lr)


class Adam(_Optimizer):
    """``torch.optim.Adam(params, lr)`` with its defaults: betas (0.9, 0.999), eps 1e-8."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._state: list[tuple[torch.Tensor, torch.Tensor, list[int]] | None] = [None] * len(
            self.params
        )

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.beta1, self.beta2
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            state = self._state[i]
            if state is None:  # made on the first gradient, as torch.optim does
                zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
                state = self._state[i] = (zeros, zeros.clone(), [0])
            exp_avg, exp_avg_sq, steps = state
            steps[0] += 1
            step = float(steps[0])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
