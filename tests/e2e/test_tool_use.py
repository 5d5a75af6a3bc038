"""The tool-use demo (apps/tool_use) end to end: a short run learns to call the calculator."""

import json
import re
import statistics
from pathlib import Path

import pytest

from apps.grpo.config import GRPOConfig
from apps.grpo.main import run
from forge.util.config import load_config

TOOL_USE = Path(__file__).resolve().parents[2] / "apps" / "tool_use" / "default.yaml"
SHORT = ["run.max_steps=40", "replay_buffer.batch_size=64", "trainer.training.local_batch_size=64",
         "run.eval_every=0", "run.target_reward=null", "run.checkpoint_every=0", "run.export=none", "metrics=[jsonl]"]


@pytest.mark.timeout(300)
async def test_a_short_tool_use_run_takes_up_the_calculator_and_its_reward_rises(tmp_path):
    cfg = load_config(GRPOConfig, TOOL_USE, SHORT + [f"run.output_dir={tmp_path}"])
    summary = await run(cfg, tmp_path)
    assert summary["steps"] == 40
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [line["reward/mean"] for line in lines if "reward/mean" in line]  # steps that had new groups
    assert statistics.mean(rewards[-10:]) > statistics.mean(rewards[:10]) + 0.05, rewards
    drained = [line for line in lines if "env/tool_calls" in line]  # every log_every steps
    assert drained[-1]["env/tool_calls"] >= 0.8 and drained[-1]["rollout/env_tokens"] > 0, drained[-1]
    assert drained[-1]["rollout/turns"] > 1.5  # a call, then an answer
    # the logs show whole conversations: a bare "?" gets the question's sum back from the calculator
    logged = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [10, 20, 30, 40]
    calls = [(s["prompt"], after["text"]) for entry in logged for s in entry["samples"]
             for turn, after in zip(s["turns"], s["turns"][1:]) if turn == {"role": "policy", "text": "?"}]
    a, b = zip(*(map(int, re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()) for prompt, _ in calls))
    assert calls and [result for _, result in calls] == [f"{x + y}\n" for x, y in zip(a, b)], calls
