"""Native engine vs transformers ``generate``: decode tokens/s on the same model, same run.

Same machine, same sampling (temperature 1.0, top_p 1.0, EOS ignored so every sequence
makes ``--tokens`` tokens), batch 1, 16 and 64, on the embedded ``tiny`` preset and
the ~31M-parameter ``bench-30m`` preset. Then, on a Policy service of one replica,
64 concurrent ``route()`` calls with n=1 against one call with n=64.

    .venv/bin/python bench/engine_throughput.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.native import NativeEngine
from forge.models import load_model, load_tokenizer

PROMPT = "12+34="


def hf_tokens_per_s(model, prompt_ids, batch, tokens):
    inputs = torch.tensor([prompt_ids] * batch)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    assert out.shape == (batch, len(prompt_ids) + tokens)
    return batch * tokens / elapsed


def native_tokens_per_s(model, eos, prompt_ids, batch, tokens):
    engine = NativeEngine(model, eos, EngineConfig(max_num_seqs=max(64, batch), max_model_len=len(prompt_ids) + tokens))
    params = SamplingParams(max_tokens=tokens, temperature=1.0, top_p=1.0, ignore_eos=True)
    t0 = time.perf_counter()
    requests = [engine.add_request(prompt_ids, params) for _ in range(batch)]
    while engine.has_work:
        engine.step()
    elapsed = time.perf_counter() - t0
    assert all(len(r.sequences[0].token_ids) == tokens for r in requests)
    return batch * tokens / elapsed


def mixed_lengths(model, eos, prompt_ids, tokens, num_requests=256, batch=64):
    """RL-like rollouts: ``num_requests`` sequences, each wanting its own length (4..tokens),
    at most ``batch`` at once. HF decodes static batches of ``batch`` rows, each to its
    longest row; continuous batching refills a slot as soon as its sequence is done.
    Returns useful (requested) tokens/s for (HF, native)."""
    import random

    lengths = [random.Random(i).randint(4, tokens) for i in range(num_requests)]
    useful = sum(lengths)
    t0 = time.perf_counter()
    for start in range(0, num_requests, batch):
        chunk = lengths[start : start + batch]
        inputs = torch.tensor([prompt_ids] * len(chunk))
        with torch.inference_mode():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max(chunk),
                           min_new_tokens=max(chunk), do_sample=True, top_k=0, eos_token_id=None, pad_token_id=0)
    hf = useful / (time.perf_counter() - t0)
    engine = NativeEngine(model, eos, EngineConfig(max_num_seqs=batch, max_model_len=len(prompt_ids) + tokens))
    t0 = time.perf_counter()
    for n in lengths:
        engine.add_request(prompt_ids, SamplingParams(max_tokens=n, ignore_eos=True))
    while engine.has_work:
        engine.step()
    return hf, useful / (time.perf_counter() - t0)


async def policy_concurrency(tokens):
    from forge.actors.policy import Policy

    policy = await Policy.options(num_replicas=1).as_service(
        engine_config={"model": "tiny", "max_model_len": 128},
        sampling_config={"max_tokens": tokens, "ignore_eos": True})
    try:
        await policy.generate.route(PROMPT, sampling_config={"n": 64})  # warm up
        await asyncio.gather(*(policy.generate.route(PROMPT) for _ in range(64)))
        times = {"64 concurrent route(), n=1": [], "one route(), n=64": []}
        for _ in range(3):
            t0 = time.perf_counter()
            await asyncio.gather(*(policy.generate.route(PROMPT) for _ in range(64)))
            times["64 concurrent route(), n=1"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await policy.generate.route(PROMPT, sampling_config={"n": 64})
            times["one route(), n=64"].append(time.perf_counter() - t0)
        return {k: min(v) for k, v in times.items()}
    finally:
        await policy.shutdown()


def main(tokens: int) -> None:
    tokenizer = load_tokenizer("tiny")
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    eos = (tokenizer.eos_token_id,)
    rows = []
    for preset in ("tiny", "bench-30m"):
        model = load_model(preset)
        params = sum(p.numel() for p in model.parameters())
        for batch in (1, 16, 64):
            hf_tokens_per_s(model, prompt_ids, batch, 4)  # warm up
            native_tokens_per_s(model, eos, prompt_ids, batch, 4)
            hf = hf_tokens_per_s(model, prompt_ids, batch, tokens)
            native = native_tokens_per_s(model, eos, prompt_ids, batch, tokens)
            rows.append((preset, params, str(batch), hf, native))
        hf, native = mixed_lengths(model, eos, prompt_ids, tokens)
        rows.append((preset, params, f"256 requests of 4..{tokens} tokens, 64 at once", hf, native))
    print(f"\nDecode throughput, {tokens} new tokens per sequence, torch threads={torch.get_num_threads()}\n")
    print("| model | params | batch | HF generate (useful tok/s) | native engine (useful tok/s) | ratio |")
    print("|---|---|---|---|---|---|")
    for preset, params, batch, hf, native in rows:
        print(f"| {preset} | {params/1e6:.1f}M | {batch} | {hf:.0f} | {native:.0f} | {native/hf:.2f}x |")
    timing = asyncio.run(policy_concurrency(tokens))
    base = timing["one route(), n=64"]
    print(f"\nPolicy service (tiny, 1 replica, {tokens} tokens per sample)\n")
    print("| workload | wall time (s) | ratio |")
    print("|---|---|---|")
    for name, seconds in timing.items():
        print(f"| {name} | {seconds:.3f} | {seconds/base:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    main(parser.parse_args().tokens)
