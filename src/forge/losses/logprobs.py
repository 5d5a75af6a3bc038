"""Per-token logprobs of a causal LM without materialising ``[B, L, V]`` logits.

A GRPO step needs ``log p(token_t | tokens_<t)`` at the response positions only, plus
the entropy there as a metric. With a real vocabulary (Qwen3: 151,936) the full fp32
logits of a modest batch are tens of gigabytes, and a log-softmax, a temperature copy
and a softmax each add as much again. Here the decoder runs once; the hidden states at
the scored positions are gathered into a flat ``[N, H]``, and one autograd function
(``ChunkedHeadLogprobs``) runs the output head over blocks of at most ``chunk_elements``
logits: blocks of positions, and within each, slices of the vocabulary.

* Forward: an online log-sum-exp over the vocabulary slices (a running maximum, the sum
  of exponentials and, for the entropy, their ``z``-weighted sum), and the picked
  token's logit from the slice that holds it. Only the ``[N]`` log-sum-exps are kept.
* Backward: each slice's logits are recomputed and turned in place into the gradient
  ``g * (onehot - softmax) / T``; that adds into the hidden states' gradient and writes
  the slice's rows of the head weight's gradient. Slicing the vocabulary (not only the
  positions) is what keeps this cheap: each row of the ``[V, H]`` weight gradient is
  written once per block of positions, not once per small chunk of positions.

So at most two ``chunk_elements`` buffers exist at any moment, at the cost of one more
head matmul than keeping the logits (the recomputation in the backward pass).

``TokenScorer`` wraps a Hugging Face causal LM so that this whole computation is one
module's ``forward``: with FSDP2 it is the root module, whose hooks gather the output
head (tied to the embedding in Qwen3) for the chunked head and reduce its gradients.
"""

from __future__ import annotations

from typing import Any

import torch

# Auto budget, in fp32 logits per block: 16 MiB on CPU, where memory is the constraint,
# 256 MiB on a GPU, whose matmuls want big blocks. A small batch and vocabulary get one block.
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
MIN_VOCAB_SLICE = 512  # positions per block are capped so that a vocabulary slice stays this wide


def auto_chunk_elements(device: str = "cpu") -> int:
    return AUTO_CHUNK_ELEMENTS.get(device, 1 << 22)


def _blocks(count: int, vocab: int, chunk_elements: int) -> tuple[int, int]:
    """(positions per block, vocabulary entries per slice) within ``chunk_elements`` logits."""
    rows = min(count, max(1, chunk_elements // min(vocab, MIN_VOCAB_SLICE)))
    return max(rows, 1), min(vocab, max(1, chunk_elements // max(rows, 1)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (bf16 over fp32 master weights), else the weight's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """``(hidden @ weight.T + bias) / temperature`` in fp32; ``hidden`` and ``weight`` already in
    the compute dtype (``weight`` and ``bias`` a slice of the vocabulary)."""
    logits = (hidden @ weight.T).float()
    if bias is not None:
        logits += bias.float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def _in_slice(targets: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target falls in vocabulary slice ``[start, start + width)``, and its column there."""
    rows = torch.nonzero((targets >= start) & (targets < start + width), as_tuple=True)[0]
    return rows, targets[rows] - start


class ChunkedHeadLogprobs(torch.autograd.Function):
    """``log_softmax((hidden @ weight.T + bias) / T)[targets]`` in blocks; see the module docstring.

    Returns the logprobs ``[N]`` (fp32, differentiable) and the entropies ``[N]`` (fp32,
    not differentiable; zeros unless ``with_entropy``). With ``grads_in_place`` the
    weight's gradient is added straight into ``weight.grad`` (created if need be) instead
    of being returned: no ``[V, H]`` temporary, which for a real vocabulary is as large as
    the rest of the model. Only for a plain (non-FSDP) parameter."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, temperature: float, chunk_elements: int, with_entropy: bool,
                grads_in_place: bool) -> Any:
        dtype = _compute_dtype(hidden, weight)
        count, vocab = targets.shape[0], weight.shape[0]
        rows_per_block, vocab_slice = _blocks(count, vocab, chunk_elements)
        picked = torch.zeros(count, dtype=torch.float32, device=hidden.device)
        lse, entropy = torch.zeros_like(picked), torch.zeros_like(picked)
        with torch.autocast(hidden.device.type, enabled=False):
            w, h = weight.to(dtype), hidden.to(dtype)
            for begin in range(0, count, rows_per_block):
                rows = slice(begin, begin + rows_per_block)
                top = torch.full_like(picked[rows], float("-inf"))
                total, weighted = torch.zeros_like(top), torch.zeros_like(top)
                for start in range(0, vocab, vocab_slice):
                    part = slice(start, start + vocab_slice)
                    z = _scaled_logits(h[rows], w[part], None if bias is None else bias[part], temperature)
                    new_top = torch.maximum(top, z.amax(-1))
                    rescale = torch.exp(top - new_top)
                    e = (z - new_top[:, None]).exp_()
                    total = total * rescale + e.sum(-1)
                    if with_entropy:
                        weighted = weighted * rescale + torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]
                    hit, column = _in_slice(targets[rows], start, z.shape[1])
                    picked[begin + hit] = z[hit, column]
                    top = new_top
                    del z, e
                lse[rows] = top + total.log()
                if with_entropy:  # H = lse - E_p[z]
                    entropy[rows] = lse[rows] - weighted / total
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.blocks, ctx.dtype = temperature, (rows_per_block, vocab_slice), dtype
        ctx.grads_in_place = grads_in_place
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_picked: torch.Tensor, _grad_entropy: Any) -> Any:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, (rows_per_block, vocab_slice), dtype = ctx.temperature, ctx.blocks, ctx.dtype
        w, h = weight.to(dtype), hidden.to(dtype)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        in_place = need_weight and ctx.grads_in_place
        if in_place and weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight_grad = None
        if need_weight:
            weight_grad = weight.grad if in_place else torch.zeros(weight.shape, dtype=torch.float32,
                                                                   device=weight.device)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        scale = grad_picked.float() / temperature  # d logprob / d z = onehot - softmax; z = logits / T
        count, vocab = targets.shape[0], weight.shape[0]
        for begin in range(0, count, rows_per_block):
            rows = slice(begin, begin + rows_per_block)
            for start in range(0, vocab, vocab_slice):
                part = slice(start, start + vocab_slice)
                g = _scaled_logits(h[rows], w[part], None if bias is None else bias[part], temperature)
                g.sub_(lse[rows, None]).exp_().mul_(-scale[rows, None])  # -scale * softmax, in place
                hit, column = _in_slice(targets[rows], start, g.shape[1])
                g.index_put_((hit, column), scale[rows][hit], accumulate=True)  # + scale at the picked token
                if grad_hidden is not None:
                    grad_hidden[rows] += (g.to(dtype) @ w[part]).float()
                if weight_grad is not None:
                    weight_grad[part].addmm_(g.T.to(weight_grad.dtype), hidden[rows].to(weight_grad.dtype))
                if grad_bias is not None:
                    grad_bias[part] += g.sum(0)
                del g
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if weight_grad is None or in_place else weight_grad.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None)


class EmbeddingGradsInPlace(torch.autograd.Function):
    """``torch.nn.functional.embedding`` whose weight gradient is added straight into
    ``weight.grad``: the dense ``[V, H]`` gradient a lookup's backward otherwise allocates
    is gone. Rows of ``padding_idx`` get no gradient, as in ``nn.Embedding``."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        ids, weight = ctx.saved_tensors
        flat_ids, rows = ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.padding_idx is not None:
            keep = flat_ids != ctx.padding_idx
            flat_ids, rows = flat_ids[keep], rows[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, flat_ids, rows.to(weight.grad.dtype))
        return None, None, None


def score_hidden(
    head: torch.nn.Module,  # the output head: a Linear, hidden [.., H] -> logits [.., V]
    hidden: torch.Tensor,  # [B, L, H] the decoder's final hidden states
    tokens: torch.Tensor,  # [B, L]
    score_mask: torch.Tensor,  # [B, L]: nonzero where tokens[b, t] is scored (t >= 1)
    temperature: float = 1.0,
    chunk_elements: int = 0,  # logits per block; 0: auto_chunk_elements(device)
    with_entropy: bool = False,
    grads_in_place: bool = False,  # see ChunkedHeadLogprobs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logp[b, t] = log_softmax(logits(hidden[b, t-1]) / temperature)[tokens[b, t]]`` in fp32
    where ``score_mask[b, t]``, 0 elsewhere; and the entropy of that distribution (detached)
    at the same positions, when asked. Both ``[B, L]``."""
    batch, length = tokens.shape
    rows, cols = torch.nonzero(score_mask[:, 1:] > 0, as_tuple=True)
    cols = cols + 1
    weight = head.weight
    chunk = chunk_elements if chunk_elements > 0 else auto_chunk_elements(hidden.device.type)
    picked, entropy = ChunkedHeadLogprobs.apply(hidden[rows, cols - 1], weight, getattr(head, "bias", None),
                                                tokens[rows, cols], temperature, chunk, with_entropy,
                                                grads_in_place)
    zeros = torch.zeros(batch, length, dtype=torch.float32, device=tokens.device)
    return zeros.index_put((rows, cols), picked), zeros.index_put((rows, cols), entropy) if with_entropy else None


class TokenScorer(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns scored-token logprobs instead of logits.

    ``grads_in_place`` (one process, not FSDP): the output head's and a plain
    ``nn.Embedding``'s weight gradients are added straight into ``.grad``, so neither
    allocates a ``[V, H]`` gradient per backward pass (the model's largest tensor, and
    with a tied embedding the same one twice)."""

    def __init__(self, model: Any, chunk_elements: int = 0, grads_in_place: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_elements = chunk_elements
        self.grads_in_place = grads_in_place

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        embedding = self.model.get_input_embeddings()
        inputs: dict[str, torch.Tensor] = {"input_ids": tokens}
        if self.grads_in_place and torch.is_grad_enabled() and type(embedding) is torch.nn.Embedding:
            inputs = {"inputs_embeds": EmbeddingGradsInPlace.apply(tokens, embedding.weight, embedding.padding_idx)}
        hidden = self.model.get_decoder()(**inputs, attention_mask=attention_mask).last_hidden_state
        return score_hidden(self.model.get_output_embeddings(), hidden, tokens, score_mask, temperature,
                            self.chunk_elements, with_entropy, self.grads_in_place and torch.is_grad_enabled())


def response_logprobs(model: Any, input_ids: torch.Tensor, start: int, chunk_elements: int = 0,
                      temperature: float = 1.0) -> torch.Tensor:
    """``out[b, j] = log p(input_ids[b, start + j] | input_ids[b, < start + j])``: ``[B, L - start]`` fp32."""
    score_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    score_mask[:, start:] = True
    logp, _ = TokenScorer(model, chunk_elements)(input_ids, None, score_mask, temperature)
    return logp[:, start:]
