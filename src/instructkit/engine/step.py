"""One optimizer step: clip, guard against non-finite values, update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from instructkit.engine.distributed import plain_norm
from instructkit.errors import TrainingDiverged


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm is NaN/inf; such steps are skipped.

    After ``max_in_row`` consecutive bad steps the run stops with a diagnosis, since by then
    the weights or the optimizer state are usually already damaged.
    """

    def __init__(self, max_in_row: int, precision: str = "fp32", attn: str = "sdpa", lr: float = 0.0):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0
        self.context = (precision, attn, lr)

    def update(self, finite: bool, step: int, what: str) -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDiverged(self.diagnosis(step, what))

    def diagnosis(self, step: int, what: str) -> str:
        precision, attn, lr = self.context
        causes = []
        if precision == "bf16":
            causes.append(
                f"precision={precision}: pure low-precision weights overflow or lose small updates; "
                "try model.precision=bf16-mixed (fp32 master weights)"
            )
        if attn in ("sdpa", "flash_attention_2", "flex_attention"):
            causes.append(
                f"attention backend {attn}: some kernels give NaN on fully masked rows or with "
                "certain masks; try model.attn_implementation=eager, or "
                "model.disable_cudnn_sdp=true / model.disable_flash_sdp=true"
            )
        causes.append(f"learning rate {lr:g} may be too high; try train.lr={lr / 10:g} or longer warmup")
        causes.append("the data may hold empty or extremely long examples; check the truncation counts")
        lines = "\n  - ".join(causes)
        return (
            f"training stopped at step {step}: {self.in_row} steps in a row had a non-finite {what} "
            f"({self.total} in total). Likely causes:\n  - {lines}"
        )


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    guard: NonFiniteGuard,
    loss: float,
    step: int,
) -> StepResult:
    """Clip gradients, then update, unless the loss or gradient norm is not finite.

    The gradients are already normalised by the step's token count (see the stage loops).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = plain_norm(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    guard.update(finite, step, "loss" if not math.isfinite(loss) else "gradient norm")
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm=grad_norm, skipped=not finite)
