"""GRPO losses against hand-computed values, and a gradient check."""

import math

import pytest
import torch

from forge.losses import LossConfig, grpo_loss, kl_k3, sequence_logprobs


def test_on_policy_grpo_loss_is_minus_the_mean_advantage_weighted_ratio():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, metrics = grpo_loss(logp, logp, logp, adv, mask, LossConfig(beta=0.0))
    # ratio == 1: per-token pg = -A; GRPO: seq means [-1, 2], batch mean 0.5
    assert loss.item() == pytest.approx(0.5)
    assert metrics["kl"] == 0 and metrics["clip_fraction"] == 0 and metrics["ratio_mean"] == 1


def test_ratio_is_clipped_against_the_behaviour_logprobs():
    behaviour = torch.log(torch.tensor([[0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    cfg = LossConfig(beta=0.0, eps_low=0.2, eps_high=0.2)
    loss, metrics = grpo_loss(logp, behaviour, logp, torch.tensor([1.0]), mask, cfg)
    # A>0: token0 min(1.5, 1.2)=1.2 ; token1 min(0.5, 0.8)=0.5 -> mean -(1.2+0.5)/2
    assert loss.item() == pytest.approx(-0.85)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    loss, _ = grpo_loss(logp, behaviour, logp, torch.tensor([-1.0]), mask, cfg)
    # A<0: -min(-1.5, -1.2)=1.5 ; -min(-0.5, -0.8)=0.8 -> mean 1.15
    assert loss.item() == pytest.approx(1.15)


def test_dapo_clip_higher_is_asymmetric():
    behaviour = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    cfg = LossConfig(normalization="dapo", beta=0.0, eps_low=0.2, eps_high=0.28)
    loss, metrics = grpo_loss(logp, behaviour, logp, torch.tensor([1.0]), torch.ones(1, 1), cfg)
    assert loss.item() == pytest.approx(-1.25) and metrics["clip_fraction"] == 0


def test_k3_kl_matches_its_formula_and_is_nonnegative():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    expected = [math.exp(r - l) - (r - l) - 1 for l, r in zip(logp.tolist(), ref.tolist())]
    assert torch.allclose(kl_k3(logp, ref), torch.tensor(expected))
    assert bool((kl_k3(torch.randn(100), torch.randn(100)) >= 0).all())


def test_normalizations_differ_exactly_as_documented():
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, 1.0])
    grpo, _ = grpo_loss(logp, logp, logp, adv, mask, LossConfig(beta=0))
    dapo, _ = grpo_loss(logp, logp, logp, adv, mask, LossConfig("dapo", beta=0))
    dr, _ = grpo_loss(logp, logp, logp, adv, mask, LossConfig("dr_grpo", beta=0, max_tokens=8))
    assert grpo.item() == pytest.approx(-1.0)  # each sequence's mean is -1
    assert dapo.item() == pytest.approx(-1.0)  # -5 / 5 tokens
    assert dr.item() == pytest.approx(-5 / (2 * 8))


def test_kl_term_adds_beta_times_k3():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, metrics = grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1), LossConfig(beta=0.1))
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(0.1 * k3) and metrics["kl"] == pytest.approx(k3)


def test_sequence_logprobs_align_with_the_tokens_they_score():
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    out = sequence_logprobs(logits, tokens, temperature=0.5)
    expected = torch.log_softmax(logits[1, 2] / 0.5, -1)[tokens[1, 3]]
    assert out.shape == (2, 5) and out[0, 0] == 0
    assert out[1, 3].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("normalization", ["grpo", "dapo", "dr_grpo"])
def test_gradient_matches_finite_differences(normalization):
    torch.manual_seed(0)
    behaviour = torch.randn(3, 4, dtype=torch.double) - 1
    ref = torch.randn(3, 4, dtype=torch.double) - 1
    adv = torch.randn(3, dtype=torch.double)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.double)
    cfg = LossConfig(normalization, beta=0.1, eps_low=0.5, eps_high=0.5)
    logp = (behaviour + 0.1 * torch.randn(3, 4, dtype=torch.double)).requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: grpo_loss(lp, behaviour, ref, adv, mask, cfg)[0], (logp,))


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        LossConfig("ppo")
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=-1)
