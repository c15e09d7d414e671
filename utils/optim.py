"""The release's optimiser (AdaXW), elementwise gradient clamp and poly learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


class AdaXW(Optimizer):
    """AdaX (Li et al., 2020) with decoupled weight decay, as the release trains with.

    m = b1 m + (1 - b1) g; v = (1 + b2) v + b2 g^2; p -= lr wd p;
    p -= lr sqrt((1 + b2)^t - 1) m / (sqrt(v) + eps). Parameters whose grad is None are skipped
    (no decay either), which keeps `frequency.radius` fixed as in the release.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-12,
        weight_decay: float = 1e-4,
    ) -> None:
        """The release's settings: betas (0.9, 1e-4), eps 1e-12; lr and weight decay as train.py's flags."""
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid AdaXW settings: lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not 0.0 <= betas[0] < 1.0 or betas[1] < 0.0:
            raise ValueError(f"invalid AdaXW betas: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Take one AdaXW step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaXW does not support sparse gradients")
                self._update(p, group, beta1, beta2)
        return loss

    def _update(self, p: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        """Update one parameter in place from its gradient and state."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = p.grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(1 + beta2).addcmul_(grad, grad, value=beta2)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        step_size = group["lr"] * math.sqrt((1 + beta2) ** state["step"] - 1)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)


def clip_gradient(optimizer: Optimizer, clip: float) -> None:
    """Clamp every gradient element to [-clip, clip] (the release's clip_gradient; not a norm clip)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.clamp_(-clip, clip)


def poly_lr(base_lr: float, epoch: int, total_epochs: int, power: float = 0.9) -> float:
    """The release's per-epoch poly rate base_lr * (1 - epoch / total_epochs) ** power, epoch = 1..E."""
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch {epoch} is outside the schedule 1..{total_epochs}")
    return base_lr * (1 - epoch / total_epochs) ** power


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
