"""Programmatic rewards for PPO and GRPO (``reward.function: instructkit.rewards:<name>``).

Each is ``fn(prompts: list[str], responses: list[str], **fields) -> list[float]``. ``fields``
are the prompt records' other fields that the function names as parameters (GRPO passes them:
the gsm8k ``answer`` of each prompt, one list entry per response), and keyword settings come
from ``reward.functions: [{function: ..., kwargs: {...}}]``. Write your own the same way in any
module importable from the working directory.

The verifiable rewards: :func:`gsm8k_match` (final number), :func:`math_answer` (an answer
checked by math-verify), :func:`format_match` (a required pattern) and :func:`length_penalty`.
"""

from __future__ import annotations

import math
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


def final_answer(text: str) -> str | None:
    """The number a gsm8k-style answer gives: the first number after the last ``####`` when
    there is one (the dataset's reference answers end in ``#### 72``; what a model writes after
    the marked answer does not count), else the last number in the text."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found is not None:
            return found.group().replace(",", "")
    return last_number(text)


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=0.0, abs_tol=1e-6)


def gsm8k_match(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1 when the response's final number (:func:`final_answer`) equals the reference's, else
    0. ``answer``: each prompt's reference, a full gsm8k solution or just the number."""
    return [float(_same_number(final_answer(r), final_answer(str(a)))) for r, a in zip(responses, answer)]


def math_answer(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1 when math-verify finds the response's answer equal to the reference (numbers,
    fractions, LaTeX expressions, ``\\boxed{}``), else 0; a response it cannot parse scores 0.
    Needs the ``math-verify`` package (``pip install 'instructkit[rl]'``)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        from instructkit.errors import UserError

        raise UserError("instructkit.rewards:math_answer needs math-verify: pip install 'instructkit[rl]'") from None
    out = []
    for r, a in zip(responses, answer):
        try:
            gold, pred = parse(str(a)), parse(r)
            out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong one
            out.append(0.0)
    return out


def format_match(prompts: list[str], responses: list[str], pattern: str = r"####\s*-?[\d,]*\.?\d+\s*$") -> list[float]:
    """1 when the response contains ``pattern`` (a regular expression, searched with
    MULTILINE; the default: ends in a gsm8k ``#### <number>`` line), else 0."""
    rx = re.compile(pattern, re.MULTILINE)
    return [float(rx.search(r) is not None) for r in responses]


def length_penalty(prompts: list[str], responses: list[str], max_words: int = 200, soft_words: int = 50) -> list[float]:
    """0 up to ``max_words - soft_words`` words, falling linearly to -1 at ``max_words`` and -1
    beyond (DAPO's soft overlong penalty, counted in words): add it to a correctness reward."""
    start = max_words - soft_words
    return [0.0 - min(1.0, max(0.0, (len(r.split()) - start) / max(soft_words, 1))) for r in responses]
