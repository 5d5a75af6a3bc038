"""The tool-use demo's environment: two-digit addition with a calculator.

The tiny model cannot add two-digit numbers by itself in a few minutes of RL, but it can
learn to call the calculator and copy its answer. A turn containing ``?`` calls the
calculator on the question (``CompactToolCalls``: a character-level model cannot spell a
tool name; a model with a real tokenizer would use ``JsonToolCalls``); the result comes
back as an observation, ``"68\\n"``; the next turn without a call is the answer.

    prompt "23+45="   model "?"   calculator "68\\n"   model "68</s>"   reward 1.0

Reward: ``call_bonus`` for calling the calculator at least once, plus ``1 - call_bonus``
times the answer's score: 1 for the exact answer, else half the share of its digits right
in place (a signal for each digit: two right tokens in a row are rarely sampled at first).

Why the bonus: without it, a random policy that calls the tool gets nothing for it until
it can also copy the result, and copying cannot be learned while it rarely calls. Measured
here: with no bonus the model never took up the tool in 800 steps and learned to add
directly instead (reward 0.43, greedy accuracy 0.41 at step 800).
"""

from __future__ import annotations

import functools
from typing import Any

from forge.envs import CompactToolCalls, ToolEnvironment, ToolRegistry, calculator
from forge.util.checks import check_number, check_seconds


class AdditionWithCalculator(ToolEnvironment):
    def __init__(self, tools: ToolRegistry, call_bonus: float = 0.1) -> None:
        super().__init__(tools, CompactToolCalls("calculator", marker="?", end="\n"))
        self.call_bonus = call_bonus
        self.question = self.target = ""

    def reset(self, row: dict[str, Any]) -> str:
        self.question, self.target = row["question"], str(row["target"])
        return row["request"]

    def default_argument(self) -> str:
        return self.question

    def score(self, answer: str) -> float:
        answer = answer.strip()
        if answer == self.target:
            correct = 1.0
        else:
            correct = 0.5 * sum(a == b for a, b in zip(answer, self.target)) / len(self.target)
        return self.call_bonus * (self.tool_calls > 0) + (1 - self.call_bonus) * correct


@functools.lru_cache(maxsize=None)
def _tools(timeout_s: float) -> ToolRegistry:
    """One registry (and thread pool) per process, shared by every episode."""
    return ToolRegistry({"calculator": calculator}, timeout_s=timeout_s)


def make_env(tool_timeout_s: float = 2.0, call_bonus: float = 0.1) -> AdditionWithCalculator:
    """``env.factory`` of apps/tool_use/default.yaml: a new episode's environment."""
    check_number("env.args.call_bonus", call_bonus, 0, 1)
    return AdditionWithCalculator(_tools(check_seconds("env.args.tool_timeout_s", tool_timeout_s)), call_bonus)
