"""Automatic prefix caching: the bookkeeping alone, then the native engine with and without it."""

import random

import pytest
import torch

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.native import AsyncEngine, NativeEngine
from forge.engine.prefix_cache import BLOCK_SIZE, PrefixCache
from forge.models import load_model, load_tokenizer

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def tokens(seed, count):
    """Token ids the tiny preset's char tokenizer has (ids 4..20), reproducibly random."""
    rng = random.Random(seed)
    return [rng.randrange(4, 21) for _ in range(count)]


# ---- bookkeeping ---------------------------------------------------------------


def test_a_match_is_whole_blocks_from_position_zero_and_leaves_the_last_token():
    cache = PrefixCache(budget_blocks=8)
    prompt = tokens(0, 2 * BLOCK_SIZE)
    assert [start for _, start in cache.insert(prompt)] == [0, BLOCK_SIZE]
    assert len(cache.match(prompt, len(prompt) - 1)) == 1  # the second block holds the last token
    assert len(cache.match(prompt + [5], len(prompt))) == 2
    assert cache.match(prompt[:BLOCK_SIZE - 1] + [99] + prompt[BLOCK_SIZE:] + [5], 100) == []  # first block differs
    other_start = tokens(1, BLOCK_SIZE) + prompt[BLOCK_SIZE:] + [5]
    assert cache.match(other_start, 100) == []  # the second block alone is no prefix
    assert cache.insert(prompt) == []  # already cached
    assert cache.statistics()["prefix_cache_hits"] == 2


def test_eviction_takes_least_recently_used_leaves_so_a_chain_never_has_a_hole():
    cache = PrefixCache(budget_blocks=5)
    system = tokens(0, BLOCK_SIZE)
    a, b = system + tokens(1, 2 * BLOCK_SIZE), system + tokens(2, 2 * BLOCK_SIZE)
    cache.insert(a)
    cache.insert(b)  # 5 blocks: the system block, two of a, two of b
    cache.match(a, len(a))  # a is now the most recent
    c = system + tokens(3, 2 * BLOCK_SIZE)
    assert len(cache.insert(c)) == 2  # evicts b's two blocks, last block first
    assert cache.num_blocks == 5 and cache.statistics()["prefix_cache_evicted_blocks"] == 2
    assert len(cache.match(a, len(a))) == 3 and len(cache.match(c, len(c))) == 3
    assert len(cache.match(b, len(b))) == 1  # the shared system block stays
    alone = PrefixCache(budget_blocks=2)
    assert len(alone.insert(tokens(4, 3 * BLOCK_SIZE))) == 2  # the chain's own blocks are never evicted for it
    assert alone.num_blocks == 2


def test_random_use_keeps_the_budget_whole_chains_and_distinct_ids():
    rng = random.Random(0)
    cache = PrefixCache(budget_blocks=7, block_size=2)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    for _ in range(500):
        sequence = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(8))]
        if rng.random() < 0.5:
            cache.insert(sequence)
        else:
            cache.match(sequence, len(sequence) - 1)
        blocks, stack = [], list(cache._root.children.values())
        while stack:  # every block reachable from the root: a chain with a hole would be lost here
            block = stack.pop()
            blocks.append(block)
            stack.extend(block.children.values())
        assert len(blocks) == cache.num_blocks <= 7
        assert len({b.block_id for b in blocks}) == len(blocks) and all(b.block_id < 7 for b in blocks)
        assert all(b.parent is cache._root or b.parent.last_used >= b.last_used for b in blocks)


def test_clearing_forgets_every_block():
    cache = PrefixCache(budget_blocks=4)
    prompt = tokens(0, 3 * BLOCK_SIZE)
    cache.insert(prompt)
    cache.clear()
    assert cache.num_blocks == 0 and cache.match(prompt, len(prompt)) == []
    assert [block_id for block_id, _ in cache.insert(prompt)] == [0, 1, 2]  # ids restart: the pool is reused


def test_requests_sharing_an_uncached_prefix_are_split_into_two_waves():
    cache = PrefixCache(budget_blocks=16)
    system = tokens(0, 2 * BLOCK_SIZE)
    prompts = [system + tokens(1, 5), tokens(2, 40), system + tokens(3, 9), system[:BLOCK_SIZE] + tokens(4, 30)]
    assert cache.waves(prompts) == [0, 0, 1, 1]
    cache.insert(system)
    assert cache.waves(prompts) == [0, 0, 0, 0]  # cached already: nothing to wait for


# ---- the engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def make_engine(tokenizer, model=None, **config):
    config = EngineConfig(**{"max_model_len": 256, "max_num_seqs": 8, **config})
    return NativeEngine(model or load_model("tiny"), (tokenizer.eos_token_id,), config)


def run(engine, prompts, params=GREEDY, check=None):
    requests = [engine.add_request(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
        if check is not None:
            check(engine)
    return requests


def conversations(engine, turns, params=GREEDY, check=None):
    """Two conversations: each turn's prompt is the last prompt, its first sample's
    completion and 7 new tokens. Returns per turn (samples, prompt tokens cached)."""
    history = [tokens(10, 40), tokens(11, 23)]
    results = []
    for turn in range(turns):
        before = engine.statistics()["prompt_tokens_cached"]
        requests = run(engine, history, params, check)
        results.append(([(s.token_ids, s.logprobs) for r in requests for s in r.sequences],
                        engine.statistics()["prompt_tokens_cached"] - before))
        history = [h + r.sequences[0].token_ids + tokens(100 * turn + i, 7) for i, (h, r) in
                   enumerate(zip(history, requests))]
    return results


def assert_same_samples(cached, fresh):
    assert len(cached) == len(fresh)
    for (tokens_a, logprobs_a), (tokens_b, logprobs_b) in zip(cached, fresh):
        assert tokens_a == tokens_b
        assert torch.allclose(torch.tensor(logprobs_a), torch.tensor(logprobs_b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(n=2, max_tokens=10, ignore_eos=True, seed=3)],
                         ids=["greedy", "seeded-n2"])
def test_multi_turn_conversations_give_the_same_tokens_and_logprobs_with_the_cache(params, tokenizer):
    model = load_model("tiny")
    with_cache = conversations(make_engine(tokenizer, model), 3, params)
    without = conversations(make_engine(tokenizer, model, enable_prefix_caching=False), 3, params)
    for (cached_samples, cached_tokens), (fresh_samples, fresh_cached) in zip(with_cache, without):
        assert_same_samples(cached_samples, fresh_samples)
        assert fresh_cached == 0
    assert with_cache[0][1] == 0
    # turn 2 reuses prompt + completion up to the last whole block that leaves a token to compute
    prompts_turn2 = [40 + 10 + 7, 23 + 10 + 7]
    assert with_cache[1][1] == sum((n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in prompts_turn2)
    assert with_cache[2][1] > with_cache[1][1]


def test_a_shared_system_prompt_hits_across_requests_of_one_batch(tokenizer):
    model = load_model("tiny")
    system = tokens(0, 3 * BLOCK_SIZE)
    prompts = [system + tokens(i, 5 + i) for i in range(1, 4)]
    engine = make_engine(tokenizer, model)
    cached = run(engine, prompts)
    stats = engine.statistics()
    assert stats["prefix_cache_hits"] == 2 and stats["prompt_tokens_cached"] == 2 * len(system)
    # then a batch mixing a cached prefix (offset > 0) with prompts that have none (offset 0)
    mixed = [tokens(7, 30), system + tokens(8, 20), tokens(9, 3)]
    cached += run(engine, mixed)
    assert engine.statistics()["prompt_tokens_cached"] == 3 * len(system)
    plain = make_engine(tokenizer, model, enable_prefix_caching=False)
    fresh = run(plain, prompts) + run(plain, mixed)
    assert_same_samples([(r.sequences[0].token_ids, r.sequences[0].logprobs) for r in cached],
                        [(r.sequences[0].token_ids, r.sequences[0].logprobs) for r in fresh])


def test_a_cached_prefix_next_to_a_longer_fresh_prompt_stays_inside_the_cache_and_is_exact(tokenizer):
    """The cached row's padding positions run past max_model_len and are clamped."""
    model = load_model("tiny")
    engine = make_engine(tokenizer, model, max_model_len=64)
    long = tokens(0, 63)
    run(engine, [long], SamplingParams(max_tokens=1, temperature=0))
    fresh = tokens(1, 40)
    again, other = run(engine, [long, fresh], SamplingParams(max_tokens=1, temperature=0))
    assert engine.statistics()["prompt_tokens_cached"] == 48
    for prompt, request in ((long, again), (fresh, other)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1].float()
        token = int(logits.argmax())
        assert request.sequences[0].token_ids == [token]
        assert abs(request.sequences[0].logprobs[0] - float(torch.log_softmax(logits, -1)[token])) < 1e-5


def test_new_weights_empty_the_cache_and_match_a_fresh_engine(tokenizer):
    engine = make_engine(tokenizer)
    prompts = [tokens(0, 50), tokens(1, 37)]
    first = run(engine, prompts)
    assert engine.statistics()["prefix_cache_blocks"] > 0
    new_weights = {k: v + 0.01 * torch.randn_like(v) for k, v in load_model("tiny").state_dict().items()}
    engine.load_weights(new_weights, 1)
    assert engine.statistics()["prefix_cache_blocks"] == 0
    turn2 = [p + r.sequences[0].token_ids + tokens(5, 4) for p, r in zip(prompts, first)]
    after = run(engine, turn2)
    assert engine.statistics()["prompt_tokens_cached"] == 0  # nothing computed by the old weights is reused
    updated = load_model("tiny")
    updated.load_state_dict(new_weights)
    fresh = run(make_engine(tokenizer, updated, enable_prefix_caching=False), turn2)
    assert_same_samples([(r.sequences[0].token_ids, r.sequences[0].logprobs) for r in after],
                        [(r.sequences[0].token_ids, r.sequences[0].logprobs) for r in fresh])


def test_under_a_tiny_budget_outputs_stay_exact_and_the_most_recent_conversation_is_kept(tokenizer):
    model = load_model("tiny")
    budget = 4  # blocks: one conversation's turn (40 + 10 tokens -> 3 blocks) fits, two do not
    engine = make_engine(tokenizer, model, prefix_cache_tokens=budget * BLOCK_SIZE)
    plain = make_engine(tokenizer, model, enable_prefix_caching=False)

    def within_budget(engine):
        assert engine.prefix_cache.num_blocks <= budget

    a, b = tokens(20, 40), tokens(21, 40)
    samples, expected = [], []
    for prompt in (a, b):
        (request,) = run(engine, [prompt], check=within_budget)
        (reference,) = run(plain, [prompt])
        samples.append(request.sequences[0].token_ids)
        expected.append(reference.sequences[0].token_ids)
    turn2 = [a + samples[0] + tokens(22, 7), b + samples[1] + tokens(23, 7)]
    cached = {}
    for name, prompt in (("b", turn2[1]), ("a", turn2[0])):  # b first: it was used last
        before = engine.statistics()["prompt_tokens_cached"]
        (request,) = run(engine, [prompt], check=within_budget)
        cached[name] = engine.statistics()["prompt_tokens_cached"] - before
        (reference,) = run(plain, [prompt])
        samples.append(request.sequences[0].token_ids)
        expected.append(reference.sequences[0].token_ids)
    assert samples == expected
    assert cached["b"] == 48 and cached["a"] == 0
    assert engine.statistics()["prefix_cache_evicted_blocks"] > 0


def test_statistics_report_prompt_tokens_and_the_budget(tokenizer):
    engine = make_engine(tokenizer, max_num_seqs=4, max_model_len=64)
    run(engine, [tokens(0, 20)])
    stats = AsyncEngine(engine).statistics()  # what Policy.engine_stats returns
    assert stats["prompt_tokens_computed"] == 20 and stats["prompt_tokens_cached"] == 0
    assert stats["prefix_cache_hits"] == 0 and stats["prefix_cache_blocks"] == 1 and stats["version"] == 0
    assert stats["prefix_cache_budget_blocks"] == 4 * 64 // BLOCK_SIZE  # auto: the slot cache's capacity
    off = make_engine(tokenizer, enable_prefix_caching=False)
    assert off.prefix_cache is None and off.statistics()["prefix_cache_budget_blocks"] == 0


def test_a_pool_that_cannot_grow_shrinks_the_budget_and_generation_goes_on(tokenizer, monkeypatch):
    model = load_model("tiny")
    engine = make_engine(tokenizer, model)
    grow = engine.runner._grow_pool

    def first_growth_only(needed):
        if engine.runner.num_pool_blocks:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        grow(needed)

    monkeypatch.setattr(engine.runner, "_grow_pool", first_growth_only)
    plain = make_engine(tokenizer, model, enable_prefix_caching=False)
    first, second = [tokens(i, 100) for i in range(4)], [tokens(10 + i, 100) for i in range(4)]
    for batch in (first, second, second, second):  # 6 blocks a prompt: the second batch outgrows the pool
        before = engine.statistics()["prompt_tokens_cached"]
        cached = run(engine, batch)
        fresh = run(plain, batch)
        assert [r.sequences[0].token_ids for r in cached] == [r.sequences[0].token_ids for r in fresh]
    stats = engine.statistics()
    assert stats["prefix_cache_budget_blocks"] == engine.runner.num_pool_blocks == 24
    assert stats["prompt_tokens_cached"] - before == 4 * 96  # the last batch hits what fits
