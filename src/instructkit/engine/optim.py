"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from instructkit.config import TrainConfig
from instructkit.errors import UserError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases, norms and other 1-D tensors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device):
    groups = param_groups(model, t.weight_decay)
    if not any(g["params"] for g in groups):
        raise UserError("the model has no trainable parameters (check adapter and freeze_layers)")
    return optimizer_of(groups, t, device)


def optimizer_of(groups: list[dict], t: TrainConfig, device: torch.device):
    """``train.optimizer`` over parameter groups (a group's own ``lr`` / ``weight_decay`` win)."""
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw_8bit":
        if device.type != "cuda":
            raise UserError(
                "train.optimizer=adamw_8bit needs a CUDA GPU and bitsandbytes; "
                "use train.optimizer=adamw on this machine"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "train.optimizer=adamw_8bit needs bitsandbytes: pip install 'instructkit[gpu]'"
            ) from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # The fused kernel needs every parameter on one CUDA device in a float dtype.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    if t.warmup_fraction is not None:
        return int(round(t.warmup_fraction * total_steps))
    return t.warmup_steps


def lr_at(step: int, total_steps: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to
    ``min_lr`` at ``total_steps`` (or constant)."""
    warm = warmup_steps(t, total_steps)
    if step < warm:
        return t.lr * (step + 1) / warm
    if t.schedule == "constant":
        return t.lr
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
