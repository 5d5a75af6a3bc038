"""The native PyTorch generation engine (CPU and CUDA) and its asyncio front.

``NativeEngine.step()`` is one iteration of continuous batching: admit waiting requests
into free KV slots and prefill them together, then decode one token for every running
sequence. ``AsyncEngine`` runs steps in a task it owns while there is work, so every
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
from forge.engine.runner import ModelRunner
from forge.engine.sampler import sample
from forge.engine.scheduler import Request, Scheduler

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
        self.runner = ModelRunner(model, config.max_num_seqs, config.max_model_len)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_model_len, eos_token_ids)
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.version = 0
        self.num_generated_tokens = 0

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
        if admitted:
            self._prefill(admitted)
            touched.update(admitted)
        if decoding:
            self._decode(decoding)
        return [r for r in touched if r.is_finished]

    def _generators(self, request: Request) -> None:
        for sequence in request.sequences:
            if request.params.seed is not None:
                seed = request.params.seed * 1_000_003 + sequence.index
                sequence.generator = torch.Generator(device=self.runner.device).manual_seed(seed)

    def _prefill(self, requests: list[Request]) -> None:
        for request in requests:
            request.version = self.version
            request.metadata["admitted_at"] = time.monotonic()
            self._generators(request)
        logits = self.runner.prefill([r.prompt_ids for r in requests], [r.sequences[0].slot for r in requests])
        rows, sequences = [], []
        for row, request in enumerate(requests):
            if request.params.n > 1:
                self.runner.copy_slot(
                    request.sequences[0].slot, [s.slot for s in request.sequences[1:]], len(request.prompt_ids)
                )
            for sequence in request.sequences:
                rows.append(row)
                sequences.append(sequence)
        self._sample_into(logits[rows], sequences)

    def _decode(self, sequences: list) -> None:
        positions = [s.next_position for s in sequences]
        logits = self.runner.decode(
            [s.token_ids[-1] for s in sequences], positions, [s.slot for s in sequences], max(positions) + 1
        )
        self._sample_into(logits, sequences)

    def _sample_into(self, logits: torch.Tensor, sequences: list) -> None:
        tokens, logprobs = sample(
            logits, [s.request.params for s in sequences], [s.generator for s in sequences], self.generator
        )
        for sequence, token, logprob in zip(sequences, tokens, logprobs):
            self.scheduler.append(sequence, token, logprob)
        self.num_generated_tokens += len(tokens)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        assert not self.scheduler.running, "weights may only change between sequences"
        self.runner.load_state_dict(state_dict)
        self.version = version


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

    def statistics(self) -> dict[str, Any]:
        engine = self.engine
        return {**engine.scheduler.statistics(), "version": engine.version,
                "generated_tokens": engine.num_generated_tokens}

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
