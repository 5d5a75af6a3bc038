"""``RLTrainer``: GRPO training on one or more processes, with checkpoints and weight push.

    trainer = await RLTrainer.options(procs=2).as_actor(
        model={"name": "qwen3", "flavor": "tiny"},
        optimizer={"name": "AdamW", "lr": 1e-3},
        training={"local_batch_size": 8, "seq_len": 64},
        loss={"normalization": "grpo", "beta": 0.04},
    )
    loss = await trainer.train_step.call(inputs, targets)      # every rank takes its share
    loss = await trainer.train_step.call_one(batch)            # one process: (inputs, targets) as one
    await trainer.push_weights.call(policy_version=1)        # then policy.update_weights

With ``procs > 1`` the ranks form a ``torch.distributed`` group (gloo on CPU, NCCL on
GPU) and the model is sharded with FSDP2 (``fully_shard`` per decoder layer and at the
root). ``train_step`` receives the global batch on every rank and each rank trains on
its contiguous share, so the loss and the updated weights equal one process's on the
same global batch (within fp32 tolerance).

Rows without behaviour logprobs (episodes added without ``response_logprobs``) are
trained as on-policy: their behaviour logprobs are the trainer's own, detached, so the
importance ratio is 1. Their tokens are counted in the ``behaviour_fallback_tokens``
metric and the first such step logs a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from monarch.actor import endpoint

from forge.actors._model_spec import ModelSpec
from forge.controller import ForgeActor
from forge.data.batch import TrainInputs, TrainTargets
from forge.util.checks import check_bool, check_choice, check_int, check_number, check_positive
from forge.util.config import build
from forge.losses import LossConfig, TokenScorer, grpo_loss
from forge.observability.metrics import record_metric
from forge.util.procs import current_rss, peak_rss, return_large_frees_to_the_os
from forge.weights import WeightStore

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "Adam", "SGD")
TRAIN_DTYPES = ("float32", "bfloat16")  # fp16 would need loss scaling; bf16 does not
COUNTS = ("num_tokens", "behaviour_fallback_tokens")  # metrics summed, not averaged over tokens


def _reduce_of(key: str) -> str:
    """How a train-step metric reduces over the steps between two drains of ``record_metric``:
    counts are summed, memory peaks maxed, the learning rate is its latest value, and the
    rest (loss, KL, grad norm, ...) are averaged."""
    if key in COUNTS:
        return "sum"
    if key.startswith("memory/"):
        return "max"
    return "last" if key == "lr" else "mean"


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "AdamW"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("optimizer name", self.name, OPTIMIZERS)
        check_positive("optimizer lr", self.lr)
        check_number("optimizer weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise ValueError(f"optimizer betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            check_number("optimizer betas", beta, 0, 1, high_open=True)
        check_positive("optimizer eps", self.eps)


@dataclass(frozen=True)
class LRSchedulerConfig:
    warmup_steps: int = 0
    decay: str = "constant"  # "constant" | "linear" | "cosine" (to min_lr_ratio at total_steps)
    total_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice("lr_scheduler decay", self.decay, ("constant", "linear", "cosine"))
        check_int("lr_scheduler warmup_steps", self.warmup_steps, 0)
        check_int("lr_scheduler total_steps", self.total_steps, 0)
        check_number("lr_scheduler min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.decay != "constant" and self.total_steps <= 0:
            raise ValueError("lr_scheduler total_steps must be > 0 for linear or cosine decay")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass(frozen=True)
class TrainingConfig:
    local_batch_size: int = 8  # most sequences per rank per step; a larger share is refused
    seq_len: int = 2048  # longest sequence accepted
    max_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 0
    # Micro-batching: a rank's share is split into micro-batches of at most this many
    # (padded) tokens, gradients accumulated; 0: the whole share at once.
    max_tokens_per_microbatch: int = 0
    # Logits that exist at once (the chunked log-softmax, forge.losses.logprobs); 0: auto,
    # 4M (16 MiB of fp32) on CPU, 64M on a GPU.
    logits_chunk_elements: int = 0
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass

    def __post_init__(self) -> None:
        check_int("training local_batch_size", self.local_batch_size, 1)
        check_int("training seq_len", self.seq_len, 2)
        check_number("training max_norm", self.max_norm, 0)
        check_int("training seed", self.seed, 0)
        check_int("training max_tokens_per_microbatch", self.max_tokens_per_microbatch, 0)
        check_int("training logits_chunk_elements", self.logits_chunk_elements, 0)
        check_bool("training activation_checkpointing", self.activation_checkpointing)

    def microbatches(self, rows: int, width: int) -> list[slice]:
        """Row ranges of a ``[rows, width]`` share, each within the token budget (at least one row).

        Depends only on the share's shape, which every data-parallel rank has alike, so all
        ranks run the same number of micro-batches (FSDP's collectives pair up)."""
        budget = self.max_tokens_per_microbatch
        per = rows if budget == 0 else max(1, min(rows, budget // width))
        return [slice(start, min(start + per, rows)) for start in range(0, rows, per)]


@dataclass(frozen=True)
class CheckpointConfig:
    folder: str | None = None
    interval: int = 0  # save every N train steps; 0: only when save_checkpoint is called
    keep_last: int = 2

    def __post_init__(self) -> None:
        check_int("checkpoint interval", self.interval, 0)
        check_int("checkpoint keep_last", self.keep_last, 1)


@dataclass
class TrainerState:
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class _TokenWeightedSums:
    """Metrics of several micro-batches: per-token means weighted by tokens, counts summed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        self.tokens += tokens
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + (value if name in COUNTS else value * tokens)

    def means(self) -> dict[str, float]:
        return {n: v if n in COUNTS else v / (self.tokens or 1.0) for n, v in self.sums.items()}


def _trimmed(targets: TrainTargets, width: int) -> TrainTargets:
    return dataclasses.replace(targets, response_mask=targets.response_mask[:, :width],
                               behaviour_logprobs=targets.behaviour_logprobs[:, :width],
                               ref_logprobs=targets.ref_logprobs[:, :width])


class RLTrainer(ForgeActor):
    """See the module docstring."""

    def __init__(self, model: Any = None, optimizer: Any = None, training: Any = None, loss: Any = None,
                 lr_scheduler: Any = None, checkpoint: Any = None, weight_store: str | None = None) -> None:
        self.model_spec = ModelSpec.parse(model)
        self.optimizer_config = build(OptimizerConfig, optimizer, "optimizer")
        self.training = build(TrainingConfig, training, "training")
        self.loss_config = build(LossConfig, loss, "loss")
        self.schedule = build(LRSchedulerConfig, lr_scheduler, "lr_scheduler")
        self.checkpointing = build(CheckpointConfig, checkpoint, "checkpoint")
        self.store = WeightStore.resolve(weight_store)
        self.state = TrainerState()
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))

    @classmethod
    def validate_arguments(cls, model: Any = None, optimizer: Any = None, training: Any = None, loss: Any = None,
                           lr_scheduler: Any = None, checkpoint: Any = None, weight_store: Any = None,
                           **unknown: Any) -> None:
        if unknown:
            raise ValueError(f"RLTrainer got unknown argument(s) {sorted(unknown)}")
        spec = ModelSpec.parse(model)
        spec.path()
        check_choice("RLTrainer model dtype", spec.dtype, TRAIN_DTYPES)
        build(OptimizerConfig, optimizer, "optimizer")
        build(TrainingConfig, training, "training")
        build(LossConfig, loss, "loss").check_complete()
        build(LRSchedulerConfig, lr_scheduler, "lr_scheduler")
        build(CheckpointConfig, checkpoint, "checkpoint")
        WeightStore.resolve(weight_store)

    @endpoint
    async def setup(self) -> None:
        """Load the model (fp32 master weights), shard it with FSDP2 when ``procs > 1``, and
        build the optimizer. With ``model.dtype`` bfloat16 the forward and backward run in
        bf16 (FSDP2 mixed precision, or autocast on one process) while the weights, their
        gradients' reduction and the optimizer state stay fp32."""
        from forge.models import load_model, torch_dtype
        from forge.models.loading import import_model_code

        import_model_code(self.model_spec.path(), self.model_spec.impl)  # before the baseline below

        self.rss_before_model = current_rss()  # for memory/before_model_gb: libraries loaded, no weights yet
        check_choice("RLTrainer model dtype", self.model_spec.dtype, TRAIN_DTYPES)
        device = "cuda" if torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" in os.environ else "cpu"
        self.device = torch.device(device)
        torch.manual_seed(self.training.seed)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            # gloo beside NCCL: the trainer's small CPU reductions (loss, metrics) need a CPU backend
            torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo")
        if device == "cpu":
            return_large_frees_to_the_os()
        self.model = load_model(self.model_spec.path(), "float32", device, self.model_spec.impl)
        self.model.train()
        self.model.config.use_cache = False
        if self.training.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compute_dtype = torch_dtype(self.model_spec.dtype)
        self.scorer = TokenScorer(self.model, self.training.logits_chunk_elements,
                                  grads_in_place=self.world_size == 1)  # FSDP owns its gradients
        if self.world_size > 1:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            precision = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            for layer in self.model.get_decoder().layers:
                fully_shard(layer, mp_policy=precision)
            fully_shard(self.scorer, mp_policy=precision)  # the root: embedding, head (tied), final norm
        cfg = self.optimizer_config
        if cfg.name == "SGD":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            cls = torch.optim.AdamW if cfg.name == "AdamW" else torch.optim.Adam
            self.optimizer = cls(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=True)  # no full-size temporaries
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule.factor)

    # ---- training --------------------------------------------------------------

    def _share(self, inputs: Any, targets: Any) -> tuple[TrainInputs, TrainTargets]:
        if isinstance(inputs, (list, tuple)):
            share = inputs[self.rank], targets[self.rank]
        else:
            batch = inputs.tokens.shape[0]
            if batch % self.world_size:
                raise ValueError(f"global batch of {batch} sequences does not split over {self.world_size} ranks")
            per_rank = batch // self.world_size
            rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
            share = inputs.select(rows), targets.select(rows)
        rows = share[0].tokens.shape[0]
        if rows > self.training.local_batch_size:
            raise ValueError(
                f"this rank's share is {rows} sequences but training.local_batch_size={self.training.local_batch_size}"
                f"; raise local_batch_size (micro-batching keeps memory bounded: training.max_tokens_per_microbatch)"
                f" or send smaller batches")
        return share

    def _global(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def _autocast(self) -> Any:
        if self.world_size == 1 and self.compute_dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()  # fp32, or FSDP2's mixed precision casts the parameters

    @endpoint
    async def train_step(self, inputs: Any, targets: Any = None) -> float:
        """One optimizer step on this rank's share of the batch; returns the global loss.

        Takes ``(inputs, targets)`` as two arguments or as the one tuple
        ``ReplayBuffer.sample`` returns. The share runs in micro-batches
        (``training.max_tokens_per_microbatch``) whose gradients add up to exactly the
        one-batch gradient: every micro-batch's loss is normalised by the whole global
        batch's count (sequences or tokens)."""
        started = time.monotonic()
        if targets is None:
            if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
                raise ValueError("train_step takes (inputs, targets), as two arguments or as the one tuple "
                                 f"ReplayBuffer.sample returns; got a single {type(inputs).__name__}")
            inputs, targets = inputs
        local_in, local_tg = self._share(inputs, targets)
        tokens = local_in.tokens
        if tokens.shape[1] > self.training.seq_len:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed training.seq_len={self.training.seq_len}")
        cfg = self.loss_config
        if cfg.normalization == "dapo":
            normalizer = self._global(float(local_tg.response_mask.sum())) / self.world_size
        else:
            normalizer = self._global(float(tokens.shape[0])) / self.world_size
        parts = self.training.microbatches(*tokens.shape)
        local_loss, sums = 0.0, _TokenWeightedSums()
        for index, rows in enumerate(parts):
            if self.world_size > 1:  # reduce gradients once, after the last micro-batch
                self.scorer.set_requires_gradient_sync(index == len(parts) - 1)
            loss, metrics, weight = self._microbatch_backward(local_in.select(rows), local_tg.select(rows), normalizer)
            local_loss += loss
            sums.add(metrics, weight)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training.max_norm)
            if self.training.max_norm > 0 else torch.tensor(0.0)
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Each rank's loss is its share of the global loss times world_size (see the normalizer).
        global_loss = self._global(local_loss) / self.world_size
        self.state.step += 1
        self.state.metrics = {
            "loss": global_loss, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": time.monotonic() - started, "microbatches": float(len(parts)),
            **self._over_all_ranks(sums.means()), **self._memory(),
        }
        if self.rank == 0:  # global values: one rank's record is the whole batch's
            for key, value in self.state.metrics.items():
                record_metric(f"trainer/{key}", value, _reduce_of(key))
        if self.checkpointing.interval and self.state.step % self.checkpointing.interval == 0:
            self._save_checkpoint()
        return global_loss

    def _microbatch_backward(self, inputs: TrainInputs, targets: TrainTargets,
                             normalizer: float) -> tuple[float, dict[str, float], float]:
        """Forward and backward of one micro-batch; its loss, metrics and response-token count."""
        width = max(2, int(inputs.attention_mask.sum(1).max()))  # rows are right-padded: drop the padding
        tokens = inputs.tokens[:, :width].to(self.device)
        mask = targets.response_mask[:, :width].to(self.device)
        targets = _trimmed(targets, width)
        with self._autocast():
            logp, entropy = self.scorer(tokens, inputs.attention_mask[:, :width].to(self.device), mask,
                                        self.loss_config.temperature, with_entropy=True)
        behaviour, fallback_tokens = self._behaviour_logprobs(targets, logp, mask)
        loss, metrics = grpo_loss(logp, behaviour, self._reference_logprobs(targets, logp),
                                  targets.advantages.to(self.device), mask, self.loss_config,
                                  token_normalizer=normalizer)
        loss.backward()
        count = float(mask.sum())
        metrics["behaviour_fallback_tokens"] = fallback_tokens
        metrics["num_tokens"] = count
        metrics["entropy"] = float(entropy.sum()) / max(count, 1.0)  # at the sampling temperature
        return float(loss.detach()), metrics, count

    def _memory(self) -> dict[str, float]:
        """Peak memory so far: the device's allocator on CUDA, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return {"memory/peak_gb": torch.cuda.max_memory_allocated(self.device) / 1e9}
        return {"memory/peak_gb": peak_rss() / 1e9, "memory/before_model_gb": self.rss_before_model / 1e9}

    def _over_all_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-token metrics averaged over every rank's tokens; counts summed."""
        if self.world_size == 1:
            return metrics
        names = sorted(metrics)
        tokens = metrics["num_tokens"]
        values = torch.tensor([metrics[n] if n in COUNTS else metrics[n] * tokens for n in names] + [tokens],
                              dtype=torch.float64)
        torch.distributed.all_reduce(values)
        total = float(values[-1]) or 1.0
        return {n: float(v) if n in COUNTS else float(v) / total for n, v in zip(names, values[:-1])}

    def _reference_logprobs(self, targets: TrainTargets, logp: torch.Tensor) -> torch.Tensor:
        """The reference logprobs; rows without them take the trainer's own (no KL), with beta=0 only."""
        reference = targets.ref_logprobs.to(logp.device)
        missing = targets.missing_reference().to(logp.device)
        if not bool(missing.any()):
            return reference
        if self.loss_config.beta > 0:
            raise ValueError(f"{int(missing.sum())} episode(s) came without ref_logprobs, but the loss has a KL "
                             f"term (beta={self.loss_config.beta}); give them reference logprobs or set loss beta=0")
        return torch.where(missing[:, None], logp.detach(), reference)

    def _behaviour_logprobs(self, targets: TrainTargets, logp: torch.Tensor,
                            mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The behaviour logprobs, with the trainer's own (detached) in rows that have none;
        and how many response tokens took them."""
        behaviour = targets.behaviour_logprobs.to(logp.device)
        missing = targets.missing_behaviour().to(logp.device)
        if not bool(missing.any()):
            return behaviour, 0.0
        tokens = float((mask * missing[:, None]).sum())
        if not getattr(self, "_warned_fallback", False):
            self._warned_fallback = True
            logger.warning("train_step: %d episode(s) came without behaviour logprobs; they are trained as "
                           "on-policy (ratio 1). Metric behaviour_fallback_tokens counts their tokens.",
                           int(missing.sum()))
        return torch.where(missing[:, None], logp.detach(), behaviour), tokens

    @endpoint
    async def metrics(self) -> dict[str, float]:
        """The last train step's metrics: loss, grad_norm, kl, clip_fraction, entropy, lr, tokens."""
        return dict(self.state.metrics, step=self.state.step)

    # ---- weights ---------------------------------------------------------------

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights with Hugging Face names (every rank takes part under FSDP)."""
        if self.world_size == 1:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in full.items()}

    @endpoint
    async def push_weights(self, policy_version: int) -> int:
        """Publish the current weights as ``policy_version`` (Hugging Face names).

        With FSDP every rank takes part in gathering the full weights; rank 0 writes them.
        """
        state_dict = self._full_state_dict()
        if self.rank == 0:
            self.store.publish(state_dict, int(policy_version))
        if self.world_size > 1:
            torch.distributed.barrier()
        return int(policy_version)

    @endpoint
    async def weights_size(self, policy_version: int) -> int:
        """Bytes of published ``policy_version`` (rank 0); for generators on other hosts."""
        return self.store.published_size(int(policy_version))

    @endpoint
    async def weights_chunk(self, policy_version: int, offset: int, length: int) -> bytes:
        """A chunk of published ``policy_version`` (rank 0): the cross-host weight path."""
        return self.store.read_bytes(int(policy_version), offset, length)

    @endpoint
    async def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the full current weights (for tests and small models; use push_weights to sync)."""
        return {k: v.clone() for k, v in self._full_state_dict().items()}

    @endpoint
    async def export_hf(self, path: str) -> str:
        """Write the policy as a Hugging Face model directory at ``path`` (atomically):
        ``config.json``, safetensors in ``model.dtype``, and the tokenizer and generation
        files of the model it started from. ``transformers``, vLLM and ``Policy`` load it.
        Every rank must call it under FSDP; rank 0 writes."""
        from forge.models import export_hf_directory

        state_dict = self._full_state_dict()
        if self.rank == 0:
            export_hf_directory(state_dict, self.model.config, self.model_spec.path(), Path(path),
                                self.model_spec.dtype)
        if self.world_size > 1:
            torch.distributed.barrier()
        return str(path)

    # ---- checkpoints -----------------------------------------------------------
    #
    # A checkpoint is a directory: model and optimizer state through
    # torch.distributed.checkpoint (each rank writes its own shards; no rank gathers the
    # whole state), plus one small ``rank-<r>.pt`` per rank with the step, the LR
    # schedule and that rank's RNG states. It is written under a hidden staging name and
    # renamed into place once every rank has finished, so a crash never leaves a
    # directory that looks complete. Several hosts need the folder on a shared file system.

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.scorer, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _write_checkpoint(self, path: Path, prune_folder: Path | None = None) -> str:
        import torch.distributed.checkpoint as dcp

        staging = path.with_name(f".{path.name}.partial")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
            staging.mkdir(parents=True)
        self._barrier()
        with _one_process_is_intended():
            dcp.save(self._sharded_state(), checkpoint_id=str(staging))
        rank_state = {"step": self.state.step, "scheduler": self.scheduler.state_dict(),
                      "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        save_atomically(rank_state, staging / f"rank-{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            if path.exists():  # saved again at the same step (e.g. after a resume): replace it
                shutil.rmtree(path)
            os.rename(staging, path)
            _fsync_directory(path.parent)
            if prune_folder is not None:
                prune_checkpoints(prune_folder, self.checkpointing.keep_last)
        self._barrier()
        return str(path)

    def _save_checkpoint(self) -> str:
        folder = self.checkpointing.folder
        if not folder:
            raise ValueError("checkpoint.folder is not set; pass checkpoint={'folder': ...} to RLTrainer")
        return self._write_checkpoint(Path(folder) / f"step-{self.state.step:08d}", Path(folder))

    @endpoint
    async def save_checkpoint(self) -> str:
        """Write model, optimizer, scheduler, step and RNG; returns the checkpoint directory."""
        return self._save_checkpoint()

    @endpoint
    async def save_checkpoint_to(self, path: str) -> str:
        """Like save_checkpoint, to an explicit directory (every rank must call it with FSDP)."""
        return self._write_checkpoint(Path(path))

    @endpoint
    async def load_checkpoint(self, path: str | None = None) -> int:
        """Restore from ``path`` (default: the latest in checkpoint.folder); returns the step.
        The same number of ranks must load it as saved it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if path is None:
            path = latest_checkpoint(Path(self.checkpointing.folder or ""))
            if path is None:
                raise ValueError(f"no checkpoint in {self.checkpointing.folder!r}")
        folder = Path(path)
        rank_file = folder / f"rank-{self.rank}.pt"
        if not (folder / ".metadata").is_file() or not rank_file.is_file():
            raise ValueError(f"{folder} is not a complete trainer checkpoint of rank {self.rank} (a directory "
                             f"with .metadata and rank-{self.rank}.pt, as save_checkpoint writes); was it saved "
                             f"by {self.world_size} rank(s)?")
        state = self._sharded_state()
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.scorer, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(rank_state["scheduler"])
        self.state.step = rank_state["step"]
        torch.set_rng_state(rank_state["rng"]["torch"])
        random.setstate(rank_state["rng"]["python"])
        return self.state.step

    async def __cleanup__(self, exc: Any) -> None:
        self.store.close()


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every call without a process group; one
    process (procs=1) is a supported layout here, not an accident."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staging, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def _checkpoints(folder: Path, prefix: str) -> list[Path]:
    """``<prefix>-<step>`` directories and ``<prefix>-<step>.pt`` files in ``folder``, oldest
    first (steps are zero-padded). Staging names start with a dot and never match."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)(\.pt)?$")
    return sorted(p for p in folder.glob(f"{prefix}-*") if pattern.match(p.name)) if folder.is_dir() else []


def latest_checkpoint(folder: Path, prefix: str = "step") -> str | None:
    found = _checkpoints(folder, prefix)
    return str(found[-1]) if found else None


def prune_checkpoints(folder: Path, keep_last: int, prefix: str = "step") -> None:
    """Delete all but the newest ``keep_last`` ``<prefix>-<step>`` checkpoints of ``folder``."""
    for old in _checkpoints(folder, prefix)[:-keep_last] if keep_last > 0 else []:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
