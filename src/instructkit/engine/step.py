"""One optimizer step: clip, guard against non-finite values, exploded weights and a collapsed
run, update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from instructkit.engine.distributed import global_max, plain_norm
from instructkit.errors import TrainingDiverged

# No trained weight of a real model comes near this (Adam moves a weight by about lr per step,
# so reaching it at lr <= 1e-2 takes millions of steps); a larger |w| means the run blew up.
MAX_WEIGHT_ABS = 1e5
# Steps in a row with a gradient of exactly zero that mean a collapsed run (a single one can be
# a fluke of the data; five cannot).
ZERO_GRADIENT_STEPS = 5


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


class StepGuard:
    """Watches every optimizer step.

    - A step whose loss or gradient norm is NaN/inf is skipped; after ``max_in_row`` in a row
      the run stops with a diagnosis, since by then the weights or optimizer state are usually
      damaged.
    - Weights that are non-finite or beyond ``MAX_WEIGHT_ABS`` after an update stop the run at
      once, before anything can save them: every checkpoint holds weights from earlier steps.
    - ``ZERO_GRADIENT_STEPS`` in a row with a gradient norm of exactly 0 and a non-zero loss (a
      collapsed model: for a language model, loss stuck at ln(vocab)) stop the run too.
    """

    def __init__(self, max_in_row: int, precision: str = "fp32", attn: str = "sdpa", lr: float = 0.0):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.zero_in_row = 0
        self.total = 0
        self.context = (precision, attn, lr)

    def update(self, finite: bool, step: int, what: str) -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDiverged(self.diagnosis(step, f"{self.in_row} steps in a row had a non-finite {what} "
                                                        f"({self.total} in total)"))

    def check_gradient(self, grad_norm: float, loss: float, step: int) -> None:
        # A zero loss with a zero gradient is a batch with nothing to learn (PPO with equal
        # rewards and exact values), not a collapse.
        self.zero_in_row = self.zero_in_row + 1 if grad_norm == 0.0 and loss != 0.0 else 0
        if self.zero_in_row >= ZERO_GRADIENT_STEPS:
            raise TrainingDiverged(self.diagnosis(
                step, f"the gradient norm was exactly 0 for {self.zero_in_row} steps in a row (loss {loss:.4g}): "
                      "the model has collapsed and no longer learns (a language model whose loss sits at "
                      "ln(vocab size) predicts a uniform distribution)"))

    def check_weights(self, max_abs: float, step: int) -> None:
        if math.isfinite(max_abs) and max_abs <= MAX_WEIGHT_ABS:
            return
        what = "non-finite values" if not math.isfinite(max_abs) else f"|w| up to {max_abs:.3g}"
        raise TrainingDiverged(self.diagnosis(
            step, f"the update left the weights with {what} (the limit is {MAX_WEIGHT_ABS:g}); they were not "
                  "saved, and every checkpoint holds weights from before this step"))

    def diagnosis(self, step: int, what: str) -> str:
        """``step`` counts from 0; the message numbers steps as metrics.jsonl does (from 1)."""
        precision, attn, lr = self.context
        causes = [f"learning rate {lr:g} may be too high; try train.lr={lr / 10:g} or longer warmup"]
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
        causes.append("the data may hold empty or extremely long examples; check the truncation counts")
        lines = "\n  - ".join(causes)
        return f"training stopped at step {step + 1}: {what}. Likely causes:\n  - {lines}"


def max_abs(tensors: list[torch.Tensor]) -> float:
    """The largest |value| over ``tensors``, inf if any is NaN or inf; over all ranks' shards
    under FSDP2 (where a rank's shard of a small tensor may be empty)."""
    with torch.no_grad():
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        peaks = [t.detach().abs().amax().float() for t in local if t.numel()]
        peak = float(torch.stack(peaks).amax()) if peaks else 0.0
    return global_max(peak if math.isfinite(peak) else math.inf)  # (NaN does not survive a MAX reduce)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    guard: StepGuard,
    loss: float,
    step: int,
) -> StepResult:
    """Clip gradients, then update, unless the loss or gradient norm is not finite; then check
    the updated weights (see ``StepGuard``).

    The gradients are already normalised by the step's token count (see the stage loops).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = plain_norm(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    guard.update(finite, step, "loss" if not math.isfinite(loss) else "gradient norm")
    if finite:
        guard.check_gradient(grad_norm, loss, step)
        optimizer.step()
        guard.check_weights(max_abs(params), step)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm=grad_norm, skipped=not finite)
