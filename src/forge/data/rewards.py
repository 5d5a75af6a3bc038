"""Reward functions: ``fn(prompt, response, target) -> float`` in [0, 1].

``MathReward`` extracts the answer from the response — from ``<answer>...</answer>``
tags, a GSM8K ``#### 42`` line, a LaTeX ``\\boxed{42}``, or else the last number — and
compares it numerically with the target (also extracted, so ``"#### 42"`` targets
work). 1.0 when equal within ``tolerance``; ``partial_credit`` (default 0.0) when the
right number appears somewhere in the response but is not the extracted answer.

``ThinkingReward`` scores a ``<think>...</think>`` block: 1.0 for exactly one non-empty
block before the answer, ``partial_credit`` (0.5) for a block that is empty or left
unclosed, 0.0 when there is none.
"""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The numeric answer of ``text`` (see the module docstring for the order tried)."""
    for pattern in (_ANSWER_TAG, _HASHES, _BOXED):
        found = pattern.findall(text)
        if found:
            numbers = _ANY_NUMBER.findall(found[-1])
            if numbers:
                return parse_number(numbers[-1])
    numbers = _ANY_NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


class MathReward:
    """1.0 for the right number; see the module docstring."""

    def __init__(self, tolerance: float = 1e-6, partial_credit: float = 0.0) -> None:
        self.tolerance = tolerance
        self.partial_credit = partial_credit

    @property
    def name(self) -> str:
        return "math"

    def __call__(self, prompt: str, response: str, target: str) -> float:
        expected = extract_answer(str(target))
        if expected is None:
            return 0.0
        answer = extract_answer(response)
        if answer is not None and abs(answer - expected) <= self.tolerance:
            return 1.0
        if self.partial_credit and any(
            (n := parse_number(m)) is not None and abs(n - expected) <= self.tolerance
            for m in _ANY_NUMBER.findall(response)
        ):
            return self.partial_credit
        return 0.0


class ThinkingReward:
    """Rewards a ``<think>`` block before the answer; see the module docstring."""

    def __init__(self, partial_credit: float = 0.5) -> None:
        self.partial_credit = partial_credit

    @property
    def name(self) -> str:
        return "thinking"

    def __call__(self, prompt: str, response: str, target: str) -> float:
        blocks = re.findall(r"<think>(.*?)</think>", response, re.S)
        if len(blocks) == 1 and blocks[0].strip():
            return 1.0
        if blocks or "<think>" in response:
            return self.partial_credit
        return 0.0
