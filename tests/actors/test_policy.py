"""The Policy service over real processes: generate, weight updates, versions, bad config."""

import asyncio

import pytest
import torch

from forge.actors.policy import Completion, Policy
from forge.models import load_model, load_tokenizer
from tests.helpers import monarch_descendants

pytestmark = pytest.mark.timeout(180)

ENGINE = {"model": "tiny", "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "enforce_eager": False,
          "max_model_len": 64}


async def test_policy_service_generates_updates_weights_and_reports_versions():
    policy = await Policy.options(procs=1, with_gpus=False, num_replicas=2).as_service(
        engine_config=ENGINE, sampling_config={"n": 3, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    )
    try:
        responses = await policy.generate.route("3+5=")
        assert len(responses) == 3 and all(isinstance(r, Completion) for r in responses)
        first = responses[0]
        assert first.prompt == "3+5=" and isinstance(first.text, str)
        input_ids = torch.cat([first.prompt_ids, first.token_ids])  # as the seeds do
        assert input_ids.dtype == torch.long and len(first.logprobs) == len(first.token_ids)
        assert first.logprobs.dtype == torch.float32 and bool((first.logprobs <= 0).all())
        assert first.stop_reason in ("stop", "length") and first.generator_version == 0

        # one message for several prompts: with a seed each, the same samples as one call per prompt
        prompts = ["3+5=", "1+2=", [{"role": "user", "content": "4+4="}]]
        seeds = [{"seed": 11}, {"seed": 12}, {"seed": 13}]
        batched = await policy.generate_batch.route(prompts, sampling_config=seeds)
        alone = [await policy.generate.route(p, sampling_config=c) for p, c in zip(prompts, seeds)]
        assert [len(g) for g in batched] == [3, 3, 3] and batched[2][0].prompt == prompts[2]
        assert ([[c.token_ids.tolist() for c in g] for g in batched]
                == [[c.token_ids.tolist() for c in g] for g in alone])
        for group, single in zip(batched, alone):
            for c, d in zip(group, single):
                torch.testing.assert_close(c.logprobs, d.logprobs, atol=1e-5, rtol=0)
        with pytest.raises(Exception, match="2 sampling configs for 3 prompts"):
            await policy.generate_batch.route(prompts, sampling_config=seeds[:2])

        chat = await policy.generate.route([{"role": "user", "content": "3+5="}],
                                           sampling_config={"n": 1, "temperature": 0})
        plain = await policy.generate.route("3+5=", sampling_config={"n": 1, "temperature": 0})
        assert chat[0].token_ids.tolist() == plain[0].token_ids.tolist()

        assert await policy.get_version.fanout() == [0, 0]
        local = load_model("tiny", impl="transformers")  # the reference for what the replicas serve
        torch.manual_seed(3)
        new_weights = {k: v + 0.05 * torch.randn_like(v) for k, v in local.state_dict().items()}
        assert await policy.update_weights.fanout(policy_version=1, state_dict=new_weights) == [1, 1]
        assert await policy.get_version.fanout() == [1, 1]

        local.load_state_dict(new_weights)
        tokenizer = load_tokenizer("tiny")
        prompt = tokenizer("3+5=", add_special_tokens=False)["input_ids"]
        expected = local.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for _ in range(2):  # both replicas
            greedy = await policy.generate.route("3+5=", sampling_config={"n": 1, "temperature": 0,
                                                                          "ignore_eos": True})
            assert greedy[0].token_ids.tolist() == expected
            assert greedy[0].generator_version == 1
    finally:
        await policy.shutdown()


async def test_concurrent_routes_share_the_replica_batch():
    policy = await Policy.options(num_replicas=1).as_service(
        engine_config=ENGINE, sampling_config={"max_tokens": 6, "ignore_eos": True}
    )
    try:
        results = await asyncio.gather(*(policy.generate.route("1+1=") for _ in range(32)))
        assert all(len(r[0].token_ids) == 6 for r in results)
        stats = await policy.engine_stats.route()
        assert stats["running"] == 0 and stats["generated_tokens"] == 32 * 6
    finally:
        await policy.shutdown()


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"engine_config": {"model": "tiny", "tensor_parallel_size": 2}}, "tensor_parallel_size"),
        ({"engine_config": {"model": "tiny", "max_len": 3}}, "max_len"),
        ({"sampling_config": {"n": 0}}, "n"),
        ({"engine_config": {"model": "tiny", "backend": "vllm"}}, "vllm"),
        ({"engine": {}}, "engine"),
    ],
)
async def test_bad_policy_config_is_rejected_before_spawning(kwargs, named):
    before = set(monarch_descendants())
    with pytest.raises(ValueError, match=named):
        await Policy.options(num_replicas=2).as_service(**kwargs)
    assert set(monarch_descendants()) <= before


async def test_a_prompt_too_long_for_the_engine_is_an_error_and_a_long_completion_is_capped():
    policy = await Policy.as_actor(engine_config=ENGINE, sampling_config={"max_tokens": 60})
    try:
        with pytest.raises(Exception, match="max_model_len=64"):
            await policy.generate.call_one("1234567890" * 7)
        capped = await policy.generate.call_one("12345678+1=", sampling_config={"max_tokens": 60, "ignore_eos": True})
        assert capped[0].stop_reason == "length"
        assert len(capped[0].prompt_ids) + len(capped[0].token_ids) == 64  # vLLM's cap: max_model_len
        assert len((await policy.generate.call_one("1=", sampling_config={"max_tokens": 4}))) == 1
    finally:
        await Policy.shutdown(policy)
