"""The training loop's shared pieces (classifier, student and detector): the learning-rate schedule, the weight
EMA, the step count, loader workers and the per-epoch log line.

timm ships both (``CosineLRScheduler``, ``ModelEmaV3``), but with other warm-up formulas (timm's warm-up
starts at ``warmup_lr_init``; its EMA warm-up is ``1 - (1 + step / gamma) ** -power``): swapping would
change every trained bundle, so these keep the formulas the bundles were trained with, written once.
"""

from __future__ import annotations

import copy
import math
import os

import torch

__all__ = ["lr_at", "ema_update", "optimiser_step", "total_steps", "loader_workers", "format_record", "frozen_copy"]


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


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Optimiser steps of a run: every epoch's, or ``max_steps`` when that is set and fewer."""
    total = steps_per_epoch * epochs
    return min(total, max_steps) if max_steps else total


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers: as given, else up to 8 on CUDA (decoding keeps up with the GPU) and 0 on the CPU
    (the shared cores are busy with the network)."""
    if num_workers is not None:
        return num_workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def format_record(rec: dict) -> str:
    """One epoch's record as a log line: ``key=value`` pairs, floats to 4 decimals."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA network: a copy of ``model`` in eval mode, without gradients."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema
