"""The GRPO application's configuration: typed, validated before anything is spawned.

The job config nests each component's own config dataclass — ``EngineConfig`` and
``SamplingParams`` (forge.engine), the trainer's ``OptimizerConfig``, ``TrainingConfig``,
``LRSchedulerConfig`` (forge.actors.trainer), ``LossConfig`` (forge.losses),
``HostsConfig`` (forge.controller) — so one parser (``forge.util.config``) checks every
value at load and names its dotted path (``config.trainer.optimizer: optimizer lr must
be a number > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from forge.actors.replay_buffer import SAMPLING
from forge.actors.trainer import LRSchedulerConfig, OptimizerConfig, TrainingConfig
from forge.controller import HostsConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.losses import LossConfig
from forge.util.checks import check_bool, check_choice, check_int, check_positive, check_seconds


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
    # The policy as a Hugging Face directory: "final" (<run_dir>/final_model at the end),
    # "checkpoints" (also checkpoints/hf-<step> with each checkpoint) or "none".
    export: str = "final"
    rollout_tasks: int = 4  # concurrent rollout loops
    groups_per_rollout: int = 4  # prompts a rollout loop takes at a time: one message per part for all
    weight_update: str = "fanout"  # "fanout" or "rolling"
    # True: step k+1's sampling and train_step run while version k+1's weights travel to the
    # generators (the next push waits for that sync), so the sync leaves the training loop's
    # critical path; episodes may then be one version older, and the replay buffer's
    # max_policy_age still bounds that. False: every step waits for its sync.
    overlap_weight_sync: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "reward_window", "log_every", "rollout_tasks", "groups_per_rollout",
                     "keep_checkpoints"):
            check_int(f"run.{name}", getattr(self, name), 1)
        for name in ("eval_every", "checkpoint_every", "seed"):
            check_int(f"run.{name}", getattr(self, name), 0)
        check_seconds("run.max_time_s", self.max_time_s)
        if self.stall_timeout_s is not None:
            check_seconds("run.stall_timeout_s", self.stall_timeout_s)
        if self.target_reward is not None:
            check_positive("run.target_reward", self.target_reward)
        check_choice("run.weight_update", self.weight_update, ("fanout", "rolling"))
        check_bool("run.overlap_weight_sync", self.overlap_weight_sync)
        check_choice("run.export", self.export, ("final", "checkpoints", "none"))


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
    max_operand: int = 9  # arithmetic task: a+b= with operands in [min_operand, max_operand], sums <= max_sum
    max_sum: int = 9
    min_operand: int = 0

    def __post_init__(self) -> None:
        check_int("data.eval_size", self.eval_size, 1)
        check_int("data.max_operand", self.max_operand, 1)
        check_int("data.max_sum", self.max_sum, 1)
        check_int("data.min_operand", self.min_operand, 0)
        if self.min_operand > self.max_operand or 2 * self.min_operand > self.max_sum:
            raise ValueError(f"data: no a+b= prompt has operands in [{self.min_operand}, {self.max_operand}] and a "
                             f"sum <= {self.max_sum}; lower data.min_operand or raise data.max_operand/max_sum")


@dataclass
class PolicyConfig:
    num_replicas: int = 1
    procs: int = 1
    with_gpus: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)  # its model: the top-level model
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=3))

    def __post_init__(self) -> None:
        check_int("policy.num_replicas", self.num_replicas, 1)
        check_int("policy.procs", self.procs, 1)
        if self.sampling.n != 1:
            raise ValueError("policy.sampling.n is set by group_size; leave it out")


@dataclass
class TrainerConfig:
    procs: int = 1  # data-parallel ranks per host
    hosts: int = 1  # hosts the trainer spans (> 1 needs placement.trainer); ranks = procs * hosts
    with_gpus: bool = False
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(local_batch_size=128, seq_len=64))
    loss: LossConfig = field(default_factory=LossConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)

    def __post_init__(self) -> None:
        check_int("trainer.procs", self.procs, 1)
        check_int("trainer.hosts", self.hosts, 1)

    @property
    def num_ranks(self) -> int:
        return self.procs * self.hosts


@dataclass
class BufferConfig:
    batch_size: int = 128  # episodes per train step
    max_policy_age: int = 1
    max_buffer_size: int = 0
    max_resample: int = 1
    sampling: str = "random"  # or "freshest": the newest policy versions first (ReplayBuffer)
    # DAPO's dynamic sampling: a group whose rewards are all equal has advantage 0 everywhere;
    # drop it instead of letting it dilute the batch (and skip its reference forward). On the
    # default run (3 seeds each) it halved the steps to the target (86 vs 176 on average),
    # took about as long (87 vs 93 s) and ended with a higher greedy accuracy (0.96-0.98 vs
    # 0.93-0.95).
    drop_zero_variance_groups: bool = True

    def __post_init__(self) -> None:
        check_int("replay_buffer.batch_size", self.batch_size, 1)
        check_int("replay_buffer.max_policy_age", self.max_policy_age, 0)
        check_int("replay_buffer.max_buffer_size", self.max_buffer_size, 0)
        check_int("replay_buffer.max_resample", self.max_resample, 1)
        check_choice("replay_buffer.sampling", self.sampling, SAMPLING)


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
        check_int("reward.num_replicas", self.num_replicas, 1)


@dataclass
class EnvConfig:
    """A multi-turn environment (``forge.envs``) instead of one response per prompt scored by
    ``reward:``: each episode is a conversation of model turns and environment observations
    (tool results), rewarded by the environment; its observations carry no gradient."""

    factory: str | None = None  # "module:function" returning a new Environment per episode; None: one turn
    args: dict = field(default_factory=dict)  # keyword arguments of the factory
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 64  # response tokens per episode, the model's and the environment's together

    def __post_init__(self) -> None:
        check_int("env.max_turns", self.max_turns, 1)
        check_int("env.max_tokens", self.max_tokens, 1)
        if self.factory is not None:
            self.make()  # imports the factory and builds one environment: a bad name or args fail at load

    def make(self) -> Any:
        """A new environment."""
        import importlib
        import inspect

        from forge.envs import Environment

        module_name, _, attribute = str(self.factory).partition(":")
        if not module_name or not attribute:
            raise ValueError(f"env.factory must be 'module:function', e.g. 'apps.tool_use.env:make_env', "
                             f"got {self.factory!r}")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"env.factory {self.factory!r} cannot be imported: {e}") from None
        try:
            inspect.signature(factory).bind(**self.args)
        except TypeError as e:
            raise ValueError(f"env.args {self.args} do not fit env.factory {self.factory!r}: {e}") from None
        except ValueError:  # no signature to check (a builtin): the call below tells
            pass
        env = factory(**self.args)
        if not isinstance(env, Environment):
            raise ValueError(f"env.factory {self.factory!r} returned {type(env).__name__}, not a "
                             "forge.envs.Environment")
        return env


@dataclass
class ModelConfig:
    path: str = "tiny"  # preset, local HF directory, or hf://org/name in the local cache
    # float32 or bfloat16, for every part: the generator's weights, the reference model's, and
    # the trainer's forward and backward (its master weights and optimizer state stay fp32).
    dtype: str = "float32"
    # The code that runs it in the trainer, reference and native generator: "auto" (Forge's own
    # decoder for Llama/Qwen2/Qwen3, which spares each process transformers' import, else
    # transformers), "forge" or "transformers". Both compute the same logits.
    impl: str = "auto"

    def __post_init__(self) -> None:
        from forge.models.loading import MODEL_IMPLS

        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"model.path must be a preset name, a local directory or hf://org/name, got {self.path!r}")
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("model.impl", self.impl, MODEL_IMPLS)


# The parts of the GRPO app, as ``placement:`` and ``colocate:`` name them.
PARTS = ("dataloader", "policy", "trainer", "replay_buffer", "compute_advantages", "ref_model", "reward")
# Parts that may share a process with others (``colocate:``). The generator keeps its own (a
# service whose replicas are rebuilt); the trainer may host others only on one process.
COLOCATABLE = ("dataloader", "replay_buffer", "compute_advantages", "reward", "ref_model", "trainer")
LIGHT_PARTS = ["dataloader", "replay_buffer", "compute_advantages", "reward"]


@dataclass
class GRPOConfig:
    model: ModelConfig | str = field(default_factory=ModelConfig)  # a string: model.path, in float32
    group_size: int = 8
    scale_advantages_by_std: bool = True  # False: Dr. GRPO's (r - mean)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    replay_buffer: BufferConfig = field(default_factory=BufferConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # unused with env.factory (the environment rewards)
    env: EnvConfig = field(default_factory=EnvConfig)
    ref_model_replicas: int = 1
    # Several hosts (README "Several hosts"): a host pool, and which group each part runs on.
    hosts: HostsConfig | None = None  # e.g. {source: process_job, groups: {gen: 1}}
    placement: dict[str, str] = field(default_factory=dict)  # part -> host group, e.g. {policy: gen, trainer: train}
    metrics: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard", "wandb"])
    # Groups of parts that share one process each, as actors (a co-located reward or
    # reference model is one actor, not a service of replicas). [] gives every part its own
    # processes, as a large run wants. Unset (auto): the light parts share one process and a
    # one-process trainer hosts the reference model, which is fastest on a small machine
    # (bench/grpo_overhead.py); parts with replicas or on other host groups keep their own.
    colocate: list[list[str]] | None = None  # resolved (auto worked out) in colocate_groups

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares samples of one prompt), got {self.group_size}")
        check_int("ref_model_replicas", self.ref_model_replicas, 1)
        if isinstance(self.model, str):
            self.model = ModelConfig(path=self.model)
        self._tie_engine_to_model()
        self._tie_temperatures()
        if self.replay_buffer.batch_size % self.trainer.num_ranks:
            raise ValueError(
                f"replay_buffer.batch_size={self.replay_buffer.batch_size} must be divisible by trainer.procs * "
                f"trainer.hosts = {self.trainer.num_ranks} (each data-parallel rank trains on an equal share)")
        share, local = self.replay_buffer.batch_size // self.trainer.num_ranks, self.trainer.training.local_batch_size
        if share > local:
            raise ValueError(
                f"each trainer rank gets replay_buffer.batch_size / ranks = {share} sequences but "
                f"trainer.training.local_batch_size={local}; raise local_batch_size to {share} (set "
                "trainer.training.max_tokens_per_microbatch to bound memory) or lower the batch size")
        if self.env.factory is not None and self.env.max_tokens >= self.policy.engine.max_model_len:
            raise ValueError(f"env.max_tokens={self.env.max_tokens} leaves no room for a prompt in "
                             f"policy.engine.max_model_len={self.policy.engine.max_model_len}; raise max_model_len "
                             "or lower env.max_tokens")
        self._validate_placement()
        self._validate_colocate()
        unknown = sorted(set(self.metrics) - {"console", "jsonl", "tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"metrics: unknown backend(s) {unknown}; use console, jsonl, tensorboard, wandb")

    def _tie_engine_to_model(self) -> None:
        """The generator serves ``model.path`` in ``model.dtype``: set once, at the top."""
        engine, model = self.policy.engine, self.model
        if engine.model not in (EngineConfig.model, model.path):
            raise ValueError(f"policy.engine.model={engine.model!r} differs from model.path={model.path!r}; "
                             "set the model once, with model.path")
        if engine.dtype not in (EngineConfig.dtype, model.dtype):
            raise ValueError(f"policy.engine.dtype={engine.dtype!r} differs from model.dtype={model.dtype!r}; the "
                             "generator, reference and trainer compute in one dtype: set it once, with model.dtype")
        if engine.model_impl not in (EngineConfig.model_impl, model.impl):
            raise ValueError(f"policy.engine.model_impl={engine.model_impl!r} differs from model.impl={model.impl!r}; "
                             "set it once, with model.impl")
        self.policy.engine = dataclasses.replace(engine, model=model.path, dtype=model.dtype, model_impl=model.impl)

    def _tie_temperatures(self) -> None:
        """One temperature: the sampling one, used by the loss and the reference model; and
        dr_grpo's constant, the generation budget."""
        sampling, loss = self.policy.sampling, self.trainer.loss
        if sampling.temperature <= 0:
            raise ValueError(f"policy.sampling.temperature must be > 0 for training, got {sampling.temperature}: "
                             "GRPO learns from sampled responses (evaluation is greedy on its own)")
        if loss.temperature not in (LossConfig.temperature, sampling.temperature):
            raise ValueError(
                f"trainer.loss.temperature={loss.temperature} differs from policy.sampling.temperature="
                f"{sampling.temperature}: the trainer and the reference model must score tokens at the temperature "
                "they were sampled at; leave trainer.loss.temperature out (it follows the sampling one)")
        budget = self.env.max_tokens if self.env.factory is not None else sampling.max_tokens  # an episode's
        max_tokens = loss.max_tokens or (budget if loss.normalization == "dr_grpo" else 0)
        self.trainer.loss = dataclasses.replace(loss, temperature=sampling.temperature, max_tokens=max_tokens)

    @property
    def uses_reference(self) -> bool:
        """Whether the run needs a reference model (a KL term: beta > 0)."""
        return self.trainer.loss.beta > 0

    def _validate_placement(self) -> None:
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

    @property
    def uses_reward_actor(self) -> bool:
        """Whether the run scores responses with ``reward:`` (not with an environment's reward)."""
        return self.env.factory is None

    def _auto_colocate(self) -> list[list[str]]:
        light = [p for p in LIGHT_PARTS if p != "reward" or (self.reward.num_replicas == 1 and self.uses_reward_actor)]
        light = [p for p in light if self.placement.get(p) == self.placement.get(light[0])]
        groups = [light]
        if (self.uses_reference and self.trainer.num_ranks == 1 and self.ref_model_replicas == 1
                and self.placement.get("ref_model") == self.placement.get("trainer")):
            groups.append(["trainer", "ref_model"])
        return [g for g in groups if len(g) > 1]

    def _validate_colocate(self) -> None:
        """Check ``colocate`` and set ``colocate_groups``: the groups as run. An unset
        ``colocate`` stays unset (it is saved so in the run's config.yaml), so a resume with
        other settings works it out again."""
        if self.colocate is None:
            self.colocate_groups = self._auto_colocate()
            return
        if not isinstance(self.colocate, list) or not all(isinstance(g, list) for g in self.colocate):
            raise ValueError(f"colocate must be a list of lists of parts, e.g. [{LIGHT_PARTS}], got {self.colocate!r}")
        seen: set[str] = set()
        groups = []
        for group in self.colocate:
            if not self.uses_reference:
                group = [part for part in group if part != "ref_model"]  # beta=0: there is no reference model
            if not self.uses_reward_actor:
                group = [part for part in group if part != "reward"]  # the environment rewards
            if len(set(group)) != len(group):
                raise ValueError(f"colocate: {group} lists a part twice")
            for part in group:
                if part not in COLOCATABLE:
                    why = ("it is not a part" if part not in PARTS else
                           "it keeps its own processes (replicas, GPUs, data-parallel ranks)")
                    raise ValueError(f"colocate: {part!r} cannot share a process: {why}; parts that can are "
                                     f"{list(COLOCATABLE)}")
                if part in seen:
                    raise ValueError(f"colocate: {part!r} is in more than one group")
                seen.add(part)
            if "trainer" in group and self.trainer.num_ranks > 1:
                raise ValueError(f"colocate: the trainer has {self.trainer.num_ranks} data-parallel ranks "
                                 "(trainer.procs * trainer.hosts); only a one-process trainer shares its process")
            replicas = {"reward": self.reward.num_replicas, "ref_model": self.ref_model_replicas}
            for part in set(group) & set(replicas):
                if replicas[part] > 1:
                    name = "reward.num_replicas" if part == "reward" else "ref_model_replicas"
                    raise ValueError(f"colocate: {part} has {name}={replicas[part]}, but a co-located part is one "
                                     f"actor; set {name}=1 or take {part} out of colocate")
            host_groups = {self.placement.get(part) for part in group}
            if len(host_groups) > 1:
                raise ValueError(f"colocate: {group} share one process, but placement puts them on different host "
                                 f"groups {sorted(map(str, host_groups))}; place them on one group")
            on_gpus = sorted(part for part in group if self._with_gpus(part))
            if on_gpus and len(on_gpus) < len(group):
                raise ValueError(f"colocate: {group} share one process, but only {on_gpus} run with GPUs "
                                 "(trainer.with_gpus); put GPU and CPU parts in different groups")
            groups.append(group)
        self.colocate_groups = [g for g in groups if len(g) > 1]  # one part alone shares nothing

    def _with_gpus(self, part: str) -> bool:
        """Whether ``part`` runs with GPUs (the reference model follows the trainer)."""
        return part in ("trainer", "ref_model") and self.trainer.with_gpus

    def engine_config(self) -> EngineConfig:
        return self.policy.engine

    def sampling_config(self) -> SamplingParams:
        return dataclasses.replace(self.policy.sampling, n=self.group_size)

    def model_spec(self) -> dict[str, str]:
        from forge.models import PRESETS

        if self.model.path in PRESETS:
            return {"name": "qwen3", "flavor": self.model.path, "dtype": self.model.dtype, "impl": self.model.impl}
        return {"name": "hf", "flavor": "custom", "hf_assets_path": self.model.path, "dtype": self.model.dtype,
                "impl": self.model.impl}
