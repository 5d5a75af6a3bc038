"""Policy-gradient losses and the chunked per-token logprobs they are computed from."""

from forge.losses.grpo import LossConfig, grpo_loss, kl_k3, sequence_logprobs
from forge.losses.logprobs import TokenScorer, response_logprobs, score_hidden

__all__ = ["LossConfig", "TokenScorer", "grpo_loss", "kl_k3", "response_logprobs", "score_hidden",
           "sequence_logprobs"]
