"""Reward functions: ``fn(prompt, response, target) -> float`` in [0, 1].

``MathReward`` extracts the answer from the response and compares it numerically with
the target (extracted the same way, so ``"#### 42"`` and ``"3/4"`` targets work): 1.0
when they agree within ``tolerance`` (absolute, or relative for large numbers);
``partial_credit`` (default 0.0) when the right number appears elsewhere in the response.

Where the answer is, in order: the last ``<answer>...</answer>`` tag (an answer tag
without a number means *no answer*: nothing after it is taken instead), a GSM8K
``#### 42`` line, the last LaTeX ``\\boxed{...}`` (nested braces allowed), else the last
number of the text. What a number is: an integer (``1,234`` with thousands separators
only where they are separators — ``1,2,3`` is three numbers), a decimal (``2.5``,
``.5``), scientific notation (``1e3``), a fraction (``3/4``, ``\\frac{3}{4}``,
``\\dfrac``), with a sign (``-5``, ``−5`` with U+2212) only where it is not a binary minus
(``10-3`` ends with the number 3).

``ThinkingReward`` scores a ``<think>...</think>`` block that comes before the answer:
1.0 for one non-empty block, closed, with nothing before it and the answer after it;
``partial_credit`` (0.5) for a block that is empty, unclosed, misplaced or not followed
by an answer; 0.0 when there is none. When the prompt ends with ``<think>`` (a chat
template that opens the block), the response starts inside it.
"""

from __future__ import annotations

import math
import re

_MINUS = "-\u2212"  # ASCII hyphen-minus and U+2212
# A sign only where it cannot be a binary operator: not after a digit, letter, ')' or ']'.
_SIGNED = rf"(?:(?<![\w)\].])[{_MINUS}+])?"
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?|\.\d+"
_EXPONENT = rf"(?:[eE][{_MINUS}+]?\d+(?![\w]))?"
_NUMBER = re.compile(
    rf"(?P<num>{_SIGNED}(?:{_UNSIGNED}){_EXPONENT})(?:\s*/\s*(?P<den>(?:{_UNSIGNED}){_EXPONENT}))?"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_HASHES = re.compile(r"####\s*([^\n]*)")


def _to_float(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _numbers(text: str) -> list[float]:
    """Every number of ``text``, in order (fractions as their value)."""
    text = _FRAC.sub(lambda m: f"({m.group(1)})/({m.group(2)})", text)
    text = re.sub(r"\((\s*[^()]*?\s*)\)/\((\s*[^()]*?\s*)\)", r"\1/\2", text)  # (1)/(2) -> 1/2
    found = []
    for match in _NUMBER.finditer(text):
        value = _to_float(match.group("num"))
        if value is None:
            continue
        if match.group("den") is not None:
            denominator = _to_float(match.group("den"))
            if not denominator:
                continue
            value /= denominator
        found.append(value)
    return found


def parse_number(text: str) -> float | None:
    """The number ``text`` is (its last one), or None."""
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, nested braces matched; None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return text[i + 1:]  # unclosed: what there is


def extract_answer(text: str) -> float | None:
    """The numeric answer of ``text`` (see the module docstring for where it is looked for)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return parse_number(tags[-1])  # an empty or wordy answer tag is no answer
    hashes = _HASHES.findall(text)
    if hashes and (number := parse_number(hashes[-1].split()[0] if hashes[-1].split() else "")) is not None:
        return number
    boxed = _boxed(text)
    if boxed is not None and (number := parse_number(boxed)) is not None:
        return number
    return parse_number(text)


def same_number(a: float, b: float, tolerance: float) -> bool:
    """Equal within ``tolerance``, absolutely or relative to the larger magnitude."""
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


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
        if answer is not None and same_number(answer, expected, self.tolerance):
            return 1.0
        if self.partial_credit and any(same_number(n, expected, self.tolerance) for n in _numbers(response)):
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
        text = response
        if str(prompt).rstrip().endswith("<think>") and "<think>" not in response:
            text = "<think>" + response  # the chat template opened the block in the prompt
        opened = text.count("<think>")
        if not opened:
            return 0.0
        before, _, rest = text.partition("<think>")
        thought, closed, after = rest.partition("</think>")
        if (opened == 1 and closed and thought.strip() and not before.strip() and after.strip()
                and "<think>" not in after and "</think>" not in after):
            return 1.0
        return self.partial_credit
