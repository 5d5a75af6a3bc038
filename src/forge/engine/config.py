"""Typed engine and sampling configuration, validated at the edge (no torch here).

``EngineConfig`` takes the seeds' keys (``model``, ``tensor_parallel_size``,
``pipeline_parallel_size``, ``enforce_eager``), vLLM's ``enable_prefix_caching``, plus
Forge's own (``backend``, ``dtype``, ``model_impl``, ``max_num_seqs``, ``max_model_len``, ``device``,
``seed``, ``prefix_cache_tokens``). ``SamplingParams`` takes the
seeds' ``n``, ``max_tokens``, ``temperature``, ``top_p`` plus ``top_k``, stop tokens,
``ignore_eos`` and ``seed``. Unknown keys and bad values raise ``ValueError`` naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from forge.engine.prefix_cache import BLOCK_SIZE
from forge.models.loading import MODEL_IMPLS
from forge.util.checks import check_bool, check_choice, check_int, check_number
from forge.util.config import build

BACKENDS = ("native", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


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
        check_int("sampling n", self.n, 1)
        check_int("sampling max_tokens", self.max_tokens, 1)
        check_int("sampling top_k", self.top_k, 0)
        check_number("sampling temperature", self.temperature, 0)
        check_number("sampling top_p", self.top_p, 0, 1, low_open=True)
        check_bool("sampling ignore_eos", self.ignore_eos)
        if self.seed is not None:
            check_int("sampling seed", self.seed, 0)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"sampling stop_token_ids must be ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        return build(cls, values, "sampling_config")

    def merged(self, overrides: Mapping[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        """These defaults with ``overrides`` applied (a per-call ``sampling_config``)."""
        if overrides is None:
            return self
        if isinstance(overrides, SamplingParams):
            return overrides
        if isinstance(overrides, Mapping) and set(overrides) <= _SAMPLING_FIELDS:
            return dataclasses.replace(self, **overrides)  # every field is checked in __post_init__
        build(SamplingParams, overrides, "sampling_config")  # names the bad key or value
        return dataclasses.replace(self, **dict(overrides))


_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True)
class EngineConfig:
    """How a Policy replica builds its engine."""

    model: str = "tiny"  # preset name, local HF directory, or hf://org/name in the local cache
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = False  # vLLM: no CUDA graphs; the native engine is always eager
    backend: str = "native"  # "native" (PyTorch, CPU or CUDA) or "vllm" (GPU, optional)
    dtype: str = "float32"
    model_impl: str = "auto"  # native backend: "auto", "forge" (Forge's decoder) or "transformers"
    max_num_seqs: int = 128  # KV-cache slots: sequences decoded at once
    max_model_len: int = 512  # prompt + completion tokens per sequence; sizes the KV cache
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    enable_prefix_caching: bool = True  # reuse the K/V of prompt prefixes computed before (vLLM's name)
    prefix_cache_tokens: int = 0  # native engine: tokens of cached K/V kept; 0: auto (prefix_cache_blocks)
    extra: dict = field(default_factory=dict)  # passed to vLLM's engine arguments as is

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"engine_config model must be a non-empty string, got {self.model!r}")
        check_int("engine_config tensor_parallel_size", self.tensor_parallel_size, 1)
        check_int("engine_config pipeline_parallel_size", self.pipeline_parallel_size, 1)
        check_int("engine_config max_num_seqs", self.max_num_seqs, 1)
        check_int("engine_config max_model_len", self.max_model_len, 2)
        check_int("engine_config seed", self.seed, 0)
        check_choice("engine_config backend", self.backend, BACKENDS)
        check_choice("engine_config dtype", self.dtype, DTYPES)
        check_choice("engine_config model_impl", self.model_impl, MODEL_IMPLS)
        check_bool("engine_config enforce_eager", self.enforce_eager)
        check_bool("engine_config enable_prefix_caching", self.enable_prefix_caching)
        check_int("engine_config prefix_cache_tokens", self.prefix_cache_tokens, 0)
        if 0 < self.prefix_cache_tokens < BLOCK_SIZE:
            raise ValueError(
                f"engine_config prefix_cache_tokens must be 0 (auto) or at least one block of {BLOCK_SIZE} "
                f"tokens, got {self.prefix_cache_tokens!r}; set enable_prefix_caching=False to turn the cache off")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"engine_config device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.backend == "native" and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError(
                "the native engine runs one process per replica: tensor_parallel_size and "
                "pipeline_parallel_size must be 1 (use backend='vllm' on GPUs for model parallelism)"
            )

    @property
    def prefix_cache_blocks(self) -> int:
        """The native engine's prefix-cache budget in blocks of ``BLOCK_SIZE`` tokens.

        Auto (``prefix_cache_tokens=0``) is the slot cache's own capacity, ``max_num_seqs *
        max_model_len`` tokens: like vLLM, whose cache is its whole KV pool, it can hold a
        full batch of conversations, and at worst it doubles the KV memory. The pool is grown
        as blocks are first cached, so a budget never reached costs nothing; where it cannot
        grow (out of GPU memory), the engine keeps the pool it has as the budget.
        """
        if not self.enable_prefix_caching:
            return 0
        return (self.prefix_cache_tokens or self.max_num_seqs * self.max_model_len) // BLOCK_SIZE

    @classmethod
    def parse(cls, values: Mapping[str, Any] | "EngineConfig" | None) -> "EngineConfig":
        return build(cls, values, "engine_config")
