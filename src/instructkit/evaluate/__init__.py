"""Evaluation (``instructkit eval``) and an interactive chat (``instructkit chat``).

- :func:`instructkit.evaluate.run.run` ``(cfg: EvalConfig) -> dict``: the tasks of the config
  (perplexity, reward_accuracy, samples, judge, pairwise), written to ``output_dir/eval.json``
  and ``eval.md``;
- :func:`instructkit.evaluate.chat.chat`: a chat session on a terminal (or any text streams).

Submodules are imported lazily: importing this package does not load torch.
"""

from instructkit.evaluate.config import TASKS, EvalConfig

__all__ = ["TASKS", "EvalConfig"]
