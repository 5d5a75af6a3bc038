"""Sampling for the native engine: temperature, top-k, top-p, seeds, and logprobs.

Tokens are drawn with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which
lets each sequence with a seed draw its noise from its own generator, so its samples
do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from forge.engine.config import SamplingParams


def sample(
    logits: torch.Tensor,  # [B, V] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> tuple[list[int], list[float]]:
    """One token per row and its logprob ``log_softmax(logits / T)`` (T=1 when greedy)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    is_greedy = temperature == 0
    scaled = logits / torch.where(is_greedy, torch.ones_like(temperature), temperature)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = scaled.argmax(dim=-1)
    if not bool(is_greedy.all()):
        filtered = _truncate(scaled, params)
        probs = torch.softmax(filtered, dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=device).exponential_(
                generator=default_generator
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        drawn = (probs / noise).argmax(dim=-1)
        tokens = torch.where(is_greedy, tokens, drawn)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def _truncate(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p (nucleus) set with -inf."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return scaled
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=scaled.device)
    remove |= torch.arange(vocab, device=scaled.device)[None, :] >= k[:, None]
    p = torch.tensor(top_p, device=scaled.device, dtype=torch.float32)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
    remove |= mass_before >= p[:, None]
    remove[:, 0] = False  # always keep the best token
    mask = torch.zeros_like(remove).scatter(1, order, remove)
    return scaled.masked_fill(mask, float("-inf"))
