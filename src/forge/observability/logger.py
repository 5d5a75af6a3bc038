"""Metric backends for a run: console (progress bar + compact table), JSONL, TensorBoard,
and Weights & Biases in offline mode — the last two only when installed.

A long run logs one record a step, so ``RunLogger.history`` keeps only the latest
``history_size`` of them in memory; the complete record is ``metrics.jsonl`` in the run
directory, which ``read_history`` (or ``RunLogger.full_history``) reads back for the curves
and the summary at the end of a run, including the steps before a resume.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("forge.metrics")

CONSOLE_KEYS = [("reward/mean", "reward"), ("eval/accuracy", "eval acc"), ("trainer/loss", "loss"),
                ("trainer/kl", "kl"), ("trainer/entropy", "entropy"), ("time/step_s", "step s"),
                ("time/weight_sync_s", "sync s"), ("generate/tokens_per_s", "gen tok/s"),
                ("buffer/staleness", "stale")]
HISTORY_SIZE = 1000  # records kept in memory; metrics.jsonl has all of them


class RunLogger:
    """Writes each step's metrics to the chosen backends under ``run_dir``."""

    def __init__(self, run_dir: Path, backends: list[str], total_steps: int, log_every: int,
                 first_step: int = 0, history_size: int = HISTORY_SIZE) -> None:
        self.run_dir = run_dir
        self.log_every = log_every
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history_size)  # the latest
        self.jsonl_path = run_dir / "metrics.jsonl" if "jsonl" in backends else None
        self._jsonl = open(self.jsonl_path, "a") if self.jsonl_path else None
        self._tensorboard = self._open_tensorboard() if "tensorboard" in backends else None
        self._wandb = self._open_wandb() if "wandb" in backends else None
        self._bar = None
        if "console" in backends:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=first_step, desc="GRPO", unit="step",
                             dynamic_ncols=True, file=sys.stdout)
        self._header_printed = False

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; skipping that backend")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _open_wandb(self) -> Any:
        try:
            import wandb
        except ImportError:
            logger.info("wandb is not installed; skipping that backend")
            return None
        os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(project="forge", dir=str(self.run_dir), mode="offline")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tensorboard:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(metrics), refresh=False)
            if step % self.log_every == 0:
                self._bar.write(self._row(step, metrics))

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """A few recent episodes, to see what the policy does and not only averages: each
        ``{"prompt", "turns": [{"role", "text"}], "reward", ...}``. The console shows the
        latest one; ``samples.jsonl`` and TensorBoard (text) all of them."""
        if self.jsonl_path is not None:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "samples": samples}) + "\n")
        if self._tensorboard:
            self._tensorboard.add_text("rollouts", "\n\n".join(_markdown(s) for s in samples), step)
        if self._wandb:
            import wandb

            table = wandb.Table(columns=["prompt", "conversation", "reward"],
                                data=[[s["prompt"], _one_line(s), s["reward"]] for s in samples])
            self._wandb.log({"rollouts": table}, step=step)
        if self._bar is not None:
            self._bar.write(f"  sample at step {step}: {_one_line(samples[-1])}  reward={samples[-1]['reward']:.2f}")

    @staticmethod
    def _postfix(metrics: dict[str, float]) -> str:
        parts = []
        for key, label in CONSOLE_KEYS[:3]:
            if key in metrics:
                parts.append(f"{label}={metrics[key]:.3f}")
        return " ".join(parts)

    def _row(self, step: int, metrics: dict[str, float]) -> str:
        cells = [f"{step:>6}"]
        for key, label in CONSOLE_KEYS:
            value = metrics.get(key)
            cells.append(f"{value:>{max(len(label), 8)}.3f}" if value is not None else " " * max(len(label), 8))
        row = " ".join(cells)
        if not self._header_printed:
            self._header_printed = True
            header = " ".join([f"{'step':>6}"] + [f"{label:>{max(len(label), 8)}}" for _, label in CONSOLE_KEYS])
            return header + "\n" + row
        return row

    def full_history(self) -> list[dict[str, Any]]:
        """Every record of the run, read back from ``metrics.jsonl`` (with the steps logged
        before a resume); without the jsonl backend only the in-memory latest records."""
        if self.jsonl_path is None:
            return list(self.history)
        if self._jsonl and not self._jsonl.closed:
            self._jsonl.flush()
        return read_history(self.jsonl_path)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tensorboard:
            self._tensorboard.close()
        if self._wandb:
            self._wandb.finish()


def _one_line(sample: dict[str, Any]) -> str:
    """``prompt | policy: ... | env: ...`` with newlines shown as \\n."""
    parts = [repr(sample["prompt"])] + [f"{t['role']}: {t['text']!r}" for t in sample["turns"]]
    return " | ".join(parts)


def _markdown(sample: dict[str, Any]) -> str:
    turns = "  \n".join(f"**{t['role']}**: `{t['text']}`" for t in sample["turns"])
    return f"**prompt**: `{sample['prompt']}`  \n{turns}  \n**reward**: {sample['reward']:.3f}"


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order; blank lines are skipped."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history: Sequence[dict[str, Any]], path: Path, window: int = 10) -> Path:
    """A PNG with the reward (per step and moving mean) and eval accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "reward/mean" in h]
    rewards = [h["reward/mean"] for h in history if "reward/mean" in h]
    moving = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    evals = [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward (per step)")
    ax.plot(steps, moving, color="tab:blue", label=f"mean reward ({window}-step moving mean)")
    if evals:
        ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", color="tab:orange", label="eval accuracy (greedy)")
    ax.set_xlabel("train step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("GRPO: reward and accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
