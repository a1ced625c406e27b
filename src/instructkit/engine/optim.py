"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from instructkit.config import TrainConfig, accumulation
from instructkit.errors import UserError


def param_groups(named_params, weight_decay: float, lr: float, name: str = "model") -> list[dict]:
    """The trainable parameters as optimizer groups at base rate ``lr``; no weight decay on
    biases, norms and other 1-D tensors. Each group keeps ``base_lr``: the schedule scales it."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "name": name}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": f"{name}.no_decay"})
    return groups


def build_optimizer(parts, t: TrainConfig, device: torch.device):
    """``train.optimizer`` over a model, or over named parts ``{name: (named_parameters, base
    lr)}`` (PPO's policy and value at their own rates), each split into decay / no-decay groups."""
    if isinstance(parts, torch.nn.Module):
        parts = {"model": (parts.named_parameters(), t.lr)}
    groups = [g for name, (named, lr) in parts.items() for g in param_groups(named, t.weight_decay, lr, name)]
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


def total_steps(t: TrainConfig, micro_batches_per_epoch: int, world_size: int = 1) -> int:
    """``train.max_steps``, else the optimizer steps of ``train.epochs`` (a last partial step counts)."""
    per_step = accumulation(t, world_size) * world_size
    return t.max_steps or max(1, math.ceil(t.epochs * micro_batches_per_epoch / per_step))


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    if t.warmup_fraction is not None:
        return int(round(t.warmup_fraction * total_steps))
    return t.warmup_steps


def lr_multiplier(step: int, total_steps: int, t: TrainConfig) -> float:
    """The schedule at optimizer step ``step`` (0-based) as a factor of each group's base rate:
    linear warmup, then cosine to ``min_lr / lr`` at ``total_steps`` (or constant)."""
    warm = warmup_steps(t, total_steps)
    if step < warm:
        return (step + 1) / warm
    if t.schedule == "constant":
        return 1.0
    floor = t.min_lr / t.lr
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Every group at its base rate times the schedule's ``multiplier``."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
