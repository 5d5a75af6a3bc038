"""Peak memory of reference logprobs: chunked (ReferenceModel) vs full fp32 logits.

A Qwen3-shaped model with a real-size vocabulary (151,936 tokens, like Qwen3) but a
small body, scoring B sequences of L tokens. Each variant runs in a fresh process and
reports its peak RSS above the RSS after loading the model and inputs.

    .venv/bin/python bench/reference_memory.py [--batch 4 --length 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB = 151_936


def run_variant(variant: str, batch: int, length: int, chunk: int) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from forge.losses import response_logprobs

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16)).eval()
    ids = torch.randint(0, VOCAB, (batch, length))
    start = length // 2
    with torch.inference_mode():
        response_logprobs(model, ids[:, :8], 4, 64)  # warm up allocator and kernels
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if variant == "chunked":
            out = response_logprobs(model, ids, start, chunk)
        else:
            logits = model(ids).logits.float()  # [B, L, V] fp32 at once
            out = torch.log_softmax(logits[:, start - 1 : -1], -1).gather(2, ids[:, start:, None])[..., 0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "extra_mb": (peak - base) / 1024, "checksum": float(out.sum())}


def main(batch: int, length: int, chunk: int) -> None:
    results = {}
    for variant in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(batch),
                               "--length", str(length), "--chunk", str(chunk)],
                              capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(results["full"]["checksum"] - results["chunked"]["checksum"]) < 1e-2 * abs(results["full"]["checksum"])
    logits_mb = batch * length * VOCAB * 4 / 2**20
    chunk_mb = chunk * 4 / 2**20
    print(f"\nB={batch}, L={length}, V={VOCAB}, chunk={chunk}: full fp32 logits are {logits_mb:.0f} MB, "
          f"one chunk {chunk_mb:.0f} MB\n")
    print("| variant | peak extra RSS (MB) | ratio |")
    print("|---|---|---|")
    for variant in ("full", "chunked"):
        extra = results[variant]["extra_mb"]
        print(f"| {variant} | {extra:.0f} | {extra / results['full']['extra_mb']:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1 << 22, help="logits per block (ReferenceModel chunk_elements)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.length, args.chunk)))
    else:
        main(args.batch, args.length, args.chunk)
