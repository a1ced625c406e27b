"""Run bookkeeping shared by the training stages: the output folder, :class:`TrainingRun` (the
schedule, guard, metrics, progress, checkpoints and resume around a loop's steps, the same for
``fit`` and the rollout stages), evaluation schedule and early stopping. Small pieces, so each
stage's loop stays visible."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

from instructkit.atomic import explain_disk_full, sha256_file
from instructkit.config import LogConfig, TrainConfig
from instructkit.engine import checkpoint as C
from instructkit.engine import distributed as D
from instructkit.engine.batches import BatchStream
from instructkit.engine.logging import MetricsLogger, ProgressBar
from instructkit.engine.optim import lr_multiplier, set_lr
from instructkit.engine.runtime import get_rng_state, set_rng_state
from instructkit.engine.step import StepGuard, StepResult, optimizer_step
from instructkit.errors import UserError


LOCK_NAME = ".instructkit.lock"
log = logging.getLogger("instructkit.engine")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def lock_output_dir(output_dir: Path) -> None:
    """Hold ``output_dir`` for this process (rank 0 under torchrun): a lock file with the
    owner's pid, host and start time. A folder held by another live run is refused, naming it;
    a lock whose process is gone on this host is taken over with a warning. Released at the end
    of the run (``release_output_dir``) or when the process exits."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 holds it (before the process group exists)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock, me = output_dir / LOCK_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = json.loads(lock.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, None, None  # unreadable (a crash while writing it): stale
        if pid == me["pid"] and host == me["host"]:
            return  # this process already holds it (a pipeline, a resume after an interruption)
        if host is not None and host != me["host"]:
            raise UserError(f"output_dir {output_dir} is held by a run (pid {pid} on {host}, started "
                            f"{holder.get('started', '?')}); choose another output_dir, or if that run is "
                            f"gone, delete {lock}") from None
        if pid is not None and _alive(pid):
            raise UserError(f"output_dir {output_dir} is held by a running run (pid {pid} on {host}, "
                            f"started {holder.get('started', '?')}); wait for it to finish or choose another "
                            "output_dir") from None
        log.warning("output_dir %s: taking over the lock of pid %s, which is no longer running", output_dir, pid)
        tmp = lock.with_name(LOCK_NAME + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me))
        tmp.replace(lock)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
    atexit.register(release_output_dir, output_dir)


def release_output_dir(output_dir: Path) -> None:
    """Remove this process's lock on ``output_dir`` (another process's lock is left alone)."""
    lock = Path(output_dir) / LOCK_NAME
    try:
        holder = json.loads(lock.read_text())
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            lock.unlink()
    except (OSError, ValueError):
        pass


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Hold the folder (``lock_output_dir``), and refuse to start over a run that already
    trained (nothing is lost) unless resuming."""
    output_dir = Path(output_dir)
    lock_output_dir(output_dir)
    if resume:
        return
    ckpts = output_dir / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.iterdir())) or (output_dir / "final").exists():
        release_output_dir(output_dir)  # refused: the folder is left as it was
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


def _fingerprint_path(name: str) -> dict:
    """Size and sha256 of a data file, of every file in a folder or matched by a glob; a name
    that is not on disk (a datasets name) stands for itself."""
    import glob

    p = Path(name)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(name, recursive=True) if Path(f).is_file())
    return {str(f): f"{f.stat().st_size}:{sha256_file(f)[:16]}" for f in files} or {name: "not a local file"}


DATA_KEYS = (("data", "train"), ("data", "validation"), ("data", "golden"), ("ppo", "ptx_data"))
MODEL_SHAPE_KEYS = ("shape", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings", "tie_word_embeddings")


def run_identity(stage: str, config: dict) -> dict:
    """What a checkpoint must share with the run that resumes it: the stage, the model, the
    adapter's shape, and a fingerprint of the data files (from the run's config dict)."""
    model = config.get("model") or config.get("policy") or {}
    adapter = config.get("adapter")
    data = {}
    for section, key in DATA_KEYS:
        value = (config.get(section) or {}).get(key)
        for name in ([value] if isinstance(value, str) else value or []):
            if name:
                data.update(_fingerprint_path(name))
    return {
        "stage": stage,
        "model": model["name_or_path"] if "name_or_path" in model else {k: model.get(k) for k in MODEL_SHAPE_KEYS},
        "adapter": None if not adapter or adapter.get("kind") == "none" else
        {k: adapter.get(k) for k in ("kind", "r", "target_modules")},
        "data": data,
    }


def check_identity(ckpt: Path, saved: dict | None, now: dict, allow_new_data: bool) -> None:
    """Refuse to resume ``ckpt`` into a different run; changed data only with ``allow_new_data``.
    A checkpoint from before identities were recorded (``saved`` None) is taken as it is."""
    if not saved:
        return
    if saved.get("stage") != now["stage"]:
        raise UserError(f"--resume: {ckpt} was written by `instructkit {saved.get('stage')}`, not "
                        f"`instructkit {now['stage']}`: resume it with that command, or give this run its own output_dir")
    for key, what in (("model", "model"), ("adapter", "adapter (kind, r, target_modules)")):
        if saved.get(key) != now[key]:
            raise UserError(f"--resume: {ckpt} was trained with {what} {saved.get(key)!r}, this run has "
                            f"{now[key]!r}; resume with the settings of its config.yaml, or start in a new output_dir")
    if saved.get("data") != now["data"]:
        old, new = saved.get("data") or {}, now["data"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if not allow_new_data:
            raise UserError(f"--resume: the data differs from what {ckpt} was trained on ({', '.join(changed)} "
                            "changed, added or removed); restore the data, or pass --allow-new-data to go on with "
                            "the new data (the position in the epoch is kept, so examples may be seen twice or skipped)")
        log.warning("--resume --allow-new-data: continuing %s on changed data (%s)", ckpt, ", ".join(changed))


def intact_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that passes ``verify_checkpoint``. A damaged newer one is renamed
    to ``step-N.damaged`` (kept for a look, no longer counted by keep_last) with a warning."""
    found = C.list_checkpoints(ckpt_root)
    damaged = []
    for ckpt in reversed(found):
        problem = C.verify_checkpoint(ckpt)
        if problem is None:
            break
        damaged.append((ckpt, problem))
    else:
        if damaged:
            raise UserError(f"--resume: every checkpoint in {ckpt_root} is damaged ("
                            + "; ".join(f"{c.name}: {why}" for c, why in damaged)
                            + "); start again in a new output_dir")
        return None
    if D.is_main():
        for bad, problem in damaged:
            aside = bad.with_name(bad.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(bad, aside)
            log.warning("--resume: %s is damaged (%s); moved to %s, resuming from %s", bad, problem, aside.name, ckpt)
    D.barrier()
    return ckpt


def restore(output_dir: Path, run: D.Wrapped, optimizer, stream: BatchStream, guard: StepGuard,
            identity: dict | None = None, allow_new_data: bool = False) -> tuple[int, dict, dict]:
    """Load the newest intact checkpoint into the model, optimizer, batch stream, guard and RNG,
    once its identity matches this run's (``check_identity``).

    Returns (step, loop state, extra tensors); (0, fresh state, {}) when there is none.
    """
    last = intact_checkpoint(Path(output_dir) / "checkpoints")
    if last is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", Path(output_dir) / "checkpoints")
        return 0, new_loop_state(), {}
    if identity is not None:
        check_identity(last, C.read_state(last).get("identity"), identity, allow_new_data)
    if C.is_sharded_checkpoint(last):
        restored = C.load_sharded_checkpoint(last, run.module, optimizer)
    elif run.sharded:
        raise UserError(
            f"{last} was written by a single process and cannot be resumed by several; resume it "
            "without torchrun, or start the distributed run in a new output_dir"
        )
    else:
        restored = C.load_checkpoint(last, run.module, optimizer)
    loop = restored["loop"]
    stream.load_state_dict(loop.pop("stream"))
    guard.total = loop.pop("skipped_steps", 0)
    set_rng_state(restored["rng"])
    return restored["step"], loop, restored["extra"]


def save(output_dir: Path, step: int, run: D.Wrapped, optimizer, loop: dict, stream: BatchStream,
         guard: StepGuard, keep_last: int, extra_tensors: dict | None = None,
         identity: dict | None = None) -> Path:
    state = {**loop, "stream": stream.state_dict(), "skipped_steps": guard.total}
    root = Path(output_dir) / "checkpoints"
    with explain_disk_full(root, f"the checkpoint of step {step}", lambda: resume_hint(output_dir)):
        if run.sharded:
            if extra_tensors:
                raise UserError("this stage keeps extra tensors in its checkpoints, which sharded runs do not support yet")
            return C.save_sharded_checkpoint(root, step, run.module, optimizer, state, get_rng_state(), keep_last,
                                             identity)
        return C.save_checkpoint(root, step, run.module, optimizer, state, get_rng_state(), keep_last, extra_tensors,
                                 identity)


def publish_final(output_dir: Path, run: D.Wrapped, save: Callable[[object], object]) -> Path:
    """``save(full_model)`` on rank 0 (the weights gathered from the shards under torchrun), the
    stage's own writer of ``output_dir/final``; a full disk is one line saying what is intact."""
    final = Path(output_dir) / "final"
    with explain_disk_full(final, "the final model", lambda: resume_hint(output_dir)):
        return D.save_on_main(run, save, final)


def resume_hint(output_dir: Path) -> str:
    """What a user can do after a run stopped on an error: checkpoints are written whole or not
    at all, so the newest one is as good as when it was saved."""
    last = C.latest_checkpoint(Path(output_dir) / "checkpoints")
    if last is None:
        return "no checkpoint had been written yet (train.save_every), so nothing is lost but the run"
    return f"the last checkpoint, {last}, is intact: fix the cause and add --resume to go on from it"


class TrainingRun:
    """What every training loop keeps around its steps: the learning-rate schedule, the step
    guard, the batch stream, metrics and progress, checkpoints and exact resume. ``fit`` and
    PPO hold one each, and a loop over it reads::

        while run.step < run.total:
            run.set_lr()
            ...                                  # the stage's forward and backward passes
            run.optimizer_step(loss, max_grad_norm)
            run.step += 1
            run.log(metrics, loss=...)           # and the progress bar's fields
            if due(run.step, t.save_every):
                run.save()
        run.end()

    On ``resume`` the newest intact checkpoint is loaded (:func:`restore`) into the model,
    optimizer, stream, guard and RNG, and ``step`` and ``loop`` (the state a stage keeps in
    its checkpoints: tokens seen, the best eval loss, PPO's KL controller) continue from it.
    """

    def __init__(self, name: str, out: Path, wrapped: D.Wrapped, optimizer, plan: Callable[[int], Sequence],
                 total: int, t: TrainConfig, log_cfg: LogConfig, config_dict: dict, precision: str, attn: str,
                 resume: bool, allow_new_data: bool = False):
        self.name, self.out, self.wrapped, self.optimizer, self.total, self.t = name, Path(out), wrapped, optimizer, total, t
        self.stream = BatchStream(plan)
        self.guard = StepGuard(t.max_nonfinite_steps, precision, attn, t.lr)
        self.identity = run_identity(name, config_dict)  # checked on resume, kept in every checkpoint
        self.step, self.loop, _ = (restore(self.out, wrapped, optimizer, self.stream, self.guard, self.identity,
                                           allow_new_data) if resume else (0, new_loop_state(), {}))
        self.logger = MetricsLogger(self.out, log_cfg, config_dict, resume_step=self.step if resume else None,
                                    main=D.is_main())
        self.bar = ProgressBar(total, self.step, log_cfg.progress and D.is_main(), name)

    def log_start(self, metrics: dict) -> None:
        """The run's first record: total steps, world size, trainable parameters and ``metrics``."""
        trainable = sum(p.numel() for p in self.wrapped.module.parameters() if p.requires_grad)
        self.logger.log(self.step, {"event": "start", "total_steps": self.total, "world_size": D.world_size(),
                                    "trainable_params": trainable, **metrics})

    def set_lr(self) -> None:
        """This step's learning rate: the schedule's multiplier of each group's base rate."""
        set_lr(self.optimizer, lr_multiplier(self.step, self.total, self.t))

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_step(self, loss: float, max_grad_norm: float | None) -> StepResult:
        """Clip, guard and update (:func:`~instructkit.engine.step.optimizer_step`); ``loss`` is
        the step's loss over all ranks, so every rank skips or takes the step together."""
        return optimizer_step(self.wrapped.module, self.optimizer, max_grad_norm, self.guard, loss, self.step)

    def log(self, metrics: dict, **progress) -> None:
        """``metrics`` as the record of the current step; ``progress`` fields (if any) to the bar."""
        self.logger.log(self.step, metrics)
        if progress:
            self.bar.update(self.step, **progress)

    def save(self) -> Path:
        """A checkpoint of the current step: model, optimizer, ``loop``, stream, guard and RNG."""
        return save(self.out, self.step, self.wrapped, self.optimizer, self.loop, self.stream, self.guard,
                    self.t.keep_last, identity=self.identity)

    def end(self) -> None:
        self.bar.close()
        self.logger.log(self.step, {"event": "end"})
        self.logger.close()


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
