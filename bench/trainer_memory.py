"""Trainer memory on a real-size vocabulary: micro-batches and a chunked log-softmax vs one shot.

The model is Qwen3-shaped with random weights and Qwen3's real vocabulary (151,936) on a
small body (hidden 256, 4 layers, tied embedding): ~41M parameters, nearly all of them
the embedding, so the output head dominates a step the way it does in real models. Each
variant runs in its own RLTrainer process and does two GRPO ``train_step``s (AdamW) on 4
sequences of 1,024 tokens (32 prompt + 992 response). Reported:

* peak RSS of the trainer process above its RSS before the model was loaded (the
  trainer's ``memory/peak_gb`` and ``memory/before_model_gb`` metrics), as a ratio to
  the model-state floor: parameters, gradients and AdamW's two moments, 16 bytes per
  fp32 parameter;
* the second step's time (the first allocates the optimizer state).

Variants: ``one-shot`` (``max_tokens_per_microbatch`` 0 and one chunk: the whole batch's
``[4, 1024, V]`` logits at once, as before chunking), ``chunked (default)`` (the default
settings: the whole share in one micro-batch, ``logits_chunk_elements`` auto, i.e. 4M
positions of logits at a time for this vocabulary) and ``chunked + micro-batches``
(``max_tokens_per_microbatch`` 1,024: one sequence per micro-batch).

    .venv/bin/python bench/trainer_memory.py [--seqs 4 --length 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 151_936
PROMPT = 32
VARIANTS = {
    "one-shot": {"max_tokens_per_microbatch": 0, "logits_chunk_elements": 10**12},
    "chunked (default)": {"max_tokens_per_microbatch": 0, "logits_chunk_elements": 0},
    "chunked + micro-batches": {"max_tokens_per_microbatch": 1024, "logits_chunk_elements": 0},
}


def write_model(directory: Path) -> int:
    """A random Qwen3 of the real vocabulary in ``directory``; its parameter count."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=2048, use_cache=False)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def make_batch(seqs: int, length: int):
    from forge.data.batch import collate

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(seqs)]
    responses = [torch.randint(0, VOCAB, (length - PROMPT,), generator=gen).tolist() for _ in range(seqs)]
    behaviour = [(-torch.rand(length - PROMPT, generator=gen) - 11).tolist() for _ in range(seqs)]
    advantages = [(-1.0) ** i for i in range(seqs)]
    return collate(prompts, responses, behaviour, [None] * seqs, advantages, pad_id=0)


async def measure(model_dir: Path, variant: str, seqs: int, length: int) -> dict[str, float]:
    from forge.actors.trainer import RLTrainer

    trainer = await RLTrainer.options(procs=1).as_actor(
        model={"name": "qwen3", "flavor": "custom", "hf_assets_path": str(model_dir)},
        optimizer={"name": "AdamW", "lr": 1e-5},
        training={"local_batch_size": seqs, "seq_len": length, **VARIANTS[variant]},
        loss={"normalization": "grpo", "beta": 0.0},
    )
    try:
        batch = make_batch(seqs, length)
        losses = []
        for _ in range(2):
            losses.append(await trainer.train_step.call_one(*batch))
        metrics = await trainer.metrics.call_one()
    finally:
        await RLTrainer.shutdown(trainer)
    return {"peak_gb": metrics["memory/peak_gb"] - metrics["memory/before_model_gb"],
            "step_s": metrics["step_time_s"], "loss": losses[-1]}


async def main(seqs: int, length: int) -> None:
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        parameters = write_model(Path(tmp))
        floor_gb = parameters * 16 / 1e9
        results = {}
        for variant in VARIANTS:
            started = time.monotonic()
            results[variant] = await measure(Path(tmp), variant, seqs, length)
            print(f"{variant}: {results[variant]} ({time.monotonic() - started:.0f} s)", flush=True)
    one_shot = results["one-shot"]
    for result in results.values():  # the same step, computed three ways
        assert abs(one_shot["loss"] - result["loss"]) <= 1e-4 * max(1.0, abs(one_shot["loss"])), results
    print(f"\n{parameters / 1e6:.1f}M parameters, vocabulary {VOCAB}, {seqs} x {length} tokens; "
          f"model-state floor (16 B/parameter) {floor_gb:.2f} GB\n")
    print("| variant | peak RSS above pre-load (GB) | ÷ floor | step time (s) | time ratio |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['peak_gb']:.2f} | {result['peak_gb'] / floor_gb:.2f}x | {result['step_s']:.1f} | "
              f"{result['step_s'] / one_shot['step_s']:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(main(args.seqs, args.length))
