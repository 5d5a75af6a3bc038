"""RL losses as pure functions on documented shapes."""

from forge.losses.grpo import LossConfig, grpo_loss, kl_k3, sequence_logprobs

__all__ = ["LossConfig", "grpo_loss", "kl_k3", "sequence_logprobs"]
