"""Multi-turn episodes against a real Policy service: the rollout driver's bounds, sessions,
the prefix cache across turns, and the seed's ``optimized_multi_turn`` block."""

import pytest

from forge.actors.policy import Policy
from forge.envs import ENV, POLICY, Environment, EpisodeError, StepResult, run_group
from forge.models import load_tokenizer

pytestmark = pytest.mark.timeout(180)

ENGINE = {"model": "tiny", "max_model_len": 128}


class Chatty(Environment):
    """Answers every turn with the same observation and never ends the episode itself."""

    stop_tokens = ("?",)

    def reset(self, row):
        self.turns = []
        return row["question"]

    async def step(self, turn):
        self.turns.append(turn)
        return StepResult("= 12 =\n")

    def reward(self):
        return float(len(self.turns))


class Broken(Chatty):
    async def step(self, turn):
        return 1 / 0


async def cache_stats(policy) -> list[dict]:
    return await policy.engine_stats.fanout()


async def test_episodes_are_bounded_masked_and_reuse_their_conversation_in_the_prefix_cache():
    tokenizer = load_tokenizer("tiny")
    policy = await Policy.options(procs=1, num_replicas=2).as_service(
        engine_config=ENGINE, sampling_config={"max_tokens": 6, "temperature": 1.0})
    try:
        row = {"question": "12+34= 56+78= 90+12= 34+56= 78+90= 12+34= 56+78= 90+12="}  # 56 tokens: whole blocks
        turn = {"max_tokens": 6}  # one turn's bound; the episode's is max_tokens
        by_turns = await run_group(policy, Chatty, row, tokenizer, n=4, seed=7, max_turns=3, max_tokens=64,
                                   sampling_config=turn)
        assert len(by_turns) == 4
        for rollout in by_turns:
            sources = [s.source for s in rollout.segments]
            assert sources == [POLICY, ENV] * 3 and rollout.finish_reason == "max_turns"
            assert rollout.reward == 3.0 and rollout.num_turns == 3
            mask, ids = rollout.loss_mask.tolist(), rollout.token_ids.tolist()
            policy_ids = [t for s in rollout.segments if s.source == POLICY for t in s.token_ids]
            assert [t for t, m in zip(ids, mask) if m] == policy_ids  # the mask covers exactly the model's tokens
            assert all(len(s.token_ids) <= 6 for s in rollout.segments if s.source == POLICY)
            observation = tokenizer("= 12 =\n", add_special_tokens=False)["input_ids"]
            assert all(s.token_ids == observation for s in rollout.segments if s.source == ENV)
        again = await run_group(policy, Chatty, row, tokenizer, n=4, seed=7, max_turns=3, max_tokens=64,
                                sampling_config=turn)
        assert [r.token_ids.tolist() for r in again] == [r.token_ids.tolist() for r in by_turns]  # seeded

        by_tokens = await run_group(policy, Chatty, row, tokenizer, n=2, seed=1, max_turns=10, max_tokens=9,
                                    sampling_config=turn)
        for rollout in by_tokens:
            assert len(rollout.token_ids) <= 9 and rollout.finish_reason == "max_tokens"

        # the engine's max_model_len bounds the conversation too: the episode ends before outgrowing it
        short = await run_group(policy, Chatty, row, tokenizer, n=2, seed=3, max_turns=10, max_tokens=64,
                                sampling_config=turn, max_context=70)
        assert all(len(r.prompt_ids) + len(r.token_ids) <= 69 and r.finish_reason == "max_tokens" for r in short)

        # an environment that fails is named; the group's other episodes still finish
        with pytest.raises(EpisodeError, match=r"Broken.step raised ZeroDivisionError: division by zero"):
            envs = iter([Broken(), Chatty(), Chatty()])
            await run_group(policy, lambda: next(envs), row, tokenizer, n=3, max_turns=2, max_tokens=20,
                            sampling_config=turn)

        with pytest.raises(Exception, match=r"outside the model's vocabulary \[0, \d+\): \[100000\]"):
            await policy.generate.route([5, 100000])  # refused before the engine's batch would fail on it

        stats = await cache_stats(policy)  # turns 2 and 3 of every episode found their conversation cached
        assert sum(s["prompt_tokens_cached"] for s in stats) > 0 and sum(s["prefix_cache_hits"] for s in stats) >= 16
    finally:
        await policy.shutdown()


async def test_the_seed_optimized_multi_turn_block_hits_the_cache_on_turns_2_and_3():
    policy = await Policy.options(procs=1, num_replicas=2).as_service(
        engine_config=ENGINE, sampling_config={"n": 1, "max_tokens": 8, "temperature": 0.0})
    question1 = "12+34= 56+78= 90+12= 34+56= 78+90= 12+34= 56+78= 90+12= 3+4="

    async def cached() -> int:
        return sum(s["prompt_tokens_cached"] for s in await cache_stats(policy))

    try:
        hits = []
        # --- the seed's block (optimized_multi_turn) ---
        async with policy.session():
            # All calls guaranteed to hit same replica = cache hits
            response1 = await policy.generate.route(prompt=question1)
            hits.append(await cached())
            full_prompt = question1 + response1[0].text
            response2 = await policy.generate.route(prompt=full_prompt)  # Cache hit!
            hits.append(await cached())
            conversation = full_prompt + response2[0].text
            response3 = await policy.generate.route(prompt=conversation)   # Cache hit!
            hits.append(await cached())
        # Session ends, replica can be garbage collected or reused
        assert hits[0] == 0 and hits[1] > hits[0] and hits[2] > hits[1]
        assert response3[0].prompt == conversation
    finally:
        await policy.shutdown()
