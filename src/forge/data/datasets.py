"""Prompt sources for RL: the embedded arithmetic task and local data sets.

A source yields dicts with the seeds' fields: ``request`` (what the policy sees:
a string, or chat messages when a chat template is used), ``target`` (the answer the
reward compares with), ``question`` and ``answer`` (the raw fields), and ``index`` (the
row's position, for exact resume). ``DatasetState`` is the position: epoch and offset
in a seeded permutation, so ``state_dict`` / ``load_state_dict`` resume exactly.

Local data sets are read without a network: a Hugging Face ``save_to_disk`` directory,
a JSONL file or a parquet file, with configurable question/answer fields; GSM8K-style
answers (``... #### 42``) become ``42``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ArithmeticTask:
    """``a+b=`` with single-digit operands and single-digit sums (55 prompts by default).

    A random policy answers right about 2% of the time; a tiny transformer learns it by
    RL alone within minutes on a CPU. Why single-token answers: README, "The default task,
    and why it is built this way".
    """

    max_operand: int = 9
    max_sum: int = 9
    min_operand: int = 0  # e.g. 10: two-digit operands only (the tool-use demo's task)

    def rows(self) -> list[dict[str, str]]:
        return [
            {"question": f"{a}+{b}=", "answer": str(a + b)}
            for a in range(self.min_operand, self.max_operand + 1)
            for b in range(self.min_operand, self.max_operand + 1)
            if a + b <= self.max_sum
        ]


def gsm8k_target(answer: str) -> str:
    """``"... #### 1,234"`` -> ``"1234"``; anything else unchanged (stripped)."""
    if "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def load_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local data set: HF ``save_to_disk`` directory, ``.jsonl`` or ``.parquet``."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"data set {path} has splits {sorted(loaded)}, not {split!r}")
                loaded = loaded[split]
            return [dict(row) for row in loaded]
        candidates = sorted(path.glob(f"{split}*.jsonl")) + sorted(path.glob(f"{split}*.parquet"))
        if not candidates:
            raise ValueError(f"{path} is not a saved Hugging Face data set and has no {split}*.jsonl/.parquet file")
        return [row for c in candidates for row in load_rows(c, split)]
    if not path.exists():
        raise ValueError(f"data set {path} does not exist (Forge reads local files only)")
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"data set file {path} must be .jsonl or .parquet, or a save_to_disk directory")


@dataclass
class DatasetState:
    epoch: int = 0
    offset: int = 0


class PromptSource:
    """Seeded, epoch-wise shuffled prompts with an exact, resumable position."""

    def __init__(self, rows: list[dict[str, Any]], question_field: str = "question", answer_field: str = "answer",
                 seed: int = 0, tokenizer: Any = None, use_chat_template: bool = False,
                 system_prompt: str | None = None) -> None:
        if not rows:
            raise ValueError("the data set is empty")
        missing = {question_field, answer_field} - set(rows[0])
        if missing:
            raise ValueError(f"data set rows have fields {sorted(rows[0])}; missing {sorted(missing)} "
                             "(set question_field / answer_field)")
        self.rows = rows
        self.question_field, self.answer_field = question_field, answer_field
        self.seed = seed
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.state = DatasetState()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def request(self, question: str) -> Any:
        if not self.use_chat_template:
            return question
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        return messages + [{"role": "user", "content": question}]

    def row(self, index: int) -> dict[str, Any]:
        raw = self.rows[index]
        question, answer = str(raw[self.question_field]), str(raw[self.answer_field])
        return {"request": self.request(question), "target": gsm8k_target(answer),
                "question": question, "answer": answer, "index": index}

    def sample(self) -> dict[str, Any]:
        if self.state.offset >= len(self._order):
            self.state = DatasetState(self.state.epoch + 1, 0)
            self._order = self._permutation(self.state.epoch)
        index = self._order[self.state.offset]
        self.state.offset += 1
        return dict(self.row(index), epoch=self.state.epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "offset": self.state.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = DatasetState(int(state["epoch"]), int(state["offset"]))
        self._order = self._permutation(self.state.epoch)
