"""GRPO on Forge: every part of the RL loop is a service or an actor, in processes apart from the loop.

    python -m apps.grpo.main                                    # the embedded default (CPU)
    python -m apps.grpo.main --config apps/grpo/default.yaml policy.num_replicas=2
    python -m apps.grpo.main --resume runs/grpo-tiny-20261125-220000
    python -m apps.grpo.main 'hosts={source: process_job, groups: {gen: 1, train: 1}}' \
        'placement={policy: gen, trainer: train}'                # parts on other hosts

The loop's concurrent tasks and what each waits on:

    rollout task x N  (run.rollout_tasks)               training task (one)
    ─────────────────────────────────────               ───────────────────────────────────────────
    k = run.groups_per_rollout prompts at a time,       replay_buffer.sample(version) ── None? wait
    one message per part for all k:                       → trainer.train_step.call     (RLTrainer)
    dataloader.sample_batch(k)   (DatasetActor)           → wait for the previous version's sync
      → policy.generate_batch.route (Policy, k x n)       → trainer.push_weights.call   (shared memory)
      → reward.evaluate_groups.route                      → policy.update_weights.fanout/rolling in the
      → ref_model.forward.route  (one per prompt length)    background (run.overlap_weight_sync; awaited
        and compute_advantages.compute_batch, together      before an eval, a checkpoint, the end)
      → replay_buffer.add(all kept episodes)              → log the step; every run.log_every steps
                                                            drain every part's metrics; eval, checkpoint

    watchdog: every 0.5 s checks that the singleton actors' processes are alive; a dead
    one stops the run with an error naming it (service replicas are rebuilt instead).

Placement: the generator (a service of replicas) has its own processes; by default
(``colocate:``) the light parts (dataloader, replay buffer, advantages, reward) share one
process and a one-process trainer hosts the reference model, which on a small machine
saves a process per part and its startup (torch imported once per process);
``colocate=[]`` gives each part its own, as a large run wants.

Staleness is bounded by ``replay_buffer.max_policy_age``: an episode from version p is
trained on at version v only while v - p <= max_policy_age. Checkpoints are taken at a
quiescent point (rollouts paused and drained into the buffer), so ``--resume`` continues
exactly: trainer (model, optimizer, scheduler, RNG), buffer, data position, version.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import random
import sys
import time
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from apps.grpo.actors import (  # noqa: F401  (the seeds import these from apps.grpo.main)
    REWARD_FUNCTIONS,
    ComputeAdvantages,
    DatasetActor,
    Episode,
    Group,
    RewardActor,
    group_advantages,
)
from apps.grpo.config import GRPOConfig
from forge.actors.policy import Policy
from forge.actors.reference_model import ReferenceModel
from forge.actors.replay_buffer import ReplayBuffer, write_sampled_ids_json
from forge.actors.trainer import RLTrainer, prune_checkpoints, save_atomically
from forge.controller import (
    ForgeActor,
    HostRegistryLost,
    ProcGroup,
    ServiceHandle,
    actor_alive,
    actor_answers,
    actor_pids,
    current_pool,
    drain_metrics,
    init_hosts,
    is_infrastructure_error,
)
from forge.data.rewards import MathReward
from forge.envs import EpisodeError, run_group
from forge.envs.rollout import stop_token_ids
from forge.observability import drain_local_metrics, merge_metrics, record_metric
from forge.observability.logger import RunLogger, plot_curves
from forge.observability.reward_window import RewardWindow
from forge.util.config import load_config, to_dict
from forge.util.tmpdirs import private_tmpdir
from forge.util.tasks import await_chain

logger = logging.getLogger("forge.grpo")
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
MAX_ENV_FAILURES = 20  # groups in a row whose environment failed: the run stops
SAMPLES_LOGGED = 3  # recent conversations written to the logs every log_every steps
PING_TIMEOUT_S = 2.0  # the stall report's probe of each process


class ActorDied(RuntimeError):
    """A singleton actor of the run died; the run cannot go on."""


class RunStalled(RuntimeError):
    """No training step finished within ``run.stall_timeout_s``; the message says where each loop waits."""


@dataclasses.dataclass
class Services:
    dataloader: Any
    policy: Any
    trainer: Any
    replay_buffer: Any
    compute_advantages: Any
    ref_model: Any  # None without a KL term (beta=0)
    reward: Any  # None with an environment (env.factory), which gives the rewards
    groups: list[Any] = dataclasses.field(default_factory=list)  # the ProcGroups of colocate:

    def parts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "groups" and getattr(self, f.name) is not None}

    def singletons(self) -> dict[str, Any]:
        """Parts that are one actor (no replicas to rebuild): their death ends the run."""
        return {name: part for name, part in self.parts().items() if not isinstance(part, ServiceHandle)}

    def services(self) -> dict[str, Any]:
        return {name: part for name, part in self.parts().items() if isinstance(part, ServiceHandle)}

    def processes(self) -> dict[str, Any]:
        """One singleton per set of processes, named by the parts that share it (``colocate:``
        puts several in one): "trainer+ref_model" -> one of its actors."""
        names: dict[tuple[int, ...], list[str]] = {}
        chosen: dict[tuple[int, ...], Any] = {}
        for name, actor in self.singletons().items():
            pids = actor_pids(actor)
            names.setdefault(pids, []).append(name)
            chosen.setdefault(pids, actor)
        return {"+".join(names[pids]): actor for pids, actor in chosen.items()}


async def start_services(cfg: GRPOConfig, store: str) -> Services:
    """Spawn everything concurrently: each part in its own processes, except the groups of
    ``colocate:``, whose parts share one process as actors."""
    data = cfg.data
    reward_fns = [REWARD_FUNCTIONS[name]() for name in cfg.reward.functions]
    groups = [ProcGroup("+".join(names)) for names in cfg.colocate_groups]
    group_of = {part: group for names, group in zip(cfg.colocate_groups, groups) for part in names}

    def on(part: str) -> dict[str, Any]:  # its host group (placement:) and shared processes (colocate:)
        where = {"host_group": cfg.placement[part]} if part in cfg.placement else {}
        return {**where, "on": group_of[part]} if part in group_of else where

    reward = RewardActor.options(procs=1, **on("reward"), **(
        {} if "reward" in group_of else {"num_replicas": cfg.reward.num_replicas}))
    reward_args = {"reward_functions": reward_fns, "weights": cfg.reward.weights}
    ref = ReferenceModel.options(procs=1, with_gpus=cfg.trainer.with_gpus, **on("ref_model"), **(
        {} if "ref_model" in group_of else {"num_replicas": cfg.ref_model_replicas}))
    ref_args = {"model": cfg.model_spec(), "temperature": cfg.policy.sampling.temperature}
    started = await asyncio.gather(
        DatasetActor.options(procs=1, **on("dataloader")).as_actor(
            path=data.source, data_split=data.split, model=cfg.model.path, question_field=data.question_field,
            answer_field=data.answer_field, seed=cfg.run.seed, use_chat_template=data.use_chat_template,
            system_prompt=data.system_prompt, max_operand=data.max_operand, max_sum=data.max_sum,
            eval_split=data.eval_split, min_operand=data.min_operand),
        Policy.options(procs=cfg.policy.procs, with_gpus=cfg.policy.with_gpus,
                       num_replicas=cfg.policy.num_replicas, **on("policy")).as_service(
            engine_config=cfg.engine_config(), sampling_config=cfg.sampling_config(), weight_store=store),
        RLTrainer.options(procs=cfg.trainer.procs, with_gpus=cfg.trainer.with_gpus,
                          **on("trainer"), **({"hosts": cfg.trainer.hosts} if cfg.trainer.hosts > 1 else {})).as_actor(
            model=cfg.model_spec(), optimizer=cfg.trainer.optimizer, training=cfg.trainer.training,
            loss=cfg.trainer.loss, lr_scheduler=cfg.trainer.lr_scheduler, weight_store=store,
            checkpoint={"folder": None}),
        ReplayBuffer.options(procs=1, **on("replay_buffer")).as_actor(
            batch_size=cfg.replay_buffer.batch_size, max_policy_age=cfg.replay_buffer.max_policy_age,
            dp_size=cfg.trainer.num_ranks, max_buffer_size=cfg.replay_buffer.max_buffer_size,
            max_resample=cfg.replay_buffer.max_resample, seed=cfg.run.seed, sampling=cfg.replay_buffer.sampling),
        ComputeAdvantages.options(procs=1, **on("compute_advantages")).as_actor(scale_by_std=cfg.scale_advantages_by_std),
        (ref.as_actor(**ref_args) if "ref_model" in group_of else ref.as_service(**ref_args))
        if cfg.uses_reference else _nothing(),
        (reward.as_actor(**reward_args) if "reward" in group_of else reward.as_service(**reward_args))
        if cfg.uses_reward_actor else _nothing(),
        return_exceptions=True,
    )
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:  # stop the parts that did start before reporting the first failure
        try:
            await _stop_parts([r for r in started if not isinstance(r, BaseException)])
        finally:
            await _stop_groups(groups)
        raise failed[0]
    return Services(*started, groups=groups)


async def _stop_groups(groups: list[Any]) -> None:
    """Stop shared processes whatever still holds them (their parts are stopped first)."""
    for group in groups:
        try:
            await asyncio.wait_for(group.stop(), 15)
        except Exception as e:  # noqa: BLE001  (reported, the next one is still stopped)
            logger.info("shutdown of %s: %s", group, e)


async def _nothing() -> None:
    return None


async def stop_services(services: Services | None) -> None:
    if services is not None:
        try:
            await _stop_parts(list(services.parts().values()))
        finally:
            await _stop_groups(services.groups)


async def _stop_parts(parts: list[Any]) -> None:
    """Shut services and actors down concurrently, each bounded; failures are logged."""
    stops = [ForgeActor.shutdown(p) for p in parts if p is not None]  # a service handle or an actor
    results = await asyncio.gather(*(asyncio.wait_for(s, 15) for s in stops), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            logger.info("shutdown: %s", result)


class GRPORun:
    """State and tasks of one run (see the module docstring)."""

    def __init__(self, cfg: GRPOConfig, run_dir: Path, services: Services, pad_id: int,
                 eval_rows: list[dict[str, Any]], tokenizer: Any = None) -> None:
        self.cfg, self.run_dir, self.s = cfg, run_dir, services
        self.pad_id = pad_id  # fills a group's shorter responses (masked out)
        self.tokenizer = tokenizer  # for an environment's conversations (env.factory)
        self.env_failures = 0  # groups in a row whose environment failed
        self.eval_rows = eval_rows  # held-out prompts for evaluation (empty: no evaluation)
        self.version = 0
        self.step = 0
        self.rewards = RewardWindow(cfg.run.reward_window)  # last per-step mean rewards, for the stop criterion
        self.gate = asyncio.Event()  # set: rollouts may start new groups
        self.gate.set()
        self.in_flight = 0  # groups being made now
        self.landed = asyncio.Event()  # set whenever in_flight drops to 0
        self.stopping = False
        self.step_rewards: list[float] = []  # rewards of the groups made since the last step
        self.added = asyncio.Event()  # set when a rollout task added episodes to the buffer
        self.tokens_generated = 0
        self.episodes_generated = 0  # every sampled episode, those of dropped groups too
        self.generate_seconds = 0.0
        self.math = MathReward()
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=SAMPLES_LOGGED)  # for the logs
        self.weight_sync: asyncio.Task | None = None  # the generators loading the latest version (owned here)
        self.last_sync_s = 0.0
        self.loops: dict[str, asyncio.Task] = {}  # name -> task, for the stall report
        self.progress: dict[str, float] = {}  # loop name -> when it last finished a step or a group

    # ---- rollouts ----------------------------------------------------------------

    async def rollout_loop(self, index: int = 0) -> None:
        """Make ``run.groups_per_rollout`` groups at a time into the replay buffer, until stopped."""
        s, count = self.s, self.cfg.run.groups_per_rollout
        while not self.stopping:
            await self.gate.wait()
            if self.stopping:
                return
            self.in_flight += 1
            try:
                samples = await s.dataloader.sample_batch.call_one(count)
                groups = await self.make_groups(samples)
                if groups:
                    await s.replay_buffer.add.call_one([e for g in groups for e in g.episodes])
                    self.added.set()
                self.progress[f"rollout loop {index}"] = time.monotonic()
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self.landed.set()

    def sampling_seed(self, sample: dict[str, Any]) -> int:
        """Each group's own sampling seed, from the run's seed and the prompt's place in the data:
        its samples do not depend on what else the generator decodes with it (the batch size,
        other rollout tasks, which replica), only on the weights."""
        return zlib.crc32(f"{self.cfg.run.seed}/{sample['epoch']}/{sample['index']}".encode())

    async def make_groups(self, samples: list[dict[str, Any]]) -> list[Group]:
        """Groups of ``group_size`` episodes for ``samples`` (prompts from the dataloader), with
        one message per part for all of them: generate, reward, reference, advantages. With
        ``replay_buffer.drop_zero_variance_groups`` a group whose rewards are all equal is left
        out (its rewards still count for the reward metrics and the stop criterion)."""
        s = self.s
        started = time.monotonic()
        if self.cfg.env.factory is None:
            completions = await s.policy.generate_batch.route(
                [x["request"] for x in samples], sampling_config=[{"seed": self.sampling_seed(x)} for x in samples])
            self.generate_seconds += time.monotonic() - started
            rewards = await s.reward.evaluate_groups.route(
                prompts=[x["question"] for x in samples], responses=[[c.text for c in group] for group in completions],
                targets=[x["target"] for x in samples])
        else:
            made = await asyncio.gather(*(self.episodes(x) for x in samples))
            self.generate_seconds += time.monotonic() - started
            samples = [x for x, group in zip(samples, made) if group is not None]  # a failed environment's left out
            completions = [group for group in made if group is not None]
            rewards = [[r.reward for r in group] for group in completions]
        self.tokens_generated += sum(policy_tokens(c) for group in completions for c in group)
        self.episodes_generated += sum(len(group) for group in completions)
        for sample, group, scores in zip(samples[:1], completions, rewards):  # one conversation per batch
            self.samples.append(conversation_sample(sample, group[0], scores[0]))
        kept = []
        for sample, group, scores in zip(samples, completions, rewards):
            self.step_rewards += scores  # every group's, a dropped one's too: the stop criterion reads them
            record_metric("reward/max", max(scores), "max")
            record_metric("rollout/groups", 1, "sum")
            uniform = len(set(scores)) == 1
            record_metric("rollout/zero_variance_groups", float(uniform), "mean")
            if not (uniform and self.cfg.replay_buffer.drop_zero_variance_groups):
                kept.append((sample, group, scores))  # else advantage 0 everywhere: only a diluted batch
        if not kept:
            return []
        groups = [self.new_group(*part) for part in kept]
        # the advantages need the rewards only: they are worked out while the reference model scores
        advantages, ref_logprobs = await asyncio.gather(s.compute_advantages.compute_batch.call_one(groups),
                                                        self.reference_logprobs([group for _, group, _ in kept]))
        for group, values, ref in zip(groups, advantages, ref_logprobs):
            ref_rows = None if ref is None else ref.tolist()  # [G][width], right-padded
            for i, (episode, advantage) in enumerate(zip(group.episodes, values)):
                episode.advantage = float(advantage)
                episode.ref_logprobs = None if ref_rows is None else ref_rows[i][: len(episode.response_tokens)]
        record_metric("rollout/groups_kept", len(groups), "sum")
        return groups

    async def episodes(self, sample: dict[str, Any], greedy: bool = False) -> list[Any]:
        """``group_size`` episodes of the environment on one prompt (one, greedy, to evaluate),
        each its own conversation in a session of the policy; their rollout metrics recorded."""
        cfg, env = self.cfg, self.cfg.env
        sampling = {"max_tokens": cfg.policy.sampling.max_tokens, "stop_token_ids": cfg.policy.sampling.stop_token_ids,
                    **({"temperature": 0} if greedy else {})}
        try:
            rollouts = await run_group(self.s.policy, env.make, sample, self.tokenizer, 1 if greedy else cfg.group_size,
                                       seed=None if greedy else self.sampling_seed(sample), max_turns=env.max_turns,
                                       max_tokens=env.max_tokens, sampling_config=sampling,
                                       max_context=cfg.policy.engine.max_model_len)
            if len({tuple(r.prompt_ids.tolist()) for r in rollouts}) > 1:
                raise EpisodeError(f"{env.factory}: the environments of one row began with different prompts; GRPO "
                                   "compares the episodes of one prompt, so reset(row) must depend on the row only")
        except EpisodeError as e:
            return self.environment_failed(e, greedy)
        self.env_failures = 0
        if not greedy:
            for rollout in rollouts:
                mask = rollout.loss_mask
                record_metric("rollout/turns", float(rollout.num_turns), "mean")
                record_metric("rollout/policy_tokens", float(mask.sum()), "mean")
                record_metric("rollout/env_tokens", float(len(mask) - mask.sum()), "mean")
                record_metric("rollout/finished", float(rollout.finish_reason == "done"), "mean")
                for name, value in rollout.info.items():
                    record_metric(f"env/{name}", value, "mean")
        return rollouts

    def environment_failed(self, error: EpisodeError, greedy: bool) -> list[Any] | None:
        """A group whose environment failed is left out (a greedy one scores 0), and the run
        goes on — unless ``MAX_ENV_FAILURES`` groups in a row failed: then the environment
        is broken, not unlucky, and the run stops with its error."""
        self.env_failures += 1
        record_metric("env/failed_groups", 1, "sum")
        logger.warning("a group was left out: %s", error)
        if self.env_failures >= MAX_ENV_FAILURES:
            raise RuntimeError(f"the environment failed {self.env_failures} groups in a row; the last: {error}") from error
        return [] if greedy else None

    async def reference_logprobs(self, groups: list[list[Any]]) -> list[torch.Tensor | None]:
        """The reference model's logprobs of each group's responses (``[G, T]`` per group), one
        forward per prompt length (rows are prompt, then response, right-padded); all None
        without a reference model."""
        if self.s.ref_model is None:
            return [None] * len(groups)
        by_length: dict[int, list[int]] = {}
        for i, group in enumerate(groups):
            by_length.setdefault(len(group[0].prompt_ids), []).append(i)

        async def score(indices: list[int]) -> list[torch.Tensor]:
            rows = [c for i in indices for c in groups[i]]
            responses = torch.nn.utils.rnn.pad_sequence([c.token_ids for c in rows], batch_first=True,
                                                        padding_value=self.pad_id)
            tokens = torch.cat([torch.stack([c.prompt_ids for c in rows]), responses], dim=1)
            logprobs = await self.s.ref_model.forward.route(tokens, max_req_tokens=len(rows[0].prompt_ids),
                                                            return_logprobs=True)
            return list(logprobs.split([len(groups[i]) for i in indices]))

        buckets = list(by_length.values())
        scored = await asyncio.gather(*(score(indices) for indices in buckets))
        result: list[torch.Tensor | None] = [None] * len(groups)
        for indices, parts in zip(buckets, scored):
            for i, part in zip(indices, parts):
                result[i] = part
        return result

    def new_group(self, sample: dict[str, Any], completions: list[Any], rewards: list[float]) -> Group:
        """The group's episodes, rewarded; their advantages and reference logprobs come after."""
        prompt_ids = completions[0].prompt_ids
        width = max(len(c.token_ids) for c in completions)
        group = Group.new_group(f"{sample['epoch']}-{sample['index']}", len(completions), sample["request"],
                                min(c.generator_version for c in completions), self.pad_id, len(prompt_ids),
                                width, sample["target"])
        request_tokens = prompt_ids.tolist()
        for episode, completion, reward in zip(group.episodes, completions, rewards):
            episode.policy_version = completion.generator_version
            episode.response = completion.text
            episode.request_tokens = list(request_tokens)
            episode.response_tokens = completion.token_ids.tolist()
            episode.response_logprobs = completion.logprobs.tolist()
            mask = getattr(completion, "loss_mask", None)  # a multi-turn rollout: its environment tokens are 0
            episode.response_mask = None if mask is None else mask.tolist()
            episode.reward = float(reward)
        return group

    # ---- training ----------------------------------------------------------------

    async def train_loop(self, log: RunLogger, deadline: float) -> str:
        """Train until the target, ``max_steps`` or the time limit; returns why it stopped.

        Every step logs what the client knows without a message (its rewards, loss, times);
        every ``log_every`` steps, at checkpoints and at the last step, the metrics of every part are drained
        and logged with it: each drain holds everything recorded since the previous one.
        The generators hold the last version when it returns (its sync is awaited).
        """
        try:
            reason = await self.train_steps(log, deadline)
            await self.finish_weight_sync()
            return reason
        finally:
            if self.weight_sync is not None:  # the loop failed or was cancelled mid-sync
                self.weight_sync.cancel()
                (outcome,) = await asyncio.gather(self.weight_sync, return_exceptions=True)
                if isinstance(outcome, Exception):  # it failed before the loop's own error: say so too
                    logger.warning("the weight sync of version %d also failed: %r", self.version, outcome)
                self.weight_sync = None

    async def train_steps(self, log: RunLogger, deadline: float) -> str:
        s, cfg = self.s, self.cfg
        reason = None
        while reason is None:
            if self.step >= cfg.run.max_steps:
                return f"max_steps={cfg.run.max_steps} reached"
            if time.monotonic() > deadline:
                return f"time limit of {cfg.run.max_time_s:.0f} s reached"
            step_started = time.monotonic()
            batch = await self.next_batch()
            inputs, targets = batch
            loss = await s.trainer.train_step.call(inputs, targets)
            sync_waited = await self.finish_weight_sync()  # the previous version's, before the next push
            self.version += 1
            await s.trainer.push_weights.call(policy_version=self.version)
            self.weight_sync = asyncio.create_task(self.sync_generators(self.version))
            if not cfg.run.overlap_weight_sync:
                sync_waited += await self.finish_weight_sync()
            self.step += 1
            self.progress["training loop"] = time.monotonic()
            metrics = {"trainer/loss_reported": float(next(iter(loss.values()))),
                       # the last finished sync's length, and what this step waited for syncs
                       "time/weight_sync_s": self.last_sync_s, "time/weight_sync_wait_s": sync_waited,
                       "time/step_s": time.monotonic() - step_started, "policy/version": self.version}
            if self.step_rewards:  # the groups made since the last step
                metrics["reward/mean"] = sum(self.step_rewards) / len(self.step_rewards)
                self.rewards.append(metrics["reward/mean"])
                self.step_rewards = []
            reason = self.stop_reason(deadline)
            checkpoint = cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0
            if reason is not None or checkpoint or self.step % cfg.run.log_every == 0:
                # also at a checkpoint: a resume from it must not miss what was recorded before
                metrics = {**await self.collect_metrics(), **metrics}
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
                await self.finish_weight_sync()  # evaluate the weights of this step
                metrics["eval/accuracy"] = await self.evaluate()
            log.log(self.step, metrics)
            if self.step % cfg.run.log_every == 0 and self.samples:
                log.log_samples(self.step, list(self.samples))
            self.progress["training loop"] = time.monotonic()
            if checkpoint:
                await self.checkpoint()
        return reason

    async def sync_generators(self, version: int) -> None:
        """Load version ``version`` (already pushed) into every generator replica."""
        started = time.monotonic()
        s = self.s
        if self.cfg.run.weight_update == "rolling":
            await s.policy.update_weights.rolling(policy_version=version, source=s.trainer)
        else:
            await s.policy.update_weights.fanout(policy_version=version, source=s.trainer)
        self.last_sync_s = time.monotonic() - started

    async def finish_weight_sync(self) -> float:
        """Wait for the weight sync in flight, if any (its error is raised here); the seconds waited."""
        sync, self.weight_sync = self.weight_sync, None
        if sync is None:
            return 0.0
        started = time.monotonic()
        await sync
        return time.monotonic() - started

    async def next_batch(self) -> Any:
        """The replay buffer's next batch for the current version. With too few fresh episodes
        it asks again when a rollout task has added some (not on a timer: every ask is a
        message, and the CPU it costs is the generators')."""
        while True:
            self.added.clear()
            batch = await self.s.replay_buffer.sample.call_one(curr_policy_version=self.version)
            if batch is not None:
                return batch
            try:
                await asyncio.wait_for(self.added.wait(), 1.0)  # bounded: e.g. a restored buffer
            except asyncio.TimeoutError:
                pass

    def stop_reason(self, deadline: float) -> str | None:
        """Why the run stops after this step (the target, max_steps or the time limit), or None."""
        cfg = self.cfg
        window = self.rewards[-cfg.run.reward_window:]
        if (cfg.run.target_reward is not None and len(window) == cfg.run.reward_window
                and sum(window) / len(window) >= cfg.run.target_reward):
            return f"mean reward {sum(window) / len(window):.3f} over the last {len(window)} steps reached the target"
        if self.step >= cfg.run.max_steps:
            return f"max_steps={cfg.run.max_steps} reached"
        if time.monotonic() > deadline:
            return f"time limit of {cfg.run.max_time_s:.0f} s reached"
        return None

    async def collect_metrics(self) -> dict[str, float]:
        """Drain the record_metric accumulators of every process (one actor per process) and
        reduce them: everything recorded since the previous drain."""
        s = self.s
        # The trainer on a line of its own, so a stall report names a hung trainer. A service
        # replica lost during the drain only leaves its metrics of this step out.
        trainer_drained = await drain_metrics(s.trainer)
        others = [actor for names, actor in s.processes().items() if "trainer" not in names.split("+")]
        results = await asyncio.gather(
            *(drain_metrics(part) for part in [*others, *s.services().values()]),
            s.policy.statistics(),
        )
        parts = [drain_local_metrics(), *trainer_drained]
        for drained in results[:-1]:
            parts += drained
        merged = merge_metrics(parts)
        stats = results[-1]
        merged["policy/healthy_replicas"] = float(stats.num_healthy)
        merged["policy/restarts"] = float(sum(r.num_restarts for r in stats.replicas))
        if self.generate_seconds:
            merged["generate/tokens_per_s"] = self.tokens_generated / self.generate_seconds
        self.tokens_generated, self.generate_seconds = 0, 0.0
        return merged

    async def evaluate(self) -> float:
        """Greedy accuracy on the evaluation prompts."""
        rows = self.eval_rows
        if self.cfg.env.factory is not None:  # solved: a greedy episode with full reward
            episodes = await asyncio.gather(*(self.episodes(row, greedy=True) for row in rows))
            return sum(bool(group) and group[0].reward >= 1.0 for group in episodes) / len(episodes)
        answers = await asyncio.gather(*(
            self.s.policy.generate.route(row["request"], sampling_config={"n": 1, "temperature": 0})
            for row in rows))
        scores = [self.math(row["question"], a[0].text, row["target"]) for row, a in zip(rows, answers)]
        return sum(scores) / len(scores)

    async def final_evaluation(self) -> float:
        """``evaluate`` after the loops have stopped, bounded like a step (no watchdog runs then)."""
        stall_s = self.cfg.run.stall_timeout_s
        try:
            return await asyncio.wait_for(self.evaluate(), stall_s)
        except asyncio.TimeoutError:
            raise RunStalled(f"the final evaluation did not finish in {stall_s:.0f} s (run.stall_timeout_s)") from None

    # ---- checkpoints ---------------------------------------------------------------

    async def quiesce(self, timeout_s: float = 120.0) -> None:
        """Stop rollouts from starting groups and wait for the ones in flight to land; a
        group still in flight after ``timeout_s`` is an error (a checkpoint taken then would
        miss it)."""
        self.gate.clear()

        async def all_landed() -> None:
            while self.in_flight:
                self.landed.clear()
                await self.landed.wait()

        try:
            await asyncio.wait_for(all_landed(), timeout_s)
        except asyncio.TimeoutError:
            raise RunStalled(f"{self.in_flight} rollout batch(es) of up to {self.cfg.run.groups_per_rollout} groups were "
                             f"still in flight {timeout_s:.0f} s after a checkpoint stopped new ones") from None

    async def checkpoint(self) -> None:
        await self.finish_weight_sync()  # the generators hold the checkpoint's version
        await self.quiesce()
        try:
            folder = self.run_dir / "checkpoints"
            trainer_path = folder / f"trainer-{self.step:08d}"
            await self.s.trainer.save_checkpoint_to.call(str(trainer_path))
            state = {
                "step": self.step, "version": self.version, "rewards": self.rewards.state_dict(),
                "buffer": await self.s.replay_buffer.state_dict.call_one(),
                "data": await self.s.dataloader.state_dict.call_one(),
                "trainer": str(trainer_path.name),
            }
            if self.cfg.run.export == "checkpoints":
                await self.s.trainer.export_hf.call(str(folder / f"hf-{self.step:08d}"))
            save_atomically(state, folder / f"app-{self.step:08d}.pt")
            for prefix in ("app", "trainer", "hf"):
                prune_checkpoints(folder, self.cfg.run.keep_checkpoints, prefix)
        finally:
            self.gate.set()

    async def restore(self, run_dir: Path) -> None:
        folder = run_dir / "checkpoints"
        states = sorted(folder.glob("app-*.pt"))
        if not states:
            raise ValueError(f"{run_dir} has no checkpoint to resume from (checkpoints/app-*.pt)")
        state = torch.load(states[-1], weights_only=False)
        await self.s.trainer.load_checkpoint.call(str(folder / state["trainer"]))
        await self.s.replay_buffer.load_state_dict.call_one(state["buffer"])
        await self.s.dataloader.load_state_dict.call_one(state["data"])
        self.step, self.version = state["step"], state["version"]
        self.rewards = RewardWindow.from_state(self.cfg.run.reward_window, state["rewards"])  # or an old full list
        await self.s.trainer.push_weights.call(policy_version=self.version)
        await self.s.policy.update_weights.fanout(policy_version=self.version, source=self.s.trainer)
        truncate_metrics(run_dir / "metrics.jsonl", self.step)
        truncate_metrics(run_dir / "samples.jsonl", self.step)

    # ---- watchdog ------------------------------------------------------------------

    async def watchdog(self) -> None:
        pids: dict[int, str] = {}
        for name, actor in self.s.processes().items():  # co-located parts: "dataloader+reward+..."
            pids.update({pid: name for pid in actor_pids(actor)})
        for name, service in self.s.services().items():  # as started; rebuilt replicas get new pids
            stats = await service.statistics()
            pids[stats.controller_pid] = f"{name} controller"
            for row in stats.replicas:
                pids.update({pid: f"{name} replica {row.replica_id}" for pid in row.pids})
        pool = current_pool()
        if pool is not None:
            pids[pool.registry_pid] = "host registry"
        partial = self.run_dir / "processes.json.partial"  # renamed into place: never read half-written
        partial.write_text(json.dumps({str(p): n for p, n in pids.items()}, indent=1))
        partial.replace(self.run_dir / "processes.json")
        stall_s = self.cfg.run.stall_timeout_s
        while True:
            await asyncio.sleep(0.5)
            if stall_s is not None and time.monotonic() - self.progress["training loop"] > stall_s:
                raise RunStalled(await self.stall_report())
            if pool is not None:
                pool.check()  # raises HostRegistryLost
            for name, actor in self.s.singletons().items():
                if not await actor_alive(actor):  # does not wait behind a busy actor's message
                    raise ActorDied(f"the {name} actor died (its process or host is gone); the run cannot continue "
                                    f"without it. Resume from the last checkpoint with --resume {self.run_dir}")


    async def stall_report(self) -> str:
        """Where each loop waits, and which processes do not answer a ping (the suspects: a
        loop may wait on a healthy part that itself waits on the hung one)."""
        now = time.monotonic()
        lines = [f"no training step finished in {now - self.progress['training loop']:.0f} s (run.stall_timeout_s); "
                 f"the run looks hung after step {self.step}. Where each loop waits:"]
        for name, task in self.loops.items():
            chain = await_chain(task)
            done = "step" if name == "training loop" else "group"
            lines.append(f"  {name} (last {done} {now - self.progress[name]:.1f} s ago):"
                         + ("".join(f"\n      {where}" for where in chain) if chain else " finished"))
        if self.weight_sync is not None and not self.weight_sync.done():  # the training loop may wait on it
            lines.append(f"  weight sync of version {self.version} to the generators:"
                         + "".join(f"\n      {where}" for where in await_chain(self.weight_sync)))
        processes = self.s.processes()
        answers = await asyncio.gather(*(actor_answers(actor, PING_TIMEOUT_S) for actor in processes.values()))
        silent = [f"{name} (pid {', '.join(map(str, actor_pids(processes[name])))})"
                  for name, answered in zip(processes, answers) if not answered]
        lines.append(f"  not answering a ping within {PING_TIMEOUT_S:.0f} s (hung, stopped, or in a long call): "
                     + (", ".join(silent) if silent else "none"))
        return "\n".join(lines)


def policy_tokens(completion: Any) -> int:
    """Tokens the policy generated: all of a completion's, a rollout's policy segments'."""
    mask = getattr(completion, "loss_mask", None)
    return len(completion.token_ids) if mask is None else int(mask.sum())


def conversation_sample(sample: dict[str, Any], completion: Any, reward: float) -> dict[str, Any]:
    """One episode for the logs: the prompt, the turns (policy and environment) and the reward."""
    conversation = getattr(completion, "conversation", None)
    turns = conversation()[1:] if conversation else [{"role": "policy", "text": completion.text}]
    return {"prompt": sample["question"] if "question" in sample else str(sample["request"]), "turns": turns,
            "reward": float(reward), "target": str(sample.get("target"))}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def new_run_dir(cfg: GRPOConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    return run_dir


async def run(cfg: GRPOConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run GRPO to the target reward, max_steps or the time limit; returns a summary."""
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    started = time.monotonic()
    services = pool = log = None
    tasks: list[asyncio.Task] = []
    try:
        if cfg.hosts is not None:
            pool = await init_hosts(cfg.hosts)
        services = await start_services(cfg, f"grpo-{os.getpid()}-{int(time.time())}")
        grpo = await _prepare_run(cfg, run_dir, services, resume)
        startup_s = time.monotonic() - started
        log = RunLogger(run_dir, cfg.metrics, cfg.run.max_steps, cfg.run.log_every, first_step=grpo.step)
        log.write(f"run directory: {run_dir}  (services up in {startup_s:.1f} s)")
        tasks, trainer_task = _start_loops(grpo, log, started + cfg.run.max_time_s)
        reason = await _wait_for_the_end(trainer_task, tasks)
        summary = await _finish(grpo, log, reason, started, startup_s)
        log = None  # closed by _finish
        return summary
    finally:
        await _cancel(tasks)
        if log is not None:
            log.close()
        try:
            await stop_services(services)
        finally:
            if pool is not None:
                await pool.shutdown()


async def _prepare_run(cfg: GRPOConfig, run_dir: Path, services: Services, resume: bool) -> GRPORun:
    """The run's state: restored from the last checkpoint, or with the generators on version 0."""
    from forge.models import load_tokenizer, padding_token_id

    async def first_version() -> None:  # the generators start from exactly the trainer's weights
        await services.trainer.push_weights.call(policy_version=0)
        await services.policy.update_weights.fanout(policy_version=0, source=services.trainer)

    # An environment's conversations need the tokenizer here; it loads on a thread while the
    # parts answer. Without one this process never imports transformers.
    tokenizer, eval_rows, _ = await asyncio.gather(
        asyncio.to_thread(load_tokenizer, cfg.model.path) if cfg.env.factory is not None else _nothing(),
        services.dataloader.eval_rows.call_one(cfg.data.eval_size) if cfg.run.eval_every else _nothing(),
        _nothing() if resume else first_version())
    if cfg.env.factory is not None:  # its stop tokens must be single tokens of this tokenizer: say so now
        stop_token_ids(tokenizer, cfg.env.make().stop_tokens)
    grpo = GRPORun(cfg, run_dir, services, padding_token_id(cfg.model.path), eval_rows or [], tokenizer)
    if resume:
        await grpo.restore(run_dir)
    # every sampled id; cut back to the checkpoint on a resume
    await services.replay_buffer.record_ids_to.call_one(str(run_dir / "trained_episodes.txt"))
    return grpo


def _start_loops(grpo: GRPORun, log: RunLogger, deadline: float) -> tuple[list[asyncio.Task], asyncio.Task]:
    """The rollout loops, the training loop and the watchdog; (all tasks, the training loop)."""
    rollouts = [asyncio.ensure_future(grpo.rollout_loop(i)) for i in range(grpo.cfg.run.rollout_tasks)]
    trainer_task = asyncio.ensure_future(grpo.train_loop(log, deadline))
    grpo.loops = {"training loop": trainer_task, **{f"rollout loop {i}": t for i, t in enumerate(rollouts)}}
    grpo.progress = dict.fromkeys(grpo.loops, time.monotonic())
    watchdog = asyncio.ensure_future(grpo.watchdog())
    return [*rollouts, watchdog, trainer_task], trainer_task


async def _wait_for_the_end(trainer_task: asyncio.Task, tasks: list[asyncio.Task]) -> str:
    """Why the training loop stopped; raises what ended the run if another task ended first."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finished = trainer_task if trainer_task in done else next(iter(done))
    if finished is not trainer_task:
        finished.result()  # raises: a rollout failed or an actor died
        raise RuntimeError("a background task ended unexpectedly")
    return trainer_task.result()


async def _finish(grpo: GRPORun, log: RunLogger, reason: str, started: float, startup_s: float) -> dict[str, Any]:
    """Final evaluation, the trained-episode audit, the curves and summary.json; closes ``log``."""
    run_dir, services = grpo.run_dir, grpo.s
    grpo.stopping = True
    grpo.gate.set()
    final_accuracy = await grpo.final_evaluation() if grpo.eval_rows else None
    final_model = str(run_dir / "final_model") if grpo.cfg.run.export != "none" else None
    if final_model:  # a directory transformers, vLLM and Policy load
        await services.trainer.export_hf.call(final_model)
    episodes_trained = await asyncio.wait_for(services.replay_buffer.num_sampled.call_one(), 60)
    ids_file = run_dir / "trained_episodes.txt"
    written = write_sampled_ids_json(ids_file, run_dir / "trained_episodes.json")
    if written != episodes_trained:
        logger.warning("%s lists %d episodes, the replay buffer sampled %d", ids_file, written, episodes_trained)
    summary = {"reason": reason, "steps": grpo.step, "wall_s": time.monotonic() - started,
               "startup_s": startup_s, "final_mean_reward": grpo.rewards.mean(),
               "best_mean_reward": grpo.rewards.best_mean,
               "final_eval_accuracy": final_accuracy, "episodes_trained": episodes_trained,
               "episodes_generated": grpo.episodes_generated,
               "final_model": final_model}
    log.close()
    history = log.full_history()  # metrics.jsonl: every step, those before a resume too
    if final_accuracy is not None:
        history.append({"step": grpo.step, "eval/accuracy": final_accuracy})
    summary["plot"] = str(plot_curves(history, run_dir / "curves.png", grpo.cfg.run.reward_window))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


async def _cancel(tasks: list[asyncio.Task]) -> None:
    """Cancel the run's tasks and wait for them (30 s); a task that ignores it is reported."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, stuck = await asyncio.wait(tasks, timeout=30)
    for task in done:
        if not task.cancelled():
            task.exception()  # reported already (or by the task that ended the run)
    for task in stuck:  # shut the services down anyway; that ends what the task waits on
        logger.warning("a task of the run ignored cancellation for 30 s; it waits at %s", await_chain(task))


def main(argv: list[str] | None = None, default_config: Path = DEFAULT_CONFIG, app: str = "apps.grpo.main") -> int:
    """The command line of ``app`` (this GRPO app, or one that runs it with its own default
    config, such as apps.tool_use.main)."""
    parser = argparse.ArgumentParser(prog=f"python -m {app}", description="GRPO on Forge",
                                     epilog="Overrides: key=value, e.g. run.max_steps=50")
    parser.add_argument("--config", default=str(default_config), help="YAML config (default: the embedded CPU demo)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    private_tmpdir()  # Monarch's socket directories go with this run, even a killed one (next start)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").exists():
                raise ValueError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
            cfg = load_config(GRPOConfig, run_dir / "config.yaml", args.overrides)
        else:
            cfg = load_config(GRPOConfig, args.config, args.overrides)
            run_dir = new_run_dir(cfg)
            from omegaconf import OmegaConf

            OmegaConf.save(OmegaConf.create(to_dict(cfg)), run_dir / "config.yaml")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(cfg, run_dir, resume=bool(args.resume)))
    except KeyboardInterrupt:
        print(f"\ninterrupted; processes stopped. Resume with: python -m {app} --resume {run_dir}",
              file=sys.stderr)
        return 130
    except (ActorDied, RunStalled, HostRegistryLost) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad input found while placing the parts (e.g. GPUs a host does not have)
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_infrastructure_error(e):
            raise
        # Monarch's supervision found a process of the run failed (dead, or silent past the
        # host pool's failure_timeout_s); its message names the actor.
        print(f"\nerror: {str(e).strip()}\nThe run cannot continue without that process. "
              f"Resume from the last checkpoint with --resume {run_dir}", file=sys.stderr)
        return 1
    print(f"\ndone: {summary['reason']}")
    print(f"steps {summary['steps']}, {summary['wall_s']:.0f} s (startup {summary['startup_s']:.0f} s); "
          f"mean reward {summary['final_mean_reward']:.3f}; eval accuracy "
          f"{summary['final_eval_accuracy'] if summary['final_eval_accuracy'] is None else round(summary['final_eval_accuracy'], 3)}")
    print(f"curves: {summary['plot']}\nmetrics: {run_dir / 'metrics.jsonl'}")
    if summary["final_model"]:
        print(f"model (Hugging Face format): {summary['final_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
