"""Run bookkeeping shared by the training stages: output folder, resume, periodic checkpoints,
evaluation schedule and early stopping. Small functions, so each stage's loop stays visible."""

from __future__ import annotations

from pathlib import Path

from instructkit.engine import checkpoint as C
from instructkit.engine import distributed as D
from instructkit.engine.batches import BatchStream
from instructkit.engine.runtime import get_rng_state, set_rng_state
from instructkit.engine.step import NonFiniteGuard
from instructkit.errors import UserError


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to start over a run that already trained (nothing is lost) unless resuming."""
    if resume:
        return
    ckpts = output_dir / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.iterdir())) or (output_dir / "final").exists():
        raise UserError(
            f"output_dir {output_dir} already holds a run; pass --resume to continue it, "
            "or choose another output_dir"
        )


def write_config(cfg, output_dir: Path) -> None:
    """The run's resolved config as ``config.yaml`` (rank 0 only under torchrun)."""
    from instructkit.config import save_config

    if D.is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(output_dir) / "config.yaml")


def new_loop_state() -> dict:
    return {"tokens_seen": 0, "best_eval": None, "evals_without_improvement": 0}


def restore(output_dir: Path, model, optimizer, stream: BatchStream, guard: NonFiniteGuard,
            extra_models: dict | None = None) -> tuple[int, dict, dict]:
    """Load the latest checkpoint into the model, optimizer, batch stream, guard and RNG.

    Returns (step, loop state, extra tensors); (0, fresh state, {}) when there is none.
    """
    last = C.latest_checkpoint(Path(output_dir) / "checkpoints")
    if last is None:
        return 0, new_loop_state(), {}
    if C.is_sharded_checkpoint(last):
        restored = C.load_sharded_checkpoint(last, model, optimizer)
    elif D.sharded(model):
        raise UserError(
            f"{last} was written by a single process and cannot be resumed by several; resume it "
            "without torchrun, or start the distributed run in a new output_dir"
        )
    else:
        restored = C.load_checkpoint(last, model, optimizer)
    loop = restored["loop"]
    stream.load_state_dict(loop.pop("stream"))
    guard.total = loop.pop("skipped_steps", 0)
    set_rng_state(restored["rng"])
    return restored["step"], loop, restored["extra"]


def save(output_dir: Path, step: int, model, optimizer, loop: dict, stream: BatchStream,
         guard: NonFiniteGuard, keep_last: int, extra_tensors: dict | None = None) -> Path:
    state = {**loop, "stream": stream.state_dict(), "skipped_steps": guard.total}
    if D.sharded(model):
        if extra_tensors:
            raise UserError("this stage keeps extra tensors in its checkpoints, which sharded runs do not support yet")
        return C.save_sharded_checkpoint(Path(output_dir) / "checkpoints", step, model, optimizer, state,
                                         get_rng_state(), keep_last)
    return C.save_checkpoint(Path(output_dir) / "checkpoints", step, model, optimizer, state,
                             get_rng_state(), keep_last, extra_tensors)


def due(step: int, every: int, total: int | None = None) -> bool:
    """True every ``every`` steps (0: never), and at the last step when ``total`` is given."""
    return bool(every and step % every == 0) or (total is not None and step == total)


def early_stop(loop: dict, eval_loss: float | None, patience: int | None) -> bool:
    """Track the best validation loss; true once it has not improved for ``patience`` evals."""
    if eval_loss is None:
        return False
    if loop["best_eval"] is None or eval_loss < loop["best_eval"]:
        loop["best_eval"] = eval_loss
        loop["evals_without_improvement"] = 0
        return False
    loop["evals_without_improvement"] += 1
    return patience is not None and loop["evals_without_improvement"] >= patience
