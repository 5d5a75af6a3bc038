"""vLLM behind the native engine's interface (optional; CUDA GPUs with ``vllm`` installed).

Concurrent ``generate`` calls are gathered into one ``LLM.generate`` batch, run in a
worker thread so the actor keeps receiving messages; a weight update takes the same
lock, so it never lands in the middle of a batch and a completion never mixes versions.

Logprobs: vLLM reports the logprob of each sampled token (``logprobs=0``). Which
distribution that is (raw or temperature-processed) depends on the vLLM version's
``logprobs_mode``; pass ``engine_config.extra={"logprobs_mode": "processed_logprobs"}``
where supported to match the native engine's temperature-applied convention.

This adapter has not been run in Forge's CI (no GPU there); the native engine is the
tested default.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.scheduler import FINISH_LENGTH, FINISH_STOP


@dataclass
class _Sample:
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class _Result:
    version: int
    sequences: list[_Sample] = field(default_factory=list)


class VllmEngine:
    """``GenerationEngine`` (forge.engine.interface) backed by ``vllm.LLM``."""

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        import torch
        import vllm

        if not torch.cuda.is_available():
            raise ValueError("engine_config backend='vllm' needs a CUDA GPU; none is visible in this process")
        self._vllm = vllm
        passed = ("tensor_parallel_size", "pipeline_parallel_size", "enforce_eager", "dtype", "max_model_len",
                  "max_num_seqs", "seed")  # EngineConfig fields that are vLLM engine arguments of the same name
        self.llm = vllm.LLM(model=str(model_path), **{name: getattr(config, name) for name in passed},
                            **config.extra)
        self.version = 0
        self._lock = asyncio.Lock()
        self._pending: list[tuple[list[int], SamplingParams, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def _params(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, seed=params.seed,
            stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, logprobs=0,
        )

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> _Result:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_ids, params, done))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            async with self._lock:
                version = self.version
                try:
                    outputs = await asyncio.to_thread(
                        self.llm.generate,
                        [{"prompt_token_ids": ids} for ids, _, _ in batch],
                        [self._params(p) for _, p, _ in batch],
                        use_tqdm=False,
                    )
                except Exception as e:  # every caller of the batch sees the failure
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(e)
                    continue
            for (_, _, done), output in zip(batch, outputs):
                if not done.done():
                    done.set_result(self._result(output, version))

    @staticmethod
    def _result(output: Any, version: int) -> _Result:
        result = _Result(version)
        for index, sample in enumerate(output.outputs):
            logprobs = [
                float(step[token].logprob) if step and token in step else float("nan")
                for token, step in zip(sample.token_ids, sample.logprobs or [None] * len(sample.token_ids))
            ]
            reason = FINISH_LENGTH if sample.finish_reason == "length" else FINISH_STOP
            result.sequences.append(_Sample(index, list(sample.token_ids), logprobs, reason))
        return result

    async def update_weights(self, state_dict: dict, version: int) -> None:
        async with self._lock:
            items = list(state_dict.items())

            def load(worker: Any) -> None:
                worker.model_runner.model.load_weights(weights=items)

            await asyncio.to_thread(self.llm.collective_rpc, load)
            self.version = version

    def statistics(self) -> dict[str, Any]:
        return {"version": self.version, "waiting": len(self._pending)}

    def state_dict(self) -> dict[str, Any]:
        raise ValueError("the vLLM engine does not hand out a copy of its weights; compare the trainer's "
                         "instead (RLTrainer.weights)")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for _, _, done in self._pending:
            if not done.done():
                done.cancel()
        self._pending = []
