"""The GRPO application's configuration: typed, validated before anything is spawned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.engine.config import EngineConfig, SamplingParams
from forge.losses import LossConfig


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{where} must be > 0, got {value}")


@dataclass
class RunConfig:
    name: str = "grpo"
    output_dir: str = "runs"
    seed: int = 0
    max_steps: int = 500
    target_reward: float | None = 0.9  # stop once the moving mean reward reaches it; null: never
    reward_window: int = 10  # steps in that moving mean
    max_time_s: float = 600.0
    stall_timeout_s: float | None = 900.0  # no step finished this long: stop with where each loop waits
    log_every: int = 10
    eval_every: int = 25  # 0: no evaluation
    checkpoint_every: int = 50  # 0: no checkpoints
    keep_checkpoints: int = 2
    rollout_tasks: int = 4
    weight_update: str = "fanout"  # "fanout" or "rolling"

    def __post_init__(self) -> None:
        for name in ("max_steps", "reward_window", "log_every", "rollout_tasks", "keep_checkpoints"):
            _positive(f"run.{name}", getattr(self, name))
        _positive("run.max_time_s", self.max_time_s)
        if self.stall_timeout_s is not None:
            _positive("run.stall_timeout_s", self.stall_timeout_s)
        if self.weight_update not in ("fanout", "rolling"):
            raise ValueError(f"run.weight_update must be 'fanout' or 'rolling', got {self.weight_update!r}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("run.eval_every and run.checkpoint_every must be >= 0")


@dataclass
class DataConfig:
    source: str = "arithmetic"  # "arithmetic" (embedded) or a local data set path
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    use_chat_template: bool = False
    system_prompt: str | None = None
    eval_split: str | None = None  # held-out split of a local data set; None: sample of the train rows
    eval_size: int = 55
    max_operand: int = 9  # arithmetic task
    max_sum: int = 9


@dataclass
class PolicyConfig:
    num_replicas: int = 1
    procs: int = 1
    with_gpus: bool = False
    engine: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=lambda: {"max_tokens": 3, "temperature": 1.0, "top_p": 1.0})

    def __post_init__(self) -> None:
        EngineConfig.parse(self.engine)
        sampling = SamplingParams.parse(self.sampling)
        if sampling.n != 1 and "n" in self.sampling:
            raise ValueError("policy.sampling.n is set by group_size; leave it out")


@dataclass
class TrainerConfig:
    procs: int = 1  # data-parallel ranks per host
    hosts: int = 1  # hosts the trainer spans (> 1 needs placement.trainer); ranks = procs * hosts
    with_gpus: bool = False
    optimizer: dict = field(default_factory=lambda: {"name": "AdamW", "lr": 3e-3})
    training: dict = field(default_factory=lambda: {"local_batch_size": 128, "seq_len": 64, "max_norm": 1.0})
    loss: dict = field(default_factory=lambda: {"normalization": "grpo", "beta": 0.04})
    lr_scheduler: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        LossConfig(**self.loss)

    @property
    def num_ranks(self) -> int:
        return self.procs * self.hosts


@dataclass
class BufferConfig:
    batch_size: int = 128  # episodes per train step
    max_policy_age: int = 1
    max_buffer_size: int = 0
    max_resample: int = 1


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["math"])  # "math", "thinking"
    weights: list[float] | None = None
    num_replicas: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.functions) - {"math", "thinking"})
        if unknown or not self.functions:
            raise ValueError(f"reward.functions must be a non-empty list of 'math', 'thinking'; got {self.functions}")
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError("reward.weights must have one weight per reward function")


# The parts of the GRPO app, as ``placement:`` names them.
PARTS = ("dataloader", "policy", "trainer", "replay_buffer", "compute_advantages", "ref_model", "reward")


@dataclass
class GRPOConfig:
    model: str = "tiny"  # preset, local HF directory, or hf://org/name in the local cache
    group_size: int = 8
    scale_advantages_by_std: bool = True  # False: Dr. GRPO's (r - mean)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    replay_buffer: BufferConfig = field(default_factory=BufferConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ref_model_replicas: int = 1
    # Several hosts (README "Several hosts"): a host pool, and which group each part runs on.
    hosts: dict[str, Any] | None = None  # forge.controller.HostsConfig, e.g. {source: process_job, groups: {gen: 1}}
    placement: dict[str, str] = field(default_factory=dict)  # part -> host group, e.g. {policy: gen, trainer: train}
    metrics: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard", "wandb"])

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares samples of one prompt), got {self.group_size}")
        if self.trainer.hosts < 1:
            raise ValueError(f"trainer.hosts must be >= 1, got {self.trainer.hosts}")
        if self.replay_buffer.batch_size % self.trainer.num_ranks:
            raise ValueError(
                f"replay_buffer.batch_size={self.replay_buffer.batch_size} must be divisible by trainer.procs * "
                f"trainer.hosts = {self.trainer.num_ranks} (each data-parallel rank trains on an equal share)")
        self._validate_placement()
        unknown = sorted(set(self.metrics) - {"console", "jsonl", "tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"metrics: unknown backend(s) {unknown}; use console, jsonl, tensorboard, wandb")

    def _validate_placement(self) -> None:
        from forge.controller import HostsConfig

        unknown = sorted(set(self.placement) - set(PARTS))
        if unknown:
            raise ValueError(f"placement: unknown part(s) {unknown}; parts are {list(PARTS)}")
        if self.trainer.hosts > 1 and "trainer" not in self.placement:
            raise ValueError(f"trainer.hosts={self.trainer.hosts} needs placement.trainer naming a host group")
        if self.hosts is None:
            if self.placement:
                raise ValueError("placement names host groups, but there is no hosts: section to define them")
            return
        sizes = HostsConfig.parse(self.hosts).host_counts()  # raises ValueError naming the bad field
        for part, group in self.placement.items():
            if group not in sizes:
                raise ValueError(f"placement.{part}: {group!r} is not a group of hosts.groups {sorted(sizes)}")
        trainer_group = self.placement.get("trainer")
        if trainer_group is not None and self.trainer.hosts > sizes[trainer_group]:
            raise ValueError(f"trainer.hosts={self.trainer.hosts} but group {trainer_group!r} has "
                             f"{sizes[trainer_group]} host(s)")

    def engine_config(self) -> dict[str, Any]:
        return {"model": self.model, **self.policy.engine}

    def sampling_config(self) -> dict[str, Any]:
        return {**self.policy.sampling, "n": self.group_size}

    def model_spec(self) -> dict[str, Any]:
        from forge.models import PRESETS

        if self.model in PRESETS:
            return {"name": "qwen3", "flavor": self.model}
        return {"name": "hf", "flavor": "custom", "hf_assets_path": self.model}
