"""The GRPO app's data types and small actors (imported from ``apps.grpo.main`` by users)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monarch.actor import endpoint

from forge.controller import ForgeActor
from forge.data.datasets import ArithmeticTask, PromptSource, load_rows
from forge.data.rewards import MathReward, ThinkingReward
from forge.observability import record_metric
from forge.util.checks import check_int

REWARD_FUNCTIONS = {"math": MathReward, "thinking": ThinkingReward}


@dataclass
class Episode:
    """One sampled response to one prompt, with everything training needs."""

    episode_id: str
    request: Any
    policy_version: int
    pad_id: int
    request_len: int
    response_len: int
    target: Any = None
    response: str | None = None
    request_tokens: list[int] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)  # behaviour logprobs from the generator
    ref_logprobs: Any = None  # [T] tensor or list, reference model logprobs of response_tokens
    response_mask: list[int] | None = None  # multi-turn: 1 on the policy's tokens, 0 on the environment's
    reward: float | None = None
    advantage: float | None = None


@dataclass
class Group:
    """The ``group_size`` episodes sampled from one prompt."""

    group_id: str
    episodes: list[Episode]

    @classmethod
    def new_group(cls, group_id: Any, group_size: int, request: Any, policy_version: int, pad_id: int,
                  request_len: int, response_len: int, target: Any = None) -> "Group":
        return cls(str(group_id), [
            Episode(f"{group_id}-{i}", request, policy_version, pad_id, request_len, response_len, target)
            for i in range(group_size)
        ])


class DatasetActor(ForgeActor):
    """Serves prompts: the embedded arithmetic task or a local data set.

    ``path`` is ``"arithmetic"`` or a local data set (HF save_to_disk directory, JSONL,
    parquet); ``model`` names the tokenizer whose chat template ``use_chat_template``
    applies. ``revision`` and ``streaming`` are accepted for compatibility and ignored:
    local files are read whole.
    """

    def __init__(self, path: str = "arithmetic", data_split: str = "train", model: str | None = None,
                 question_field: str = "question", answer_field: str = "answer", seed: int = 0,
                 use_chat_template: bool = False, system_prompt: str | None = None, max_operand: int = 9,
                 max_sum: int = 9, revision: str | None = None, streaming: bool = False,
                 eval_split: str | None = None, min_operand: int = 0) -> None:
        eval_rows = None
        if path == "arithmetic":
            rows = ArithmeticTask(max_operand, max_sum, min_operand).rows()
            if not rows:
                raise ValueError(f"the arithmetic task has no prompts for operands {min_operand}..{max_operand} "
                                 f"with sums <= {max_sum}; raise max_sum or lower min_operand")
            question_field, answer_field = "question", "answer"
        else:
            rows = load_rows(path, data_split)
            eval_rows = load_rows(path, eval_split) if eval_split else None
        tokenizer = None
        if use_chat_template:
            from forge.models import load_tokenizer

            if model is None:
                raise ValueError("DatasetActor use_chat_template=True needs model= (whose tokenizer has the template)")
            tokenizer = load_tokenizer(model)
        self.source = PromptSource(rows, question_field, answer_field, seed, tokenizer, use_chat_template,
                                   system_prompt)
        self.eval_source = (PromptSource(eval_rows, question_field, answer_field, seed, tokenizer,
                                         use_chat_template, system_prompt) if eval_rows else self.source)

    @endpoint
    async def sample(self) -> dict[str, Any]:
        """The next prompt: ``request``, ``target``, ``question``, ``answer``, ``index``, ``epoch``."""
        item = self.source.sample()
        record_metric("data/epoch", item["epoch"], "last")
        return item

    @endpoint
    async def sample_batch(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` prompts in one message: what ``count`` ``sample`` calls return."""
        check_int("DatasetActor.sample_batch: count", count, 1)
        items = [self.source.sample() for _ in range(count)]
        record_metric("data/epoch", items[-1]["epoch"], "last")
        return items

    @endpoint
    async def eval_rows(self, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` evaluation rows: the held-out split when one was given, else the
        first rows of the training data (all of them for the finite embedded task)."""
        source = self.eval_source
        return [source.row(i) for i in range(min(count, len(source.rows)))]

    @endpoint
    async def state_dict(self) -> dict[str, int]:
        return self.source.state_dict()

    @endpoint
    async def load_state_dict(self, state: dict[str, int]) -> None:
        self.source.load_state_dict(state)


class RewardActor(ForgeActor):
    """Combines reward functions; records each function's score as a metric."""

    def __init__(self, reward_functions: list, weights: list[float] | None = None) -> None:
        self.reward_functions = list(reward_functions)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.reward_functions)
        if len(self.weights) != len(self.reward_functions):
            raise ValueError("RewardActor needs one weight per reward function")

    def _score(self, prompt: str, response: str, target: str) -> float:
        if not self.reward_functions:
            return 0.0
        total = 0.0
        for fn, weight in zip(self.reward_functions, self.weights):
            score = float(fn(prompt, response, target))
            record_metric(f"reward/{getattr(fn, 'name', type(fn).__name__)}", score, "mean")
            total += weight * score
        return total / sum(self.weights)

    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: str) -> float:
        """Weighted mean of the reward functions' scores."""
        return self._score(prompt, response, target)

    @endpoint
    async def evaluate_responses(self, prompt: str, responses: list[str], target: str) -> list[float]:
        """``evaluate_response`` for a whole group in one message."""
        return [self._score(prompt, r, target) for r in responses]

    @endpoint
    async def evaluate_groups(self, prompts: list[str], responses: list[list[str]], targets: list[Any]) -> list[list[float]]:
        """``evaluate_responses`` for several groups in one message: one list of rewards per prompt."""
        if not len(prompts) == len(responses) == len(targets):
            raise ValueError(f"RewardActor.evaluate_groups: {len(prompts)} prompts, {len(responses)} response "
                             f"lists and {len(targets)} targets; give one response list and one target per prompt")
        return [[self._score(p, r, t) for r in group] for p, group, t in zip(prompts, responses, targets)]


class ComputeAdvantages(ForgeActor):
    """Group-relative advantages: ``(r - mean) / (std + eps)``, or ``r - mean`` (Dr. GRPO)."""

    def __init__(self, scale_by_std: bool = True, eps: float = 1e-4) -> None:
        self.scale_by_std = scale_by_std
        self.eps = eps

    @endpoint
    async def compute(self, group: Group) -> list[float]:
        return self._advantages(group)

    @endpoint
    async def compute_batch(self, groups: list[Group]) -> list[list[float]]:
        """``compute`` for several groups in one message."""
        return [self._advantages(g) for g in groups]

    def _advantages(self, group: Group) -> list[float]:
        return group_advantages([e.reward for e in group.episodes], self.scale_by_std, self.eps)


def group_advantages(rewards: list[float], scale_by_std: bool = True, eps: float = 1e-4) -> list[float]:
    """Advantages of one group's rewards (population std)."""
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if not scale_by_std:
        return centered
    std = (sum(c * c for c in centered) / len(rewards)) ** 0.5
    return [c / (std + eps) for c in centered]
