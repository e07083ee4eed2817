"""Adam for the test-time fit, without ``torch.optim``: the first use of a ``torch.optim`` optimiser imports
``torch._dynamo`` (its methods are wrapped to disable the compiler), 2-4 s on the shared 2-core machine, paid by
the first fitted request of every service process and by every ``facerecon reconstruct`` run that fits.

:class:`Adam` runs the very tensor operations of ``torch.optim.Adam``'s single-tensor CPU path with its defaults
(betas 0.9 / 0.999, eps 1e-8, no weight decay, no AMSGrad) in the same order, so a fit is bit-identical to one with
``torch.optim.Adam`` (``tests/test_adam.py`` checks that step by step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Adam"]


class Adam:
    """``torch.optim.Adam(groups)`` with its default hyper-parameters.

    Args:
        groups: ``[{"params": [tensors], "lr": float}, ...]``, as ``torch.optim`` takes them.
    """

    def __init__(self, groups: Sequence[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.groups = [(list(g["params"]), float(g["lr"])) for g in groups]
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self._state: dict[int, tuple[Tensor, Tensor, list[float]]] = {}

    def zero_grad(self) -> None:
        """Drop every gradient (``zero_grad(set_to_none=True)``)."""
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        beta1, beta2 = self.beta1, self.beta2
        for params, lr in self.groups:
            for p in params:
                grad = p.grad
                if grad is None:
                    continue
                state = self._state.get(id(p))
                if state is None:
                    state = (torch.zeros_like(p, memory_format=torch.preserve_format),
                             torch.zeros_like(p, memory_format=torch.preserve_format), [0.0])
                    self._state[id(p)] = state
                exp_avg, exp_avg_sq, count = state
                count[0] += 1.0
                step = count[0]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
