"""The tool-use demo's environment: two-digit addition with a calculator.

The tiny model cannot add two-digit numbers by itself in a few minutes of RL, but it can
learn to call the calculator and copy its answer. A turn containing ``?`` calls the
calculator on the question (``CompactToolCalls``: a character-level model cannot spell a
tool name; a model with a real tokenizer would use ``JsonToolCalls``); the result comes
back as an observation, ``"68\\n"``; the next turn without a call is the answer.

    prompt "23+45="   model "?"   calculator "68\\n"   model "68</s>"   reward 1.0

Reward: 1 for the exact answer, else half the share of the answer's digits right in
place (a signal for each digit: two right tokens in a row are rarely sampled at first).
"""

from __future__ import annotations

import functools
from typing import Any

from forge.envs import CompactToolCalls, ToolEnvironment, ToolRegistry, calculator


class AdditionWithCalculator(ToolEnvironment):
    def __init__(self, tools: ToolRegistry) -> None:
        super().__init__(tools, CompactToolCalls("calculator", marker="?", end="\n"))
        self.question = self.target = ""

    def reset(self, row: dict[str, Any]) -> str:
        self.question, self.target = row["question"], str(row["target"])
        return row["request"]

    def default_argument(self) -> str:
        return self.question

    def score(self, answer: str) -> float:
        answer = answer.strip()
        if answer == self.target:
            return 1.0
        return 0.5 * sum(a == b for a, b in zip(answer, self.target)) / len(self.target)


@functools.lru_cache(maxsize=None)
def _tools(timeout_s: float) -> ToolRegistry:
    """One registry (and thread pool) per process, shared by every episode."""
    return ToolRegistry({"calculator": calculator}, timeout_s=timeout_s)


def make_env(tool_timeout_s: float = 2.0) -> AdditionWithCalculator:
    """``env.factory`` of apps/tool_use/default.yaml: a new episode's environment."""
    return AdditionWithCalculator(_tools(float(tool_timeout_s)))
