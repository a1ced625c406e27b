"""Metrics: JSONL always, TensorBoard by default, W&B on request; a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from instructkit.config import LogConfig
from instructkit.redact import redact


def truncate_jsonl(path: Path, step: int | None) -> None:
    """Keep the records of ``path`` up to ``step`` (a resumed run continues one curve, with no
    step twice); ``step=None`` (a fresh run) empties it. A line cut by a crash is dropped."""
    if step is None:
        if path.exists():
            path.write_text("")
        return
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            pass
    path.write_text("".join(l + "\n" for l in keep))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep it readable
    return v


class MetricsLogger:
    """Writes ``metrics.jsonl`` and forwards scalars to TensorBoard / W&B.

    On resume the JSONL records after the resumed step are dropped, so the file holds one
    continuous curve.
    """

    def __init__(self, output_dir: Path, cfg: LogConfig, config: dict, resume_step: int | None = None, main: bool = True):
        self.main = main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):  # the run's step-keyed records
            truncate_jsonl(Path(output_dir) / name, resume_step)
        self._file = open(self.path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                from instructkit.errors import UserError

                raise UserError("log.wandb=true needs wandb: pip install 'instructkit[wandb]'") from None
            self.wandb = wandb.init(
                project=cfg.wandb_project, name=cfg.wandb_run_name, config=redact(config),
                resume="allow",
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.main and self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.main and self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if not self.main:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class ProgressBar:
    """A rich progress bar with tokens/s and ETA; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, description: str = "train"):
        self.progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=initial, info="")

    def update(self, step: int, **info) -> None:
        if self.progress is None:
            return
        text = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
        )
        self.progress.update(self.task, completed=step, info=text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
