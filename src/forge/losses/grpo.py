"""GRPO-family policy-gradient losses with a clipped importance ratio and a KL penalty.

Notation, per response token t of sequence i (only tokens with ``mask[i, t] = 1`` count;
every term is computed from differences set to 0 elsewhere, so a prompt or padding
position can never overflow ``exp`` and turn the loss or its gradient into NaN):

    ratio[i,t] = exp(logp[i,t] - behaviour_logp[i,t])            # pi_theta / pi_behaviour
    pg[i,t]    = -min(ratio * A[i], clip(ratio, 1 - eps_low, 1 + eps_high) * A[i])
    pg[i,t]    = min(pg[i,t], -clip_ratio_c * A[i])   where A[i] < 0   # dual clip (optional)
    kl[i,t]    = exp(ref[i,t] - logp[i,t]) - (ref[i,t] - logp[i,t]) - 1   # k3 estimator of KL(pi || ref)
    l[i,t]     = pg[i,t] + beta * kl[i,t]

``behaviour_logp`` are the logprobs the generator returned when it sampled the tokens;
the ratio against them is what makes off-policy (asynchronous) training correct. When
the trainer is exactly on-policy the ratio is 1 and the loss is the plain GRPO loss.
The dual clip bounds the loss of a token with a negative advantage whose ratio has
grown large (stale episodes): without it ``-ratio * A`` is unbounded.

Truncated importance sampling (``tis_cap``), for a generator whose numerics differ from
the trainer's (vLLM, bf16): the ratio is then taken against the trainer's own logprobs
at the start of the step, ``exp(logp - sg(logp))`` (1 in value, the policy gradient in
gradient), and each token's term is weighted by ``min(exp(sg(logp) - behaviour_logp),
tis_cap)``. ``logprob_mismatch`` (mean ``|behaviour_logp - logp|``) is reported either way.

How ``l`` is reduced to a scalar (``normalization``):

* ``"grpo"``    — mean over each sequence's tokens, then mean over sequences (the paper).
* ``"dapo"``    — sum over all tokens / number of tokens in the batch (token mean); use
  ``eps_high > eps_low`` for DAPO's asymmetric "clip-higher".
* ``"dr_grpo"`` — sum over all tokens / (number of sequences * ``max_tokens``), where
  ``max_tokens`` is the generation budget (the sampling ``max_tokens``): a constant, so a
  sequence's loss does not depend on its batch-mates or on the data-parallel split, and
  GRPO's length bias is gone (Dr. GRPO). Dr. GRPO also drops the std in the advantage;
  that is the advantage computation's business, not this loss.

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
    beta: float = 0.04  # KL weight; 0: no KL term (and the GRPO app runs no reference model)
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float | None = 3.0  # dual clip for A < 0 (> 1); None: off
    tis_cap: float | None = None  # truncated importance sampling cap (>= 1); None: off
    max_tokens: int = 0  # dr_grpo's constant: the generation budget (sampling max_tokens); needed for dr_grpo
    temperature: float = 1.0  # logits are divided by it before log-softmax: the sampling temperature

    def __post_init__(self) -> None:
        check_choice("loss normalization", self.normalization, NORMALIZATIONS)
        for name in ("beta", "eps_low", "eps_high"):
            check_number(f"loss {name}", getattr(self, name), 0)
        if self.clip_ratio_c is not None:
            check_number("loss clip_ratio_c", self.clip_ratio_c, 1, low_open=True)
        if self.tis_cap is not None:
            check_number("loss tis_cap", self.tis_cap, 1)
        check_int("loss max_tokens", self.max_tokens, 0)
        check_positive("loss temperature", self.temperature)

    def check_complete(self) -> None:
        """What a loss to train with needs beyond valid values: dr_grpo's constant."""
        if self.normalization == "dr_grpo" and self.max_tokens == 0:
            raise ValueError("loss normalization 'dr_grpo' needs loss max_tokens: the generation budget "
                             "(the sampling max_tokens), its constant normaliser")


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
    """The loss (scalar) and metrics: ``kl``, ``clip_fraction``, ``dual_clip_fraction``,
    ``ratio_mean``, ``logprob_mismatch``, ``pg_loss``, ``num_tokens``."""
    config.check_complete()
    on = mask > 0
    zero = torch.zeros_like(logp)

    def response_only(values: torch.Tensor) -> torch.Tensor:
        return torch.where(on, values, zero)

    adv = advantages[:, None].to(logp.dtype)  # [B, 1]
    if config.tis_cap is not None:
        ratio = torch.exp(response_only(logp - logp.detach()))
        weight = torch.clamp(torch.exp(response_only(logp.detach() - behaviour_logp)), max=config.tis_cap)
    else:
        ratio = torch.exp(response_only(logp - behaviour_logp))  # [B, T]
        weight = None
    clipped_ratio = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)  # [B, T]
    dual_clipped = torch.zeros_like(on)
    if config.clip_ratio_c is not None:
        bound = -config.clip_ratio_c * adv  # > 0 where A < 0
        dual_clipped = on & (adv < 0) & (pg > bound)
        pg = torch.where(dual_clipped, bound.expand_as(pg), pg)
    if weight is not None:
        pg = pg * weight
    log_ref_ratio = response_only(ref_logp - logp)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [B, T], 0 off the response
    per_token = response_only(pg + config.beta * kl if config.beta else pg)

    weights = on.to(logp.dtype)
    num_tokens = weights.sum().clamp(min=1)
    if config.normalization == "grpo":
        per_sequence = per_token.sum(1) / weights.sum(1).clamp(min=1)  # [B]
        denominator = token_normalizer if token_normalizer is not None else logp.shape[0]
        loss = per_sequence.sum() / denominator
    elif config.normalization == "dapo":
        denominator = token_normalizer if token_normalizer is not None else num_tokens
        loss = per_token.sum() / denominator
    else:  # dr_grpo: a constant normaliser, the generation budget
        denominator = token_normalizer if token_normalizer is not None else logp.shape[0]
        loss = per_token.sum() / (denominator * config.max_tokens)

    with torch.no_grad():
        is_clipped = on & (((ratio < 1 - config.eps_low) & (adv < 0)) | ((ratio > 1 + config.eps_high) & (adv > 0)))
        metrics = {
            "kl": float(kl.sum() / num_tokens),
            "clip_fraction": float(is_clipped.sum() / num_tokens),
            "dual_clip_fraction": float(dual_clipped.sum() / num_tokens),
            "ratio_mean": float(response_only(ratio).sum() / num_tokens),
            "logprob_mismatch": float(response_only(behaviour_logp - logp).abs().sum() / num_tokens),
            "pg_loss": float(response_only(pg).sum() / num_tokens),
            "num_tokens": float(num_tokens),
        }
        if weight is not None:
            metrics["tis_weight_mean"] = float(response_only(weight).sum() / num_tokens)
    return loss, metrics
