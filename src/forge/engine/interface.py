"""The interface every generation engine implements, and ``build_engine`` to make one.

``Policy`` is a thin shell over a ``GenerationEngine``: it tokenizes, calls
``generate``, and turns the result into ``Completion``s. Two engines implement it: the
native PyTorch engine (``forge.engine.native.AsyncEngine``, CPU and CUDA) and the vLLM
adapter (``forge.engine.vllm_adapter.VllmEngine``, GPUs). Nothing outside an engine
reaches into its internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

from forge.engine.config import EngineConfig, SamplingParams

if TYPE_CHECKING:  # the interface itself needs no torch: importing forge.engine stays light
    import torch


class GeneratedSequence(Protocol):
    """One of the ``n`` samples of a request."""

    index: int
    token_ids: list[int]
    logprobs: list[float]  # log_softmax(logits / temperature) of each sampled token, fp32
    finish_reason: str | None  # "stop" | "length" | "abort"


class GeneratedRequest(Protocol):
    """A finished request: its samples and the weight version that made every token of them."""

    version: int
    sequences: Sequence[GeneratedSequence]


@runtime_checkable
class GenerationEngine(Protocol):
    @property
    def version(self) -> int:
        """The weight version in effect (0 until the first ``update_weights``)."""

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds: a prompt of ids must stay below it."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GeneratedRequest:
        """``params.n`` samples of one prompt; concurrent calls share the engine's batch."""

    async def update_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Load ``weights`` (Hugging Face names) as ``version``; running sequences finish first,
        so no completion mixes two versions."""

    def statistics(self) -> dict[str, Any]:
        """Counters for ``Policy.engine_stats``: at least ``version``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the current weights (checks on small models)."""

    async def close(self) -> None:
        """Stop background work; pending requests are aborted."""


def build_engine(config: EngineConfig, model_path: Path, tokenizer: Any) -> GenerationEngine:
    """The engine ``config.backend`` names, serving the model in ``model_path``."""
    if config.backend == "vllm":
        from forge.engine.vllm_adapter import VllmEngine

        return VllmEngine.create(model_path, config)
    from forge.engine.native import AsyncEngine, NativeEngine, pick_device
    from forge.models import load_model

    model = load_model(model_path, config.dtype, pick_device(config), config.model_impl)
    eos = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    return AsyncEngine(NativeEngine(model, tuple(e for e in eos if e is not None), config))
