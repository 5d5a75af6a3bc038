"""vLLM behind the native engine's interface (optional; CUDA GPUs with ``vllm`` installed).

Construction is split in two so the adapter's logic runs in unit tests without vLLM or a
GPU: ``VllmEngine.create(model_path, config)`` imports vLLM, checks CUDA and builds
``vllm.LLM``; ``VllmEngine(llm, config, sampling_params_cls)`` does the batching, weight
swaps and output conversion on any object with ``LLM``'s ``generate``, ``collective_rpc``
and ``reset_prefix_cache`` (tests/unit/test_vllm_adapter.py drives it with a recording
stand-in).

Batching: concurrent ``generate`` calls are gathered into one ``LLM.generate`` batch, run
in a worker thread so the actor keeps receiving messages. A weight update takes the same
lock, so it never lands in the middle of a batch and a completion never mixes versions.

Logprobs: the LLM is built with ``logprobs_mode="processed_logprobs"`` (unless
``engine_config.extra`` names another mode), so the logprob vLLM reports for each sampled
token is taken after temperature scaling, the native engine's convention. vLLM's default,
``raw_logprobs``, is ``log_softmax`` of the unscaled logits: at any temperature other than
1 the trainer's importance ratios would then compare two different distributions. One
difference remains: vLLM's processed logprobs are taken after top-k/top-p truncation too
(renormalized over the kept tokens), while the native engine's are not; with ``top_k=0``
and ``top_p=1`` (Forge's GRPO configs) the two agree. A sampled token without a logprob is
an error naming the request, sample and position, never a NaN passed on to the loss.

Weights: ``update_weights`` loads the new tensors into every worker's model
(``worker.model_runner.model.load_weights``, through ``LLM.collective_rpc`` with a
callable), then resets vLLM's prefix cache, so no prompt reuses KV blocks computed with
the old weights; a reset vLLM refuses is an error, since serving on from a stale cache
would silently mix versions. The version changes only after both steps.

Prefix caching: ``enable_prefix_caching`` is passed to vLLM as is; vLLM's cache lives in
its own paged KV pool, so the native engine's ``prefix_cache_tokens`` budget does not apply.

``create`` runs vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless the environment sets it): with the default separate engine-core process, a
callable cannot cross vLLM's msgpack channel unless ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``,
and the weights would be pickled through a socket on every step. In this process, with
one GPU per replica, the callable runs directly on the worker and copies from the weight
store's shared memory into the GPU (with ``tensor_parallel_size > 1`` vLLM pickles it,
weights included, to its worker processes: correct, but a copy per worker).

Checked against vLLM's source (vllm-project/vllm, ``vllm/entrypoints/llm.py``,
``vllm/config/model.py``, ``vllm/v1/sample/ops/topk_topp_sampler.py``,
``vllm/v1/core/block_pool.py``, ``vllm/v1/serial_utils.py``,
``vllm/v1/engine/llm_engine.py``): ``LogprobsMode`` is ``raw_logits | raw_logprobs |
processed_logits | processed_logprobs``, an engine argument (``ModelConfig.logprobs_mode``);
``LLM.reset_prefix_cache(reset_running_requests=False, reset_connector=False) -> bool``
returns False while any KV block is still held by a request; ``LLM.collective_rpc(method,
timeout, args, kwargs)`` takes a method name or a callable whose first argument is the
worker. This adapter has not been run in Forge's CI (no GPU there); the native engine is
the tested default.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.scheduler import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP

LOGPROBS_MODE = "processed_logprobs"
# EngineConfig fields that are vLLM engine arguments of the same name.
ENGINE_ARGUMENTS = ("tensor_parallel_size", "pipeline_parallel_size", "enforce_eager", "dtype", "max_model_len",
                    "max_num_seqs", "seed", "enable_prefix_caching")
FINISH_REASONS = {"length": FINISH_LENGTH, "stop": FINISH_STOP}
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
PICKLE_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"


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


def engine_arguments(config: EngineConfig) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments besides ``model``: processed logprobs unless
    ``config.extra`` (passed as is, last) chooses otherwise."""
    return {**{name: getattr(config, name) for name in ENGINE_ARGUMENTS}, "logprobs_mode": LOGPROBS_MODE,
            **config.extra}


def convert_output(output: Any, version: int) -> _Result:
    """A vLLM ``RequestOutput`` as the engine interface's result.

    Raises ValueError when a sampled token has no logprob: a NaN would pass through the
    trainer's importance ratios and poison the step without saying where it came from.
    """
    result = _Result(version)
    for sample in output.outputs:
        steps = sample.logprobs
        logprobs = []
        for position, token in enumerate(sample.token_ids):
            step = steps[position] if steps is not None and position < len(steps) else None
            entry = step.get(token) if step else None
            if entry is None:
                raise ValueError(
                    f"vLLM returned no logprob for sampled token {token} of request {output.request_id!r}, sample "
                    f"{sample.index}, position {position} (logprobs {'missing' if steps is None else 'incomplete'}); "
                    "the adapter asks for the sampled token's logprob with logprobs=0")
            logprobs.append(float(entry.logprob))
        reason = FINISH_REASONS.get(sample.finish_reason, FINISH_ABORT)
        result.sequences.append(_Sample(sample.index, list(sample.token_ids), logprobs, reason))
    return result


class VllmEngine:
    """``GenerationEngine`` (forge.engine.interface) backed by a ``vllm.LLM``."""

    def __init__(self, llm: Any, config: EngineConfig, sampling_params_cls: Callable[..., Any]) -> None:
        self.llm = llm
        self.config = config
        self._sampling_params_cls = sampling_params_cls
        self.version = 0
        self.vocab_size = NO_LIMIT  # set by create() from the model's config.json
        self._lock = asyncio.Lock()
        self._pending: list[tuple[list[int], SamplingParams, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    @classmethod
    def create(cls, model_path: Path, config: EngineConfig) -> VllmEngine:
        """Build ``vllm.LLM`` for ``model_path`` (see the module docstring for the settings)."""
        import torch

        if not torch.cuda.is_available():
            raise ValueError("engine_config backend='vllm' needs a CUDA GPU; none is visible in this process")
        os.environ.setdefault(IN_PROCESS_ENV, "0")
        if os.environ[IN_PROCESS_ENV] != "0" and os.environ.get(PICKLE_ENV) != "1":
            raise ValueError(
                f"{IN_PROCESS_ENV}={os.environ[IN_PROCESS_ENV]} runs vLLM's engine core in another process, where "
                f"the weight loader cannot be sent unless {PICKLE_ENV}=1; unset {IN_PROCESS_ENV} (Forge runs it "
                "in the Policy's process) or set both")
        import vllm

        llm = vllm.LLM(model=str(model_path), **engine_arguments(config))
        engine = cls(llm, config, vllm.SamplingParams)
        engine.vocab_size = _vocab_size(model_path)
        return engine

    def _params(self, params: SamplingParams) -> Any:
        """vLLM sampling parameters: the sampled token's logprob only (``logprobs=0``), and
        no detokenizing: the Policy decodes the token ids itself, and a preset with a padded
        vocabulary samples ids its tokenizer does not have."""
        return self._sampling_params_cls(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, seed=params.seed,
            stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, logprobs=0,
            detokenize=False,
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
            try:
                async with self._lock:
                    version = self.version
                    outputs = await asyncio.to_thread(
                        self.llm.generate,
                        [{"prompt_token_ids": ids} for ids, _, _ in batch],
                        [self._params(p) for _, p, _ in batch],
                        use_tqdm=False,
                    )
                for (_, _, done), output in zip(batch, outputs):
                    if done.done():
                        continue
                    try:
                        done.set_result(convert_output(output, version))
                    except ValueError as e:
                        done.set_exception(e)
            except Exception as e:  # every caller of the batch sees the failure
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(e)
            finally:  # cancelled (close): no caller of this batch waits forever
                for _, _, done in batch:
                    if not done.done():
                        done.cancel()

    def _swap_weights(self, items: list[tuple[str, Any]]) -> None:
        def load(worker: Any) -> None:
            worker.model_runner.model.load_weights(weights=items)

        self.llm.collective_rpc(load)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to reset its prefix cache after a weight update (KV blocks still held by a "
                "request), so prompts could reuse KV computed with the old weights; this replica now holds new "
                "weights under the old version and must be rebuilt")

    async def update_weights(self, weights: Mapping[str, Any], version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self._swap_weights, list(weights.items()))
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


NO_LIMIT = 1 << 62


def _vocab_size(model_path: Path) -> int:
    """The model's vocabulary size from its ``config.json`` (a multimodal model's text
    config's), the size vLLM embeds; no limit when the file does not say."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return NO_LIMIT
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if isinstance(size, int) and size > 0 else NO_LIMIT
