"""Continuous-batching bookkeeping for the native engine, free of torch.

The KV cache has ``num_slots`` fixed slots of ``max_model_len`` positions (sized once
from the config, never grown per token). A request of ``n`` samples takes ``n`` slots
when admitted and gives each back the moment that sample finishes, so requests join
and leave the running batch at every decode step.

As in vLLM, a sequence ends with ``"length"`` at ``max_tokens`` new tokens or when prompt
plus completion fill ``max_model_len``, whichever comes first; only a prompt that leaves
no room for one new token is refused.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from forge.engine.config import SamplingParams

FINISH_STOP = "stop"  # EOS or a stop token was sampled
FINISH_LENGTH = "length"  # max_tokens reached, or max_model_len filled
FINISH_ABORT = "abort"  # the caller went away


@dataclass(eq=False)
class Sequence:
    """One of the ``n`` samples of a request, living in one KV-cache slot."""

    request: "Request"
    index: int
    slot: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    generator: Any = None  # the engine's per-sequence RNG when the request has a seed

    @property
    def next_position(self) -> int:
        """Cache position of the last sampled token, which the next decode step feeds."""
        return len(self.request.prompt_ids) + len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    version: int | None = None  # weights version the request was admitted under
    metadata: dict = field(default_factory=dict)

    @property
    def is_finished(self) -> bool:
        return bool(self.sequences) and all(s.is_finished for s in self.sequences)


class Scheduler:
    """Admits waiting requests into free slots and tracks the running sequences."""

    def __init__(self, num_slots: int, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(num_slots))  # a heap: lowest slots first, keeps the batch compact
        self.is_admitting = True  # False while weights are being swapped
        self._ids = itertools.count()

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room for a new token in the engine's "
                f"max_model_len={self.max_model_len}; shorten the prompt or raise engine_config max_model_len"
            )
        if params.n > self.num_slots:
            raise ValueError(
                f"n={params.n} samples exceed the engine's max_num_seqs={self.num_slots}; raise "
                "engine_config max_num_seqs or lower n"
            )
        request = Request(next(self._ids), list(prompt_ids), params)
        self.waiting.append(request)
        return request

    def admit(self) -> list[Request]:
        """Requests that start now (FIFO, while they fit), each with its slots taken."""
        admitted = []
        while self.is_admitting and self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
            request = self.waiting.popleft()
            request.sequences = [
                Sequence(request, i, heapq.heappop(self.free_slots)) for i in range(request.params.n)
            ]
            self.running.extend(request.sequences)
            admitted.append(request)
        return admitted

    def append(self, sequence: Sequence, token_id: int, logprob: float) -> None:
        """Record a sampled token and finish the sequence if it should stop."""
        sequence.token_ids.append(token_id)
        sequence.logprobs.append(logprob)
        params = sequence.request.params
        if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
            self._finish(sequence, FINISH_STOP)
        elif (len(sequence.token_ids) >= params.max_tokens
              or len(sequence.request.prompt_ids) + len(sequence.token_ids) >= self.max_model_len):
            self._finish(sequence, FINISH_LENGTH)

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        for sequence in request.sequences:
            if not sequence.is_finished:
                self._finish(sequence, FINISH_ABORT)

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.finish_reason = reason
        self.running.remove(sequence)
        heapq.heappush(self.free_slots, sequence.slot)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (self.is_admitting and bool(self.waiting))

    def statistics(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "running": len(self.running), "free_slots": len(self.free_slots)}
