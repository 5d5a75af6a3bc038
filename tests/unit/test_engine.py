"""The native engine against transformers, on real tiny models of three families."""

import asyncio

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.native import AsyncEngine, NativeEngine
from forge.models import load_model, load_tokenizer

PROMPTS = ["1+2=", "34+56=", "7*8=", "123-45=9", "9="]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def family_model(family, tmp_path_factory, tokenizer, impl="auto"):
    """A random model of ``family`` saved to and loaded from a local HF directory."""
    if family == "qwen3":
        return load_model("tiny", impl=impl)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**common)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory)
    return load_model(directory, impl=impl)


def run(engine, requests):
    while engine.has_work:
        engine.step()
    return requests


def engine_for(model, tokenizer, **config):
    return NativeEngine(model, (tokenizer.eos_token_id,), EngineConfig(**{"max_model_len": 64, **config}))


@pytest.mark.parametrize("impl", ["forge", "transformers"])
@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_greedy_equals_transformers_generate_token_for_token(family, impl, tmp_path_factory, tokenizer):
    """The engine drives either implementation of the model; transformers' generate is the reference."""
    engine = engine_for(family_model(family, tmp_path_factory, tokenizer, impl), tokenizer)
    model = family_model(family, tmp_path_factory, tokenizer, "transformers")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = run(engine, [engine.add_request(i, greedy) for i in ids])
    for prompt, request in zip(ids, requests):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert request.sequences[0].token_ids == expected


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (0.7, 5)])
def test_sampled_logprobs_equal_a_full_forward_at_the_same_temperature(temperature, top_k, tokenizer):
    model = load_model("tiny")
    engine = engine_for(model, tokenizer)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    params = SamplingParams(n=2, max_tokens=10, temperature=temperature, top_k=top_k, ignore_eos=True, seed=7)
    for prompt, request in zip(ids, run(engine, [engine.add_request(i, params) for i in ids])):
        for sequence in request.sequences:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + sequence.token_ids])).logits[0].float()
            expected = torch.log_softmax(logits / temperature, -1)[len(prompt) - 1 : -1]
            expected = expected.gather(1, torch.tensor(sequence.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(sequence.logprobs), expected, atol=1e-4)


def test_the_same_seed_gives_the_same_samples_whatever_else_is_in_the_batch(tokenizer):
    model = load_model("tiny")
    prompt = tokenizer("12+3=", add_special_tokens=False)["input_ids"]
    seeded = SamplingParams(n=4, max_tokens=12, ignore_eos=True, seed=11)
    alone = engine_for(model, tokenizer)
    (a,) = run(alone, [alone.add_request(prompt, seeded)])
    crowded = engine_for(model, tokenizer, seed=99)
    others = [crowded.add_request(prompt, SamplingParams(n=3, max_tokens=12, ignore_eos=True)) for _ in range(3)]
    b = crowded.add_request(prompt, seeded)
    run(crowded, others + [b])
    assert [s.token_ids for s in a.sequences] == [s.token_ids for s in b.sequences]
    samples = {tuple(s.token_ids) for s in a.sequences}
    assert len(samples) == 4  # the n samples are independent draws
    other_seed = engine_for(model, tokenizer)
    (c,) = run(other_seed, [other_seed.add_request(prompt, SamplingParams(n=4, max_tokens=12, ignore_eos=True, seed=12))])
    assert [s.token_ids for s in c.sequences] != [s.token_ids for s in a.sequences]


def test_top_k_and_top_p_keep_samples_inside_their_sets(tokenizer):
    model = load_model("tiny")
    engine = engine_for(model, tokenizer, max_num_seqs=64)
    prompt = tokenizer("7+8=", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top3 = set(first.topk(3).indices.tolist())
    (k,) = run(engine, [engine.add_request(prompt, SamplingParams(n=64, max_tokens=1, top_k=3, seed=1))])
    firsts = {s.token_ids[0] for s in k.sequences}
    assert firsts <= top3 and len(firsts) > 1
    (p,) = run(engine, [engine.add_request(prompt, SamplingParams(n=32, max_tokens=1, top_p=1e-6, seed=1))])
    assert {s.token_ids[0] for s in p.sequences} == {int(first.argmax())}
    (one,) = run(engine, [engine.add_request(prompt, SamplingParams(n=8, max_tokens=6, top_k=1, seed=1))])
    (greedy,) = run(engine, [engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0))])
    assert all(s.token_ids == greedy.sequences[0].token_ids for s in one.sequences)


def test_stop_tokens_stop_and_are_reported(tokenizer):
    model = load_model("tiny")
    engine = engine_for(model, tokenizer)
    prompt = tokenizer("34+56=", add_special_tokens=False)["input_ids"]
    (free,) = run(engine, [engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])
    tokens = free.sequences[0].token_ids
    stop = tokens[3]
    (stopped,) = run(engine, [engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,)))])
    sequence = stopped.sequences[0]
    assert sequence.token_ids == tokens[: tokens.index(stop) + 1]
    assert sequence.finish_reason == "stop"
    assert free.sequences[0].finish_reason == "length"


def test_requests_join_the_running_batch_at_the_next_step_and_cache_is_preallocated(tokenizer):
    model = load_model("tiny")
    engine = engine_for(model, tokenizer, max_num_seqs=8, max_model_len=40)
    assert engine.runner.k_cache[0].shape == (8, 2, 40, 16)
    prompt = tokenizer("5+5=", add_special_tokens=False)["input_ids"]
    long = engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    engine.step()
    late = engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert len(engine.scheduler.running) == 2  # decoded together from now on
    run(engine, [])
    assert len(long.sequences[0].token_ids) == 10 and len(late.sequences[0].token_ids) == 3
    assert len(engine.scheduler.free_slots) == 8


def test_a_weight_update_waits_for_running_sequences_so_versions_never_mix(tokenizer):
    model = load_model("tiny")
    engine = AsyncEngine(engine_for(model, tokenizer))
    prompt = tokenizer("5+5=", add_special_tokens=False)["input_ids"]
    new_weights = {k: v + 0.01 for k, v in model.state_dict().items()}

    async def scenario():
        before = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True)))
        await asyncio.sleep(0)
        update = asyncio.ensure_future(engine.update_weights(new_weights, 1))
        await asyncio.sleep(0)
        after = asyncio.ensure_future(engine.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
        return await before, await update, await after

    before, _, after = asyncio.run(scenario())
    assert before.version == 0 and len(before.sequences[0].token_ids) == 20
    assert after.version == 1
    assert torch.equal(model.state_dict()["model.norm.weight"], new_weights["model.norm.weight"])


def test_wrong_weights_are_refused(tokenizer):
    engine = engine_for(load_model("tiny"), tokenizer)
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({"nope": torch.zeros(1)}, 1)
