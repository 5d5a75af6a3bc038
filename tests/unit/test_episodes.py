"""What the replay buffer accepts, and how episodes without behaviour logprobs are trained."""

import pytest
import torch

from apps.grpo.main import Episode
from forge.actors.policy import Policy
from forge.actors.replay_buffer import EpisodeBuffer, check_episode
from forge.actors.trainer import RLTrainer
from forge.controller import ForgeActor
from forge.data.batch import collate
from forge.losses import LossConfig, grpo_loss


def episode(episode_id="e1", version=0, logprobs=(-0.5, -0.1), **changes):
    e = Episode(episode_id, "1+1=", version, 0, 4, 2, "2", response="2", request_tokens=[5, 13, 5, 16],
                response_tokens=[6, 2], response_logprobs=list(logprobs), ref_logprobs=torch.tensor([-0.6, -0.2]),
                reward=1.0, advantage=0.5)
    for name, value in changes.items():
        setattr(e, name, value)
    return e


@pytest.mark.parametrize("changes, named", [
    ({"response_logprobs": [-0.5]}, "'bad': response_logprobs has 1 entries but response_tokens has 2"),
    ({"ref_logprobs": [-0.6, -0.2, -0.1]}, "'bad': ref_logprobs has 3 entries"),
    ({"ref_logprobs": torch.zeros(1, 2)}, "'bad': ref_logprobs must be 1-D.*shape \\(1, 2\\)"),
    ({"reward": None}, "'bad': reward is missing"),
    ({"advantage": None}, "'bad': advantage is missing"),
    ({"advantage": float("nan")}, "'bad': advantage must be a finite number"),
    ({"response_tokens": []}, "'bad': response_tokens is empty"),
    ({"request_tokens": []}, "'bad': request_tokens is empty"),
])
def test_a_malformed_episode_is_refused_at_add_naming_the_episode_and_field(changes, named):
    buffer = EpisodeBuffer(batch_size=1)
    with pytest.raises(ValueError, match=named):
        buffer.add(episode("bad", **changes))
    assert len(buffer) == 0
    check_episode(episode("good", advantage=torch.tensor(0.5)))  # a 0-d tensor is a number


def test_fresh_episodes_without_behaviour_logprobs_are_batched_as_on_policy():
    buffer = EpisodeBuffer(batch_size=2)
    buffer.add(episode("a", logprobs=()))
    buffer.add(episode("b"))
    inputs, targets = buffer.sample(curr_policy_version=0)
    assert targets.missing_behaviour().tolist() == [True, False] or targets.missing_behaviour().tolist() == [False, True]
    full = collate([[1, 2]], [[3]], [[-0.1]], [[-0.2]], [1.0], 0)[1]
    assert full.has_behaviour is None and full.missing_behaviour().tolist() == [False]


def test_a_stale_episode_without_behaviour_logprobs_is_never_trained_as_fresh():
    buffer = EpisodeBuffer(batch_size=2, max_policy_age=2)
    buffer.add(episode("old", version=0, logprobs=()))
    buffer.add(episode("scored", version=0))
    buffer.add(episode("new", version=1, logprobs=()))
    with pytest.raises(ValueError, match=r"'old' \(version 0\) have no response_logprobs.*current policy version 1"):
        buffer.sample(curr_policy_version=1)
    inputs, targets = buffer.sample(curr_policy_version=1)  # the rest trains: "scored" off-policy, "new" fresh
    assert inputs.tokens.shape[0] == 2 and buffer.num_evicted == 1


def test_on_policy_fallback_makes_the_ratio_one():
    """The trainer's substitution: behaviour := its own detached logprobs, so ratio == 1 and the
    gradient is the plain policy gradient."""
    logp = torch.tensor([[0.0, -0.7, -1.2]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    behaviour = torch.where(torch.tensor([[True]]), logp.detach(), torch.zeros(1, 3))
    loss, metrics = grpo_loss(logp, behaviour, logp.detach(), torch.tensor([1.0]), mask, LossConfig(beta=0.0))
    loss.backward()
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, -0.5]]))


def test_options_show_their_settings_as_attributes():
    configured = RLTrainer.options(procs=2, with_gpus=False, num_replicas=1)
    assert (configured.procs, configured.with_gpus, configured.num_replicas, configured.hosts) == (2, False, 1, None)
    assert (RLTrainer.procs, RLTrainer.num_replicas, RLTrainer.with_gpus) == (1, 1, False)
    policy = Policy.options(procs=1, num_replicas=4, with_gpus=True)  # the seed's "Real Service Configuration"
    assert (policy.procs, policy.num_replicas, policy.with_gpus, policy.hosts) == (1, 4, True, None)

    class OwnProcs(ForgeActor):
        procs = "mine"  # a class's own attribute is not overwritten

    assert OwnProcs.options(procs=3).procs == "mine"
    assert OwnProcs.options(procs=3)._forge_placement.procs == 3
    assert ForgeActor._forge_service_options.router_factory is not None  # as_service() without options()
