"""The native PyTorch generation engine (CPU and CUDA) and its asyncio front.

``NativeEngine.step()`` is one iteration of continuous batching: admit waiting requests
into free KV slots and prefill them together, then decode one token for every running
sequence. With prefix caching (``EngineConfig.enable_prefix_caching``, on by default) an
admitted request first gets the cached K/V of its prompt's longest cached prefix copied
into its slot and prefills only the rest; its prompt's blocks are cached after prefill,
and the blocks of prompt plus completion when a sample finishes, so the next turn of a
conversation computes only its new tokens (``prefix_cache.py`` has the bookkeeping).
``AsyncEngine`` runs steps in a task it owns while there is work, so every
``generate()`` awaiting on the same engine shares the batch; a weight update pauses
admission, lets the running sequences finish, swaps weights and resumes, so a
completion never mixes two weight versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.prefix_cache import BLOCK_SIZE, PrefixCache
from forge.engine.runner import ModelRunner
from forge.engine.sampler import sample
from forge.engine.scheduler import Request, Scheduler, Sequence

logger = logging.getLogger("forge.engine")


def pick_device(config: EngineConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"engine_config device={config.device!r} but CUDA is not available here")
    return config.device


class NativeEngine:
    """Synchronous core: add requests, call ``step()`` until they finish."""

    def __init__(self, model: Any, eos_token_ids: tuple[int, ...], config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(model, config.max_num_seqs, config.max_model_len, config.prefix_cache_blocks)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_model_len, eos_token_ids)
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks) if config.enable_prefix_caching else None
        self.version = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens_cached = 0  # prompt tokens whose K/V came from the prefix cache
        self.num_prompt_tokens_computed = 0  # prompt tokens prefilled

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        return self.scheduler.add(prompt_ids, params)

    def abort(self, request: Request) -> None:
        self.scheduler.abort(request)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Request]:
        """One scheduling iteration; returns the requests that finished in it."""
        scheduler = self.scheduler
        decoding = sorted(scheduler.running, key=lambda s: s.slot)  # all have a token; slot order
        admitted = scheduler.admit()
        touched: set[Request] = {s.request for s in decoding}
        finished: list[Sequence] = []
        if admitted:
            finished += self._prefill(admitted)
            touched.update(admitted)
        if decoding:
            finished += self._decode(decoding)
        if self.prefix_cache is not None and finished:  # before their slots are reused
            self._cache_blocks([(s.slot, s.request.prompt_ids + s.token_ids[:-1]) for s in finished])
        return [r for r in touched if r.is_finished]

    def _generators(self, request: Request) -> None:
        for sequence in request.sequences:
            if request.params.seed is not None:
                seed = request.params.seed * 1_000_003 + sequence.index
                sequence.generator = torch.Generator(device=self.runner.device).manual_seed(seed)

    def _prefill(self, requests: list[Request]) -> list[Sequence]:
        """Prefill the admitted requests and sample their first tokens; returns the samples
        that finished at once.

        With the prefix cache, requests whose uncached prefix another request of this batch
        is about to compute (a shared system prompt on a cold cache) are prefilled in a
        second forward, after the first one's blocks are cached. Sampling stays one call in
        admission order either way.
        """
        for request in requests:
            request.version = self.version
            request.metadata["admitted_at"] = time.monotonic()
            self._generators(request)
        waves = [requests]
        if self.prefix_cache is not None and len(requests) > 1:
            plan = self.prefix_cache.waves([r.prompt_ids for r in requests])
            waves = [w for w in ([r for r, i in zip(requests, plan) if i == wave] for wave in (0, 1)) if w]
        row_of: dict[Request, int] = {}
        parts = []
        for wave in waves:
            parts.append(self._prefill_wave(wave))
            row_of.update((request, len(row_of)) for request in wave)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        rows, sequences = [], []
        for request in requests:
            for sequence in request.sequences:
                rows.append(row_of[request])
                sequences.append(sequence)
        return self._sample_into(logits[rows], sequences)

    def _prefill_wave(self, requests: list[Request]) -> torch.Tensor:
        """Cached prefixes into the slots, the rest of each prompt prefilled, the prompts'
        blocks cached, the result shared with the other samples (n > 1); logits ``[R, V]``."""
        slots = [r.sequences[0].slot for r in requests]
        starts = self._load_cached_prefixes(requests, slots)
        logits = self.runner.prefill([r.prompt_ids for r in requests], slots, starts)
        self.num_prompt_tokens_cached += sum(starts)
        self.num_prompt_tokens_computed += sum(len(r.prompt_ids) for r in requests) - sum(starts)
        if self.prefix_cache is not None:
            self._cache_blocks([(slot, r.prompt_ids) for slot, r in zip(slots, requests)])
        for request in requests:
            if request.params.n > 1:
                self.runner.copy_slot(
                    request.sequences[0].slot, [s.slot for s in request.sequences[1:]], len(request.prompt_ids)
                )
        return logits

    def _load_cached_prefixes(self, requests: list[Request], slots: list[int]) -> list[int]:
        """Copy each prompt's longest cached prefix into its slot; the cached token counts.

        The prompt's last token is always computed: its logits give the first sample.
        """
        if self.prefix_cache is None:
            return [0] * len(requests)
        starts, copy_slots, copy_starts, copy_blocks = [], [], [], []
        for request, slot in zip(requests, slots):
            block_ids = self.prefix_cache.match(request.prompt_ids, len(request.prompt_ids) - 1)
            starts.append(len(block_ids) * BLOCK_SIZE)
            copy_slots += [slot] * len(block_ids)
            copy_starts += range(0, len(block_ids) * BLOCK_SIZE, BLOCK_SIZE)
            copy_blocks += block_ids
        if copy_blocks:
            self.runner.load_blocks(copy_slots, copy_starts, copy_blocks)
        return starts

    def _cache_blocks(self, entries: list[tuple[int, list[int]]]) -> None:
        """Cache the full blocks of each ``(slot, tokens)``, whose K/V are in that slot.

        If the block pool cannot grow (a GPU shared with other work), the cache is emptied
        and its budget becomes the pool it has: generation goes on with a smaller cache
        rather than failing every running request.
        """
        sources: dict[int, tuple[int, int]] = {}  # block id -> (slot, start)
        for slot, tokens in entries:
            for block_id, start in self.prefix_cache.insert(tokens):
                sources[block_id] = (slot, start)  # an id evicted and reused within the batch: the last owner wins
        if not sources:
            return
        block_ids = list(sources)
        try:
            self.runner.save_blocks([sources[b][0] for b in block_ids], [sources[b][1] for b in block_ids], block_ids)
        except Exception as e:
            self.prefix_cache.clear()  # no block may outlive a failed copy of its K/V
            if not isinstance(e, torch.OutOfMemoryError):
                raise
            logger.warning("prefix cache: no memory to grow its pool past %d blocks (budget %d); the budget is "
                           "now %d blocks", self.runner.num_pool_blocks, self.prefix_cache.budget_blocks,
                           self.runner.num_pool_blocks)
            self.prefix_cache.budget_blocks = self.runner.num_pool_blocks

    def _decode(self, sequences: list[Sequence]) -> list[Sequence]:
        positions = [s.next_position for s in sequences]
        logits = self.runner.decode(
            [s.token_ids[-1] for s in sequences], positions, [s.slot for s in sequences], max(positions) + 1
        )
        return self._sample_into(logits, sequences)

    def _sample_into(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[Sequence]:
        """Append one sampled token to each sequence; returns those that finished."""
        tokens, logprobs = sample(
            logits, [s.request.params for s in sequences], [s.generator for s in sequences], self.generator
        )
        for sequence, token, logprob in zip(sequences, tokens, logprobs):
            self.scheduler.append(sequence, token, logprob)
        self.num_generated_tokens += len(tokens)
        return [s for s in sequences if s.is_finished]

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """New weights; the prefix cache is emptied, since K/V computed by the old weights
        must never be reused."""
        assert not self.scheduler.running, "weights may only change between sequences"
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.runner.load_state_dict(state_dict)
        self.version = version

    def statistics(self) -> dict[str, int]:
        """Cumulative prompt-token and prefix-cache counters (zeros and a 0 budget when off)."""
        cache = self.prefix_cache if self.prefix_cache is not None else PrefixCache(0)
        return {"prompt_tokens_cached": self.num_prompt_tokens_cached,
                "prompt_tokens_computed": self.num_prompt_tokens_computed, **cache.statistics()}


class AsyncEngine:
    """Lets concurrent coroutines share one NativeEngine's batch (see module docstring)."""

    def __init__(self, engine: NativeEngine) -> None:
        self.engine = engine
        self._waiters: dict[Request, asyncio.Future] = {}
        self._stepper: asyncio.Task | None = None
        self._updating: asyncio.Lock | None = None  # one weight swap at a time
        self._nothing_running: asyncio.Event | None = None  # set by the stepper when no sequence runs

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        request = self.engine.add_request(prompt_ids, params)
        done = asyncio.get_running_loop().create_future()
        self._waiters[request] = done
        self._ensure_stepping()
        try:
            return await done
        except asyncio.CancelledError:
            self.engine.abort(request)
            raise
        finally:
            self._waiters.pop(request, None)

    def _ensure_stepping(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.ensure_future(self._step_while_busy())

    async def _step_while_busy(self) -> None:
        engine = self.engine
        try:
            while engine.has_work:
                for request in engine.step():
                    waiter = self._waiters.get(request)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(request)
                if not engine.scheduler.running and self._nothing_running is not None:
                    self._nothing_running.set()
                await asyncio.sleep(0)  # let new requests and other messages in
        except Exception as e:  # a failing step fails every request in it, loudly
            logger.exception("generation step failed")
            for request, waiter in list(self._waiters.items()):
                engine.abort(request)
                if not waiter.done():
                    waiter.set_exception(e)
            raise
        finally:
            if self._nothing_running is not None:  # the stepper stops: a weight swap waits no more
                self._nothing_running.set()

    async def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Pause admission, drain running sequences, load weights, resume."""
        if self._updating is None:
            self._updating, self._nothing_running = asyncio.Lock(), asyncio.Event()
        scheduler = self.engine.scheduler
        async with self._updating:
            scheduler.is_admitting = False
            try:
                while scheduler.running:  # the stepper sets the event when the last one finishes
                    self._nothing_running.clear()
                    self._ensure_stepping()
                    await self._nothing_running.wait()
                self.engine.load_weights(state_dict, version)
            finally:
                scheduler.is_admitting = True
                if scheduler.has_work:
                    self._ensure_stepping()

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def vocab_size(self) -> int:
        return int(self.engine.runner.model.get_input_embeddings().num_embeddings)

    def statistics(self) -> dict[str, Any]:
        engine = self.engine
        return {**engine.scheduler.statistics(), "version": engine.version,
                "generated_tokens": engine.num_generated_tokens, **engine.statistics()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.engine.runner.model.state_dict().items()}

    async def close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
            await asyncio.gather(self._stepper, return_exceptions=True)
        for request, waiter in list(self._waiters.items()):
            self.engine.abort(request)
            if not waiter.done():
                waiter.cancel()
