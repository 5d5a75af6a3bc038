"""Environments for multi-turn and tool-using RL: the interface, tools and the rollout driver.

    class Addition(ToolEnvironment):
        def reset(self, row): ...; def score(self, answer): ...
    rollouts = await run_group(policy, make_env, row, tokenizer, n=8, max_turns=3, max_tokens=24)

See ``forge.envs.base`` for the interface and the rollout layout (policy segments are
trained on, environment segments are context only).
"""

from forge.envs.base import ENV, POLICY, Environment, Rollout, Segment, StepResult, Turn
from forge.envs.rollout import EpisodeError, run_episode, run_group
from forge.envs.tools import (
    CompactToolCalls,
    JsonToolCalls,
    ToolCall,
    ToolCallFormat,
    ToolEnvironment,
    ToolRegistry,
    ToolResult,
    calculator,
)

__all__ = ["ENV", "POLICY", "EpisodeError", "Environment", "Rollout", "Segment", "StepResult", "Turn", "run_episode", "run_group",
           "CompactToolCalls", "JsonToolCalls", "ToolCall", "ToolCallFormat", "ToolEnvironment", "ToolRegistry",
           "ToolResult", "calculator"]
