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
    cfg = LossConfig(normalization, beta=0.1, eps_low=0.5, eps_high=0.5, max_tokens=4)
    logp = (behaviour + 0.1 * torch.randn(3, 4, dtype=torch.double)).requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: grpo_loss(lp, behaviour, ref, adv, mask, cfg)[0], (logp,))


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        LossConfig("ppo")
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=-1)
    with pytest.raises(ValueError, match="dr_grpo' needs loss max_tokens"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1),
                  LossConfig("dr_grpo"))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossConfig(clip_ratio_c=0.5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("normalization", ["grpo", "dapo", "dr_grpo"])
def test_a_huge_negative_logprob_off_the_response_gives_a_finite_loss_and_gradient(normalization, beta):
    """Behaviour and reference logprobs are 0 off the response; exp(0 - (-1e4)) would overflow."""
    logp = torch.tensor([[-1e4, -0.5, -1.0, -1e4]], requires_grad=True)  # prompt, 2 response tokens, padding
    stored = torch.tensor([[0.0, -0.6, -0.9, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    cfg = LossConfig(normalization, beta=beta, max_tokens=4)
    loss, metrics = grpo_loss(logp, stored, stored, torch.tensor([-1.0]), mask, cfg)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logp.grad).all())
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0  # no gradient off the response
    assert all(math.isfinite(v) for v in metrics.values())


def test_the_dual_clip_bounds_a_negative_advantage_tokens_loss():
    behaviour = torch.zeros(1, 1)
    logp = torch.full((1, 1), 3.0, requires_grad=True)  # ratio e^3 (a stale episode)
    mask = torch.ones(1, 1)
    unbounded, _ = grpo_loss(logp, behaviour, logp.detach(), torch.tensor([-1.0]), mask,
                             LossConfig(beta=0, clip_ratio_c=None))
    assert unbounded.item() == pytest.approx(math.exp(3))  # 20.1
    loss, metrics = grpo_loss(logp, behaviour, logp.detach(), torch.tensor([-1.0]), mask, LossConfig(beta=0))
    assert loss.item() == pytest.approx(3.0) and metrics["dual_clip_fraction"] == 1.0
    loss.backward()
    assert logp.grad.item() == 0  # a clipped token pushes no further
    positive, _ = grpo_loss(logp, behaviour, logp.detach(), torch.tensor([1.0]), mask, LossConfig(beta=0))
    assert positive.item() == pytest.approx(-1.2)  # A > 0: the ordinary clip, no dual clip


def test_truncated_importance_sampling_weights_tokens_by_the_capped_mismatch():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    behaviour = torch.log(torch.tensor([[0.25, 0.5]]))  # the generator saw token 0 as less likely
    loss, metrics = grpo_loss(logp, behaviour, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2),
                              LossConfig(beta=0, tis_cap=1.5))
    # ratio against the trainer itself is 1; weights min(2, 1.5) and 1 -> -(1.5 + 1) / 2
    assert loss.item() == pytest.approx(-1.25)
    assert metrics["ratio_mean"] == 1.0 and metrics["tis_weight_mean"] == pytest.approx(1.25)
    assert metrics["logprob_mismatch"] == pytest.approx(math.log(2) / 2)


def test_dr_grpo_gives_a_sequence_the_same_loss_whatever_its_batch_mates():
    cfg = LossConfig("dr_grpo", beta=0, max_tokens=8)
    alone, _ = grpo_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([1.0]),
                         torch.ones(1, 3), cfg)
    padded = torch.zeros(2, 6)  # a longer batch-mate widens the padded batch
    mask = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with_mate, _ = grpo_loss(padded, padded, padded, torch.tensor([1.0, 0.0]), mask, cfg, token_normalizer=1)
    assert with_mate.item() == pytest.approx(alone.item()) == pytest.approx(-3 / 8)


def test_on_policy_at_a_sampling_temperature_the_ratio_is_one_and_the_kl_zero():
    """One temperature end to end: sample at T=0.7, score with the trainer's and the reference's
    code at the same T (the GRPO config ties them); same weights, so nothing is clipped."""
    from forge.losses import response_logprobs
    from forge.data.batch import collate
    from forge.engine.config import EngineConfig, SamplingParams
    from forge.engine.native import NativeEngine
    from forge.models import load_model, load_tokenizer

    temperature = 0.7
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny")
    engine = NativeEngine(model, (tokenizer.eos_token_id,), EngineConfig(max_model_len=32))
    prompt = tokenizer("3+4=", add_special_tokens=False)["input_ids"]
    request = engine.add_request(prompt, SamplingParams(n=8, max_tokens=6, temperature=temperature, seed=1))
    while engine.has_work:
        engine.step()
    samples = request.sequences
    with torch.no_grad():
        reference = [response_logprobs(model, torch.tensor([prompt + s.token_ids]), len(prompt), 4, temperature)[0]
                     for s in samples]
        inputs, targets = collate([prompt] * 8, [s.token_ids for s in samples], [s.logprobs for s in samples],
                                  [r.tolist() for r in reference], [1.0, -1.0] * 4, tokenizer.pad_token_id or 0)
        logits = model(input_ids=inputs.tokens, attention_mask=inputs.attention_mask).logits
        logp = sequence_logprobs(logits, inputs.tokens, temperature)
        _, metrics = grpo_loss(logp, targets.behaviour_logprobs, targets.ref_logprobs, targets.advantages,
                               targets.response_mask, LossConfig(temperature=temperature))
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["logprob_mismatch"] < 1e-4


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_logprobs_and_their_gradients_equal_the_full_logits_ones(chunk):
    """The trainer's chunked head (no [B, L, V] logits, recomputed in the backward pass)
    gives the full-logits logprobs, entropies and gradients, at a temperature, on the
    scored positions only (a tied embedding, so both of its gradient paths are checked)."""
    from forge.losses import TokenScorer
    from forge.models import load_model

    model = load_model("tiny")
    torch.manual_seed(0)
    tokens = torch.randint(4, 20, (3, 12))
    mask = torch.zeros(3, 12)
    mask[:, 5:] = 1
    mask[2, 9:] = 0  # a shorter response: padding is never scored
    weight = torch.randn(3, 12)
    full = torch.log_softmax(model(input_ids=tokens).logits[:, :-1].float() / 0.7, -1)
    full_logp = torch.cat([torch.zeros(3, 1), full.gather(2, tokens[:, 1:, None])[..., 0]], 1) * mask
    full_entropy = torch.cat([torch.zeros(3, 1), -(full.exp() * full).sum(-1)], 1) * mask
    expected = torch.autograd.grad((full_logp * weight).sum(), list(model.parameters()))
    logp, entropy = TokenScorer(model, chunk)(tokens, None, mask, 0.7, with_entropy=True)
    assert (logp - full_logp).abs().max() < 1e-5 and (entropy - full_entropy).abs().max() < 1e-5
    assert logp[mask == 0].eq(0).all() and not entropy.requires_grad
    grads = torch.autograd.grad((logp * weight).sum(), list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, expected):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), name
    # One process adds the head's and the embedding's gradients straight into .grad, twice here
    # (two micro-batches): the same gradient, accumulated.
    for _ in range(2):
        logp, _ = TokenScorer(model, chunk, grads_in_place=True)(tokens, None, mask, 0.7)
        (logp * weight).sum().backward()
    for (name, parameter), want in zip(model.named_parameters(), expected):
        assert (parameter.grad - 2 * want).abs().max() <= 2e-5 * max(1.0, float(want.abs().max())), name
