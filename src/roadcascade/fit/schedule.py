"""The training loop's shared pieces: the learning-rate schedule and the weight EMA (classifier and detector).

timm ships both (``CosineLRScheduler``, ``ModelEmaV3``), but with other warm-up formulas (timm's warm-up
starts at ``warmup_lr_init``; its EMA warm-up is ``1 - (1 + step / gamma) ** -power``): swapping would
change every trained bundle, so these keep the formulas the bundles were trained with, written once.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "ema_update"]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """One EMA step of ``ema`` towards ``model`` (decay warmed up as ``(1 + step) / (10 + step)``); buffers that
    are not floating point (BatchNorm's counters) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
        if pe.dtype.is_floating_point:
            pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        else:
            pe.copy_(pm)


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module,
                   step: int, decay: float) -> float:
    """One step of the classifier loops (training, distillation): backward, optimiser step, EMA; the loss's value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_update(ema, model, step, decay)
    return float(loss.detach())
