"""forge.envs without processes: tools (errors, timeouts, formats), rollouts' masks, and the
loss path that keeps environment tokens out of the gradient."""

import asyncio
import time

import pytest
import torch

from forge.actors.replay_buffer import check_episode
from forge.data.batch import collate
from forge.envs import (
    ENV,
    POLICY,
    CompactToolCalls,
    JsonToolCalls,
    Rollout,
    Segment,
    StepResult,
    ToolCall,
    ToolEnvironment,
    ToolRegistry,
    Turn,
    calculator,
)
from forge.losses import LossConfig, grpo_loss, sequence_logprobs


def test_calculator_does_arithmetic_and_nothing_else():
    assert calculator("12+34=") == "46" and calculator("7/2") == "3.5" and calculator("-(2**3)*4") == "-32"
    for bad in ("__import__('os').system('true')", "x+1", "2**1000", "", "1+", "(((9**64)**64)**64)**16"):
        with pytest.raises((ValueError, ZeroDivisionError)):
            calculator(bad)


def test_tools_that_raise_time_out_or_do_not_exist_give_error_observations():
    def slow(_: str) -> str:
        time.sleep(1.0)
        return "late"

    async def slow_async(_: str) -> str:
        await asyncio.sleep(5)
        return "late"

    tools = ToolRegistry({"calculator": calculator, "slow": slow, "slow_async": slow_async}, timeout_s=0.2)

    async def main():
        return [await tools.call(call) for call in (
            ToolCall("calculator", "6*7"), ToolCall("calculator", "1/0"), ToolCall("slow", "x"),
            ToolCall("slow_async", "x"), ToolCall("search", "x"), ToolCall("?", error="bad JSON"))]

    ok, raised, slow_sync, slow_coro, unknown, malformed = asyncio.run(main())
    assert ok.ok and ok.text == "42"
    assert not raised.ok and raised.text.startswith("error: ZeroDivisionError")
    assert not slow_sync.ok and "timed out after 0.2 s" in slow_sync.text
    assert not slow_coro.ok and "timed out" in slow_coro.text
    assert not unknown.ok and "unknown tool 'search'" in unknown.text and "calculator" in unknown.text
    assert malformed.text == "error: bad JSON"
    with pytest.raises(ValueError, match="tool name"):
        ToolRegistry({"not a name": calculator})
    with pytest.raises(ValueError, match="timeout_s"):
        ToolRegistry(timeout_s=0)


def test_a_hung_sync_tool_keeps_its_thread_and_later_calls_wait_for_a_free_one_then_give_up():
    def hang(_: str) -> str:
        time.sleep(1.5)
        return "late"

    tools = ToolRegistry({"hang": hang, "calculator": calculator}, timeout_s=0.2, max_workers=1, queue_timeout_s=0.3)

    async def main():
        first = await tools.call(ToolCall("hang", "x"))  # times out; its thread runs on
        blocked = await tools.call(ToolCall("calculator", "1+1"))  # no free thread within 0.3 s
        await asyncio.sleep(1.5)
        freed = await tools.call(ToolCall("calculator", "1+1"))  # the hung call returned: its slot is free
        return first, blocked, freed

    first, blocked, freed = asyncio.run(main())
    assert "timed out" in first.text and not blocked.ok and "did not start" in blocked.text and freed.text == "2"


def test_json_tool_calls_parse_and_render_in_the_hermes_format():
    calls = JsonToolCalls().parse('<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
                                  '<tool_call>{"name": oops}</tool_call>')
    assert calls[0] == ToolCall("calculator", {"expression": "2+3"})
    assert calls[1].error and "not valid JSON" in calls[1].error
    assert JsonToolCalls().parse("the answer is 5") == []
    assert CompactToolCalls("calculator").parse("12+1?") == [ToolCall("calculator", "12+1")]
    assert CompactToolCalls("calculator").parse("?") == [ToolCall("calculator", None)]


class Addition(ToolEnvironment):
    def __init__(self, tools):
        super().__init__(tools, CompactToolCalls("calculator"))

    def reset(self, row):
        self.question, self.target = row["question"], row["target"]
        return row["question"]

    def default_argument(self):
        return self.question

    def score(self, answer):
        return float(answer.strip() == self.target)


def test_a_failing_tool_call_is_observed_and_the_episode_goes_on():
    tools = ToolRegistry({"calculator": calculator}, timeout_s=1)
    env = Addition(tools)
    env.reset({"question": "12+30=", "target": "42"})

    async def main():
        bad = await env.step(Turn("1/0?", [], "stop", 0))
        good = await env.step(Turn("?", [], "stop", 1))
        final = await env.step(Turn("42", [], "stop", 2))
        return bad, good, final

    bad, good, final = asyncio.run(main())
    assert not bad.done and bad.observation.startswith("error: ZeroDivisionError")
    assert good == StepResult("42\n") and final.done
    assert env.reward() == 1.0 and env.info() == {"tool_calls": 2.0, "tool_errors": 1.0, "answered": 1.0}
    with pytest.raises(ValueError, match="observation"):
        StepResult()


def rollout() -> Rollout:
    return Rollout("1+2=", torch.tensor([5, 6, 7]), [
        Segment(POLICY, "?", [20], [-0.5], version=3),
        Segment(ENV, "3\n", [8, 9]),
        Segment(POLICY, "3", [8, 2], [-0.1, -0.2], version=4),
    ], reward=1.0, finish_reason="done")


def test_a_rollout_masks_environment_tokens_and_keeps_the_oldest_version():
    r = rollout()
    assert r.token_ids.tolist() == [20, 8, 9, 8, 2]
    assert r.loss_mask.tolist() == [1, 0, 0, 1, 1]
    assert r.logprobs.tolist() == pytest.approx([-0.5, 0, 0, -0.1, -0.2])
    assert r.generator_version == 3 and r.num_turns == 2 and r.text == "?3\n3"
    assert [t["role"] for t in r.conversation()] == ["prompt", "policy", "env", "policy"]


def test_the_loss_mask_covers_exactly_the_policy_tokens_and_environment_tokens_get_no_gradient():
    from forge.models import load_model

    r = rollout()
    prompt, response = r.prompt_ids.tolist(), r.token_ids.tolist()
    inputs, targets = collate([prompt, prompt], [response, response[:1]], [r.logprobs.tolist(), [-0.5]],
                              [r.logprobs.tolist(), [-0.5]], [1.0, -1.0], 0, [r.loss_mask.tolist(), None])
    assert targets.response_mask.tolist() == [[0, 0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0, 0, 0]]
    model = load_model("tiny")
    logits = model(input_ids=inputs.tokens, attention_mask=inputs.attention_mask).logits
    logits.retain_grad()
    logp = sequence_logprobs(logits, inputs.tokens, 1.0)
    loss, metrics = grpo_loss(logp, targets.behaviour_logprobs, targets.ref_logprobs, targets.advantages,
                              targets.response_mask, LossConfig(beta=0.04))
    loss.backward()
    # position t's logits predict token t + 1: the environment's tokens 4 and 5 are predicted at 3 and 4
    per_position = logits.grad[0].abs().sum(-1)
    assert per_position[3].item() == 0 and per_position[4].item() == 0
    assert all(per_position[t].item() > 0 for t in (2, 5, 6))
    assert metrics["num_tokens"] == 4


def test_the_replay_buffer_refuses_a_response_mask_that_does_not_fit():
    from apps.grpo.actors import Episode

    episode = Episode("e", "1+2=", 0, 0, 3, 3, request_tokens=[1, 2], response_tokens=[3, 4, 5],
                      response_logprobs=[0.0] * 3, advantage=0.0, reward=0.0, response_mask=[1, 0, 1])
    check_episode(episode)
    for bad in ([1, 0], [0, 0, 0], [1, 2, 1]):
        episode.response_mask = bad
        with pytest.raises(ValueError, match="response_mask"):
            check_episode(episode)
