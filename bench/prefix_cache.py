"""Native engine prefix caching: a multi-turn chat workload with the cache off and on, same run.

``--conversations`` conversations run side by side for ``--turns`` turns on the ~31M-parameter
``bench-30m`` preset (built locally, nothing downloads). Every prompt is a shared system
prompt (``--system`` tokens), the conversation so far and a new user message (``--user``
tokens); each turn answers ``--tokens`` tokens (greedy, EOS ignored), and the next turn's
prompt extends this one's prompt and answer, as a chat client resends it. The same workload
runs on an engine with ``enable_prefix_caching`` off, then on; each is timed end to end
(prefill and decode), best of ``--repeats``, alternating.

    .venv/bin/python bench/prefix_cache.py [--conversations 8] [--turns 4] [--system 256] [--user 32]
        [--tokens 32] [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.native import NativeEngine
from forge.models import load_model, load_tokenizer

PRESET = "bench-30m"


def random_tokens(rng: random.Random, count: int, vocabulary: int) -> list[int]:
    return [rng.randrange(4, vocabulary) for _ in range(count)]  # past the special tokens


def run_workload(engine: NativeEngine, args: argparse.Namespace, vocabulary: int) -> tuple[float, list]:
    """Seconds for every turn of every conversation, and the completions."""
    rng = random.Random(0)
    system = random_tokens(rng, args.system, vocabulary)
    histories = [system[:] for _ in range(args.conversations)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    completions = []
    t0 = time.perf_counter()
    for _ in range(args.turns):
        prompts = [h + random_tokens(rng, args.user, vocabulary) for h in histories]
        requests = [engine.add_request(p, params) for p in prompts]
        while engine.has_work:
            engine.step()
        answers = [r.sequences[0].token_ids for r in requests]
        completions.append(answers)
        histories = [p + a for p, a in zip(prompts, answers)]
    return time.perf_counter() - t0, completions


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(PRESET)
    model = load_model(PRESET)
    vocabulary = len(tokenizer)
    longest = args.system + args.turns * (args.user + args.tokens)
    config = dict(max_num_seqs=args.conversations, max_model_len=longest + 1)
    eos = (tokenizer.eos_token_id,)

    def engine(enabled: bool) -> NativeEngine:
        return NativeEngine(model, eos, EngineConfig(**config, enable_prefix_caching=enabled))

    warm = argparse.Namespace(**{**vars(args), "turns": 1, "conversations": 2, "tokens": 2})
    run_workload(engine(True), warm, vocabulary)
    run_workload(engine(False), warm, vocabulary)
    best: dict[bool, float] = {}
    results: dict[bool, tuple[dict, list]] = {}
    for _ in range(args.repeats):
        for enabled in (False, True):
            fresh = engine(enabled)
            seconds, completions = run_workload(fresh, args, vocabulary)
            best[enabled] = min(best.get(enabled, seconds), seconds)
            results[enabled] = (fresh.statistics(), completions)
    same = results[False][1] == results[True][1]
    prompt_tokens = results[False][0]["prompt_tokens_computed"]
    print(f"\n{args.conversations} conversations x {args.turns} turns on {PRESET}: system prompt {args.system}, "
          f"user messages {args.user}, answers {args.tokens} tokens (greedy); {prompt_tokens} prompt tokens "
          f"in all; torch threads={torch.get_num_threads()}; best of {args.repeats}\n")
    print("| prefix cache | prompt tokens computed | prompt tokens cached | requests that hit | wall time (s) | speedup |")
    print("|---|---|---|---|---|---|")
    for enabled in (False, True):
        stats = results[enabled][0]
        print(f"| {'on' if enabled else 'off'} | {stats['prompt_tokens_computed']} | {stats['prompt_tokens_cached']} | "
              f"{stats['prefix_cache_hits']} of {args.conversations * args.turns} | {best[enabled]:.2f} | "
              f"{best[False] / best[enabled]:.2f}x |")
    print(f"\ngreedy completions identical with and without the cache: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system", type=int, default=256)
    parser.add_argument("--user", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    main(parser.parse_args())
