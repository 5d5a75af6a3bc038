"""Per-token logprobs of a causal LM without materialising ``[B, L, V]`` logits.

A GRPO step needs ``log p(token_t | tokens_<t)`` at the response positions only, plus
the entropy there as a metric. With a real vocabulary (Qwen3: 151,936) the full fp32
logits of a modest batch are tens of gigabytes, and a log-softmax, a temperature copy
and a softmax each add as much again. Here the decoder runs once; the hidden states at
the scored positions are gathered into a flat ``[N, H]`` and the output head, the
log-softmax and the gather run over ``chunk_tokens`` positions at a time. When a
gradient is needed and there is more than one chunk, each chunk runs under activation
checkpointing: its logits are recomputed in the backward pass instead of being kept, so
at most one chunk's ``[chunk_tokens, V]`` exists at any moment, in the forward and in
the backward pass alike.

``TokenScorer`` wraps a Hugging Face causal LM so that this whole computation is one
module's ``forward``: with FSDP2 it is the root module, whose hooks gather the output
head (tied to the embedding in Qwen3) for the chunked head and reduce its gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

# Auto chunk size: this many logits (fp32) per chunk, 64 MiB; a small vocabulary gets one chunk.
AUTO_CHUNK_ELEMENTS = 1 << 24


def auto_chunk_tokens(vocab_size: int) -> int:
    return max(16, AUTO_CHUNK_ELEMENTS // max(1, vocab_size))


def _score_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # [n, V]
    picked = logp.gather(1, targets[:, None])[:, 0]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def score_hidden(
    head: torch.nn.Module,  # the output head: hidden [.., H] -> logits [.., V]
    hidden: torch.Tensor,  # [B, L, H] the decoder's final hidden states
    tokens: torch.Tensor,  # [B, L]
    score_mask: torch.Tensor,  # [B, L]: nonzero where tokens[b, t] is scored (t >= 1)
    temperature: float = 1.0,
    chunk_tokens: int = 0,  # 0: auto_chunk_tokens(V)
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logp[b, t] = log_softmax(logits(hidden[b, t-1]) / temperature)[tokens[b, t]]`` in fp32
    where ``score_mask[b, t]``, 0 elsewhere; and the entropy of that distribution (detached)
    at the same positions, when asked. Both ``[B, L]``."""
    batch, length = tokens.shape
    rows, cols = torch.nonzero(score_mask[:, 1:] > 0, as_tuple=True)
    cols = cols + 1
    flat_hidden, targets = hidden[rows, cols - 1], tokens[rows, cols]  # [N, H], [N]
    count = targets.shape[0]
    if chunk_tokens <= 0:
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        chunk_tokens = auto_chunk_tokens(vocab)
    recompute = torch.is_grad_enabled() and count > chunk_tokens
    picked, entropies = [], []
    for begin in range(0, max(count, 1), chunk_tokens):  # an empty batch still runs (and backprops) once
        args = (head, flat_hidden[begin: begin + chunk_tokens], targets[begin: begin + chunk_tokens], temperature,
                with_entropy)
        value, entropy = checkpoint(_score_chunk, *args, use_reentrant=False) if recompute else _score_chunk(*args)
        picked.append(value)
        entropies.append(entropy)
    zeros = torch.zeros(batch, length, dtype=torch.float32, device=tokens.device)
    logp = zeros.index_put((rows, cols), torch.cat(picked))
    entropy = zeros.index_put((rows, cols), torch.cat(entropies)) if with_entropy else None
    return logp, entropy


class TokenScorer(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns scored-token logprobs instead of logits."""

    def __init__(self, model: Any, chunk_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.model.get_decoder()(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
        return score_hidden(self.model.get_output_embeddings(), hidden, tokens, score_mask, temperature,
                            self.chunk_tokens, with_entropy)


def response_logprobs(model: Any, input_ids: torch.Tensor, start: int, chunk_tokens: int = 0,
                      temperature: float = 1.0) -> torch.Tensor:
    """``out[b, j] = log p(input_ids[b, start + j] | input_ids[b, < start + j])``: ``[B, L - start]`` fp32."""
    score_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    score_mask[:, start:] = True
    logp, _ = TokenScorer(model, chunk_tokens)(input_ids, None, score_mask, temperature)
    return logp[:, start:]
