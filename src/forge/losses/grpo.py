"""GRPO-family policy-gradient losses with a clipped importance ratio and a KL penalty.

Notation, per response token t of sequence i (only tokens with ``mask[i, t] = 1`` count):

    ratio[i,t] = exp(logp[i,t] - behaviour_logp[i,t])            # pi_theta / pi_behaviour
    pg[i,t]    = -min(ratio * A[i], clip(ratio, 1 - eps_low, 1 + eps_high) * A[i])
    kl[i,t]    = exp(ref[i,t] - logp[i,t]) - (ref[i,t] - logp[i,t]) - 1   # k3 estimator of KL(pi || ref)
    l[i,t]     = pg[i,t] + beta * kl[i,t]

``behaviour_logp`` are the logprobs the generator returned when it sampled the tokens;
the ratio against them is what makes off-policy (asynchronous) training correct. When
the trainer is exactly on-policy the ratio is 1 and the loss is the plain GRPO loss.

How ``l`` is reduced to a scalar (``normalization``):

* ``"grpo"``    — mean over each sequence's tokens, then mean over sequences (the paper).
* ``"dapo"``    — sum over all tokens / number of tokens in the batch (token mean); use
  ``eps_high > eps_low`` for DAPO's asymmetric "clip-higher".
* ``"dr_grpo"`` — sum over all tokens / (number of sequences * ``max_tokens``), a
  constant normaliser that removes GRPO's length bias (Dr. GRPO). Dr. GRPO also drops
  the std in the advantage; that is the advantage computation's business, not this loss.

``token_normalizer`` lets data-parallel ranks use the global count: with DP each rank
passes the global number of tokens (dapo) or sequences (grpo, dr_grpo) divided by the
world size, so that averaging gradients across ranks equals the single-process loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.util.checks import check_choice, check_int, check_number, check_positive

NORMALIZATIONS = ("grpo", "dapo", "dr_grpo")


@dataclass(frozen=True)
class LossConfig:
    normalization: str = "grpo"
    beta: float = 0.04  # KL weight
    eps_low: float = 0.2
    eps_high: float = 0.2
    max_tokens: int = 0  # dr_grpo's constant; 0: the batch's padded length
    temperature: float = 1.0  # logits are divided by it before log-softmax (match the generator)

    def __post_init__(self) -> None:
        check_choice("loss normalization", self.normalization, NORMALIZATIONS)
        for name in ("beta", "eps_low", "eps_high"):
            check_number(f"loss {name}", getattr(self, name), 0)
        check_int("loss max_tokens", self.max_tokens, 0)
        check_positive("loss temperature", self.temperature)


def sequence_logprobs(
    logits: torch.Tensor,  # [B, L, V] for input tokens [B, L]
    tokens: torch.Tensor,  # [B, L]
    temperature: float = 1.0,
) -> torch.Tensor:
    """``out[b, t] = log p(tokens[b, t] | tokens[b, <t])`` in fp32; ``out[:, 0] = 0``. Shape [B, L]."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [B, L-1, V]
    picked = logp.gather(2, tokens[:, 1:, None])[..., 0]  # [B, L-1]
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), elementwise, always >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logp: torch.Tensor,  # [B, T] current policy logprobs of the response tokens
    behaviour_logp: torch.Tensor,  # [B, T] generator's logprobs of the same tokens
    ref_logp: torch.Tensor,  # [B, T] reference model's logprobs
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] 1 for response tokens, 0 for prompt/padding
    config: LossConfig = LossConfig(),
    token_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (scalar) and metrics: ``kl``, ``clip_fraction``, ``ratio_mean``, ``pg_loss``."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - behaviour_logp)  # [B, T]
    adv = advantages[:, None].to(logp.dtype)  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high) * adv
    pg = -torch.minimum(unclipped, clipped)  # [B, T]
    kl = kl_k3(logp, ref_logp)  # [B, T]
    per_token = pg + config.beta * kl

    num_tokens = mask.sum().clamp(min=1)
    if config.normalization == "grpo":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
        denominator = token_normalizer if token_normalizer is not None else logp.shape[0]
        loss = per_sequence.sum() / denominator
    elif config.normalization == "dapo":
        denominator = token_normalizer if token_normalizer is not None else num_tokens
        loss = (per_token * mask).sum() / denominator
    else:  # dr_grpo
        max_tokens = config.max_tokens or logp.shape[1]
        denominator = token_normalizer if token_normalizer is not None else logp.shape[0]
        loss = (per_token * mask).sum() / (denominator * max_tokens)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - config.eps_low) & (adv < 0)) | ((ratio > 1 + config.eps_high) & (adv > 0))
        metrics = {
            "kl": float((kl * mask).sum() / num_tokens),
            "clip_fraction": float((is_clipped.to(mask.dtype) * mask).sum() / num_tokens),
            "ratio_mean": float((ratio * mask).sum() / num_tokens),
            "pg_loss": float((pg * mask).sum() / num_tokens),
            "num_tokens": float(num_tokens),
        }
    return loss, metrics
