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
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monarch.actor import endpoint

from forge.actors._model_spec import ModelSpec
from forge.controller import ForgeActor
from forge.data.batch import TrainInputs, TrainTargets
from forge.util.checks import check_choice, check_int, check_number, check_positive
from forge.util.config import build
from forge.losses import LossConfig, grpo_loss, sequence_logprobs
from forge.weights import WeightStore

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "Adam", "SGD")


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
    local_batch_size: int = 8  # sequences per rank per step (informational bound, checked)
    seq_len: int = 2048  # longest sequence accepted
    max_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("training local_batch_size", self.local_batch_size, 1)
        check_int("training seq_len", self.seq_len, 2)
        check_number("training max_norm", self.max_norm, 0)
        check_int("training seed", self.seed, 0)


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
        ModelSpec.parse(model).path()
        build(OptimizerConfig, optimizer, "optimizer")
        build(TrainingConfig, training, "training")
        build(LossConfig, loss, "loss").check_complete()
        build(LRSchedulerConfig, lr_scheduler, "lr_scheduler")
        build(CheckpointConfig, checkpoint, "checkpoint")
        WeightStore.resolve(weight_store)

    @endpoint
    async def setup(self) -> None:
        from forge.models import load_model

        device = "cuda" if torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" in os.environ else "cpu"
        torch.manual_seed(self.training.seed)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
        self.model = load_model(self.model_spec.path(), self.model_spec.dtype, device)
        self.model.train()
        self.model.config.use_cache = False
        if self.world_size > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.model.layers:
                fully_shard(layer)
            fully_shard(self.model)
        cfg = self.optimizer_config
        if cfg.name == "SGD":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            cls = torch.optim.AdamW if cfg.name == "AdamW" else torch.optim.Adam
            self.optimizer = cls(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule.factor)

    # ---- training --------------------------------------------------------------

    def _share(self, inputs: Any, targets: Any) -> tuple[TrainInputs, TrainTargets]:
        if isinstance(inputs, (list, tuple)):
            return inputs[self.rank], targets[self.rank]
        batch = inputs.tokens.shape[0]
        if batch % self.world_size:
            raise ValueError(f"global batch of {batch} sequences does not split over {self.world_size} ranks")
        per_rank = batch // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return inputs.select(rows), targets.select(rows)

    def _global(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    @endpoint
    async def train_step(self, inputs: Any, targets: Any = None) -> float:
        """One optimizer step on this rank's share of the batch; returns the global loss.

        Takes ``(inputs, targets)`` as two arguments or as the one tuple
        ``ReplayBuffer.sample`` returns."""
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
        device = next(self.model.parameters()).device
        mask = local_tg.response_mask.to(device)
        cfg = self.loss_config
        if cfg.normalization == "dapo":
            normalizer = self._global(float(mask.sum())) / self.world_size
        else:
            normalizer = self._global(float(tokens.shape[0])) / self.world_size
        logits = self.model(input_ids=tokens.to(device), attention_mask=local_in.attention_mask.to(device)).logits
        logp = sequence_logprobs(logits, tokens.to(device), cfg.temperature)  # [B, L]
        behaviour, fallback_tokens = self._behaviour_logprobs(local_tg, logp, mask)
        loss, metrics = grpo_loss(
            logp, behaviour, self._reference_logprobs(local_tg, logp),
            local_tg.advantages.to(device), mask, cfg, token_normalizer=normalizer,
        )
        metrics["behaviour_fallback_tokens"] = fallback_tokens
        loss.backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training.max_norm)
            if self.training.max_norm > 0 else torch.tensor(0.0)
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # at the sampling temperature, the distribution the policy samples from
            probs = torch.softmax(logits[:, :-1].float() / cfg.temperature, -1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            metrics["entropy"] = float((entropy * mask[:, 1:]).sum() / mask[:, 1:].sum().clamp(min=1))
        # Each rank's loss is its share of the global loss times world_size (see the normalizer).
        global_loss = self._global(float(loss.detach())) / self.world_size
        self.state.step += 1
        self.state.metrics = {
            "loss": global_loss, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": time.monotonic() - started, **self._over_all_ranks(metrics),
        }
        if self.checkpointing.interval and self.state.step % self.checkpointing.interval == 0:
            self._save_checkpoint()
        return global_loss

    def _over_all_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-token metrics averaged over every rank's tokens; counts summed."""
        if self.world_size == 1:
            return metrics
        counts = ("num_tokens", "behaviour_fallback_tokens")
        names = sorted(metrics)
        tokens = metrics["num_tokens"]
        values = torch.tensor([metrics[n] if n in counts else metrics[n] * tokens for n in names] + [tokens],
                              dtype=torch.float64)
        torch.distributed.all_reduce(values)
        total = float(values[-1]) or 1.0
        return {n: float(v) if n in counts else float(v) / total for n, v in zip(names, values[:-1])}

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
        if self.world_size == 1:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

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

    # ---- checkpoints -----------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        if self.world_size == 1:
            model, optim = self.model.state_dict(), self.optimizer.state_dict()
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model, optim = get_state_dict(self.model, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": model, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "step": self.state.step, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    def _write_checkpoint(self, path: Path, prune_folder: Path | None = None) -> str:
        """Every rank gathers (FSDP); rank 0 writes atomically (and prunes old ones)."""
        state = self._checkpoint_state()
        if self.rank == 0:
            save_atomically(state, path)
            if prune_folder is not None:
                prune_checkpoints(prune_folder, self.checkpointing.keep_last)
        if self.world_size > 1:
            torch.distributed.barrier()
        return str(path)

    def _save_checkpoint(self) -> str:
        folder = self.checkpointing.folder
        if not folder:
            raise ValueError("checkpoint.folder is not set; pass checkpoint={'folder': ...} to RLTrainer")
        return self._write_checkpoint(Path(folder) / f"step-{self.state.step:08d}.pt", Path(folder))

    @endpoint
    async def save_checkpoint(self) -> str:
        """Write model, optimizer, scheduler, step and RNG; returns the checkpoint path."""
        return self._save_checkpoint()

    @endpoint
    async def save_checkpoint_to(self, path: str) -> str:
        """Like save_checkpoint, to an explicit file (every rank must call it with FSDP)."""
        return self._write_checkpoint(Path(path))

    @endpoint
    async def load_checkpoint(self, path: str | None = None) -> int:
        """Restore from ``path`` (default: the latest in checkpoint.folder); returns the step."""
        if path is None:
            path = latest_checkpoint(Path(self.checkpointing.folder or ""))
            if path is None:
                raise ValueError(f"no checkpoint in {self.checkpointing.folder!r}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if self.world_size == 1:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.state.step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        return self.state.step

    async def __cleanup__(self, exc: Any) -> None:
        self.store.close()




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
    """``<prefix>-<step>.pt`` files in ``folder``, oldest first (steps are zero-padded)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.pt$")
    return sorted(p for p in folder.glob(f"{prefix}-*.pt") if pattern.match(p.name)) if folder.is_dir() else []


def latest_checkpoint(folder: Path, prefix: str = "step") -> str | None:
    found = _checkpoints(folder, prefix)
    return str(found[-1]) if found else None


def prune_checkpoints(folder: Path, keep_last: int, prefix: str = "step") -> None:
    """Delete all but the newest ``keep_last`` ``<prefix>-<step>.pt`` files of ``folder``."""
    for old in _checkpoints(folder, prefix)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
