"""Programmatic rewards for PPO (``reward.function: instructkit.rewards:<name>``).

Each is ``fn(prompts: list[str], responses: list[str]) -> list[float]``. Write your own the
same way in any module importable from the working directory.
"""

from __future__ import annotations

import re


def says_the(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's words that are "the": a dense toy preference (the most common
    English word) that a small model fine-tuned on English text learns in a few dozen PPO
    steps; the tiny configs and the tests use it."""
    out = []
    for r in responses:
        words = re.findall(r"[A-Za-z']+", r.lower())
        out.append(sum(w == "the" for w in words) / max(len(words), 1))
    return out


def brevity(prompts: list[str], responses: list[str], target_words: int = 30) -> list[float]:
    """1 for an answer of at most ``target_words`` words, falling linearly to 0 at twice that."""
    out = []
    for r in responses:
        n = len(r.split())
        out.append(max(0.0, min(1.0, 2.0 - n / target_words)))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators (gsm8k answers end in one)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None
