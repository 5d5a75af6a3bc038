"""The embedded GRPO default: distributed (Forge services) vs the same loop in one process.

Both use the same model preset, task, hyperparameters (apps/grpo/default.yaml) and
components (native engine, GRPO loss, rewards, group advantages, dropping groups whose
rewards are all equal); the distributed run is ``apps.grpo.main.run`` in its default
layout (the generator a service, the light parts in one process, the trainer hosting the
reference model), rollouts and training overlapping, weights synced through shared
memory each step. The one-process loop is synchronous and on-policy. Evaluation and
checkpoints are off in both so that episodes/s compare like for like. Reports steps and
time to a 10-step moving mean reward of 0.9, startup, trained episodes/s (the issue's
measure) and generated episodes/s (every sampled episode, those of dropped zero-variance
groups too: the rollout machinery's throughput, less dependent on how soon a run's
policy sharpens and starts dropping most groups).

    .venv/bin/python bench/grpo_overhead.py [key=value ...]   # config overrides for both loops
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from apps.grpo.actors import group_advantages
from apps.grpo.config import GRPOConfig
from apps.grpo.main import DEFAULT_CONFIG, run
from forge.data.batch import collate
from forge.data.datasets import ArithmeticTask, PromptSource
from forge.data.rewards import MathReward
from forge.engine.native import NativeEngine
from forge.losses import grpo_loss, sequence_logprobs
from forge.models import load_model, load_tokenizer
from forge.util.config import load_config

# Both drop groups whose rewards are all equal (the default), so the work per step matches.
OVERRIDES = ["run.eval_every=0", "run.checkpoint_every=0", "metrics=[jsonl]"]


def single_process(cfg: GRPOConfig) -> dict:
    """The same GRPO loop with no actors: one process, synchronous, on-policy."""
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    policy, reference, generator = load_model(cfg.model.path), load_model(cfg.model.path), load_model(cfg.model.path)
    reference.requires_grad_(False)
    engine = NativeEngine(generator, (tokenizer.eos_token_id,), cfg.engine_config())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.trainer.optimizer.lr)
    loss_config = cfg.trainer.loss
    source = PromptSource(ArithmeticTask().rows(), seed=cfg.run.seed)
    sampling = cfg.sampling_config()
    reward_fn = MathReward()
    groups_per_step = cfg.replay_buffer.batch_size // cfg.group_size
    drop_uniform = cfg.replay_buffer.drop_zero_variance_groups
    window, started, reached, generated = [], time.monotonic(), None, 0
    for step in range(1, cfg.run.max_steps + 1):
        prompts, responses, behaviour, advantages, rewards = [], [], [], [], []
        while len(prompts) < cfg.replay_buffer.batch_size:  # DAPO's dynamic sampling, as the app
            requests = []
            for _ in range(groups_per_step):
                item = source.sample()
                ids = tokenizer(item["request"], add_special_tokens=False)["input_ids"]
                requests.append((ids, item, engine.add_request(ids, sampling)))
            while engine.has_work:
                engine.step()
            for ids, item, request in requests:
                scores = [reward_fn(item["question"], tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                    item["target"]) for s in request.sequences]
                rewards += scores
                generated += len(scores)
                if (drop_uniform and len(set(scores)) == 1) or len(prompts) >= cfg.replay_buffer.batch_size:
                    continue
                for sequence, advantage in zip(request.sequences, group_advantages(scores)):
                    prompts.append(ids)
                    responses.append(sequence.token_ids)
                    behaviour.append(sequence.logprobs)
                    advantages.append(advantage)
        inputs, targets = collate(prompts, responses, behaviour, [[0.0] * len(r) for r in responses], advantages,
                                  tokenizer.pad_token_id)
        with torch.no_grad():
            targets.ref_logprobs = sequence_logprobs(reference(inputs.tokens).logits, inputs.tokens) * targets.response_mask
        logits = policy(input_ids=inputs.tokens, attention_mask=inputs.attention_mask).logits
        loss, _ = grpo_loss(sequence_logprobs(logits, inputs.tokens), targets.behaviour_logprobs,
                            targets.ref_logprobs, targets.advantages, targets.response_mask, loss_config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        engine.load_weights(policy.state_dict(), step)
        window = (window + [sum(rewards) / len(rewards)])[-cfg.run.reward_window:]
        if len(window) == cfg.run.reward_window and sum(window) / len(window) >= (cfg.run.target_reward or 2):
            reached = time.monotonic() - started
            break
    elapsed = time.monotonic() - started
    return {"steps": step, "time_to_target_s": reached, "episodes_per_s": step * cfg.replay_buffer.batch_size / elapsed,
            "generated_per_s": generated / elapsed, "startup_s": 0.0}


def distributed(cfg: GRPOConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = asyncio.run(run(cfg, Path(tmp)))
    training_s = summary["wall_s"] - summary["startup_s"]
    reached = summary["reason"].startswith("mean reward")
    return {"steps": summary["steps"], "time_to_target_s": training_s if reached else None,
            "episodes_per_s": summary["episodes_trained"] / training_s,
            "generated_per_s": summary["episodes_generated"] / training_s, "startup_s": summary["startup_s"]}


def main() -> None:
    cfg = load_config(GRPOConfig, DEFAULT_CONFIG, OVERRIDES + sys.argv[1:])  # e.g. run.groups_per_rollout=16
    results = {"one process, no services": single_process(cfg), "Forge services (default)": distributed(cfg)}
    base = results["one process, no services"]
    print("\n| loop | steps to 0.9 | time to 0.9 (s, after startup) | startup (s) | trained episodes/s | ratio "
          "| generated episodes/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        reached = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        print(f"| {name} | {r['steps']} | {reached} | {r['startup_s']:.0f} | {r['episodes_per_s']:.0f} | "
              f"{r['episodes_per_s'] / base['episodes_per_s']:.2f}x | {r['generated_per_s']:.0f} | "
              f"{r['generated_per_s'] / base['generated_per_s']:.2f}x |")

if __name__ == "__main__":
    main()
