"""Typed engine and sampling configuration, validated at the edge (no torch here).

``EngineConfig`` takes the seeds' keys (``model``, ``tensor_parallel_size``,
``pipeline_parallel_size``, ``enforce_eager``) plus Forge's own (``backend``, ``dtype``,
``max_num_seqs``, ``max_model_len``, ``device``, ``seed``). ``SamplingParams`` takes the
seeds' ``n``, ``max_tokens``, ``temperature``, ``top_p`` plus ``top_k``, stop tokens,
``ignore_eos`` and ``seed``. Unknown keys and bad values raise ``ValueError`` naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

BACKENDS = ("native", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


def _from_mapping(cls: type, values: Mapping[str, Any] | Any | None, what: str) -> Any:
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a dict or {cls.__name__}, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys are {sorted(names)}")
    return cls(**dict(values))


def _int(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy.

    Returned logprobs are ``log_softmax(logits / temperature)`` of each sampled token in
    fp32 — temperature applied, top-k/top-p truncation not applied — so a trainer
    reproduces them with a plain log-softmax at the same temperature. With
    ``temperature=0`` they are ``log_softmax(logits)``.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    ignore_eos: bool = False
    seed: int | None = None  # same seed and prompt -> same samples

    def __post_init__(self) -> None:
        _int("sampling n", self.n, 1)
        _int("sampling max_tokens", self.max_tokens, 1)
        _int("sampling top_k", self.top_k, 0)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"sampling temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _int("sampling seed", self.seed, 0)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"sampling stop_token_ids must be ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        return _from_mapping(cls, values, "sampling_config")

    def merged(self, overrides: Mapping[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        """These defaults with ``overrides`` applied (a per-call ``sampling_config``)."""
        if overrides is None:
            return self
        if isinstance(overrides, SamplingParams):
            return overrides
        _from_mapping(SamplingParams, overrides, "sampling_config")  # names the bad key
        return dataclasses.replace(self, **dict(overrides))


@dataclass(frozen=True)
class EngineConfig:
    """How a Policy replica builds its engine."""

    model: str = "tiny"  # preset name, local HF directory, or hf://org/name in the local cache
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = False  # vLLM: no CUDA graphs; the native engine is always eager
    backend: str = "native"  # "native" (PyTorch, CPU or CUDA) or "vllm" (GPU, optional)
    dtype: str = "float32"
    max_num_seqs: int = 128  # KV-cache slots: sequences decoded at once
    max_model_len: int = 512  # prompt + completion tokens per sequence; sizes the KV cache
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    extra: dict = field(default_factory=dict)  # passed to vLLM's engine arguments as is

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"engine_config model must be a non-empty string, got {self.model!r}")
        _int("engine_config tensor_parallel_size", self.tensor_parallel_size, 1)
        _int("engine_config pipeline_parallel_size", self.pipeline_parallel_size, 1)
        _int("engine_config max_num_seqs", self.max_num_seqs, 1)
        _int("engine_config max_model_len", self.max_model_len, 2)
        _int("engine_config seed", self.seed, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"engine_config backend {self.backend!r} is not one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"engine_config dtype {self.dtype!r} is not one of {DTYPES}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"engine_config enforce_eager must be True or False, got {self.enforce_eager!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"engine_config device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.backend == "native" and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError(
                "the native engine runs one process per replica: tensor_parallel_size and "
                "pipeline_parallel_size must be 1 (use backend='vllm' on GPUs for model parallelism)"
            )

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "EngineConfig" | None) -> "EngineConfig":
        return _from_mapping(cls, values, "engine_config")
