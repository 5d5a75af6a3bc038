"""The seeds' service snippets, run as written (inside async tests) on real processes.

The ForgeCounter class is copied verbatim from the seed: it mixes sync and async
endpoints, which plain Monarch refuses; a ForgeActor must accept it (issue 7).
"""

import pytest
from monarch.actor import endpoint

from forge.controller import ForgeActor
from forge.data.rewards import MathReward, ThinkingReward

pytestmark = pytest.mark.timeout(90)


class ForgeCounter(ForgeActor):
    def __init__(self, initial_value: int):
        self.value = initial_value

    @endpoint
    def increment(self) -> int:
        self.value += 1
        return self.value

    @endpoint
    def get_value(self) -> int:
        return self.value

    @endpoint
    async def reset(self):
        self.value = 0


async def test_forge_counter_service_routes_round_robin_fans_out_and_keeps_sessions(capsys):
    counter_service = await ForgeCounter.options(procs=1, num_replicas=4).as_service(initial_value=0)
    try:
        # WITHOUT SESSIONS: each .route() goes to another replica (round robin)
        await counter_service.increment.route()
        await counter_service.increment.route()
        await counter_service.increment.route()

        results = await counter_service.increment.fanout()
        print(f"All replica values: {results}")
        assert sorted(results) == [1, 2, 2, 2]  # three replicas got one route each, then all +1

        # WITH SESSIONS: all calls go to the SAME replica
        async with counter_service.session():
            await counter_service.reset.route()
            assert await counter_service.increment.route() == 1
            assert await counter_service.increment.route() == 2
            assert await counter_service.increment.route() == 3
            final_value = await counter_service.get_value.route()
            assert final_value == 3
        values = await counter_service.get_value.fanout()
        assert values.count(3) == 1  # only the session's replica was reset and counted to 3
    finally:
        await counter_service.shutdown()
    assert "All replica values" in capsys.readouterr().out


async def test_forge_counter_as_a_single_actor_mixes_sync_and_async_endpoints():
    counter = await ForgeCounter.options(procs=1).as_actor(initial_value=5)
    try:
        assert await counter.increment.call_one() == 6
        assert await counter.get_value.choose() == 6
        await counter.reset.call_one()
        assert await counter.get_value.call_one() == 0
        values = await counter.increment.call()
        assert [v for _, v in values.items()] == [1]
    finally:
        await ForgeCounter.shutdown(counter)


class RewardActor(ForgeActor):
    def __init__(self, reward_functions: list):
        self.reward_functions = reward_functions

    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: str) -> float:
        """Evaluate response quality using multiple reward functions"""
        total_reward = 0.0
        for reward_fn in self.reward_functions:
            reward = reward_fn(prompt, response, target)
            total_reward += reward
        return total_reward / len(self.reward_functions) if self.reward_functions else 0.0


async def test_reward_service_example_scores_a_correct_answer():
    reward_actor = await RewardActor.options(
        procs=1, num_replicas=1
    ).as_service(
        reward_functions=[MathReward(), ThinkingReward()]
    )
    try:
        prompt = "What is 15% of 240?"
        response = "15% of 240 is 36"
        target = "36"

        score = await reward_actor.evaluate_response.route(
            prompt=prompt,
            response=response,
            target=target
        )
        print(f"Reward score: {score}")
        assert score == 0.5  # MathReward 1.0, ThinkingReward 0.0 (no <think> block)
        thought = await reward_actor.evaluate_response.route(prompt, "<think>15% is 0.15</think> 36", target)
        assert thought == 1.0
        wrong = await reward_actor.evaluate_response.call_one(prompt=prompt, response="15% of 240 is 35", target=target)
        assert wrong == 0.0
    finally:
        # Cleanup when done
        await reward_actor.shutdown()
