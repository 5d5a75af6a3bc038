"""``Policy``: the generation service of an RL loop.

    policy = await Policy.options(procs=1, num_replicas=2).as_service(
        engine_config={"model": "tiny", "max_model_len": 256},
        sampling_config={"n": 4, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0},
    )
    completions = await policy.generate.route("3+4=")

``generate`` is a concurrent endpoint: calls reaching one replica at the same time are
decoded together in the engine's continuous batch. ``update_weights`` waits for the
sequences in flight to finish before it swaps weights, so every token of a Completion
comes from the weights its ``generator_version`` names.
"""

from __future__ import annotations

import asyncio
import copyreg
import importlib.util
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monarch.actor import concurrent_endpoint, endpoint

from forge.controller import ForgeActor, replay_on_rebuild
from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.interface import GenerationEngine, build_engine
from forge.observability.metrics import record_metric
from forge.util.failpoints import failpoint

if TYPE_CHECKING:  # torch is imported where it is used: a service controller loads this
    import torch   # module to spawn replicas and need not pay for torch (seconds of CPU)


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    prompt: Any  # the prompt as given: a string, chat messages or token ids
    text: str  # decoded completion, special tokens removed
    prompt_ids: torch.Tensor  # [P] long
    token_ids: torch.Tensor  # [T] long
    logprobs: torch.Tensor  # [T] float32: log_softmax(logits / temperature) of each token
    stop_reason: str  # "stop" (EOS / stop token) or "length" (max_tokens)
    generator_version: int  # weights version that produced every token
    metadata: dict = field(default_factory=dict)

    def __reduce__(self) -> Any:
        # Small 1-D tensors travel as raw bytes: Monarch pickles tensors with torch.save,
        # which costs ~0.4 ms each and would dominate a batch of short completions.
        if type(self) is not Completion:  # a subclass, maybe with more fields: pickled whole
            return (copyreg.__newobj__, (type(self),), self.__dict__)
        return (
            _rebuild_completion,
            (self.prompt, self.text, _pack(self.prompt_ids), _pack(self.token_ids), _pack(self.logprobs),
             self.stop_reason, self.generator_version, self.metadata),
        )


class CompletionList(list):
    """The ``list[Completion]`` that ``generate`` returns, or the ``list[list[Completion]]``
    of ``generate_batch``: a plain list that travels column by column.

    Pickled item by item, a completion costs three small tensors, a dict and a dataclass
    on each side; a batch of a few hundred short completions then cost the generator more
    time to send than to decode. Here all token ids, all logprobs and all distinct prompts
    travel as three byte strings, and the receiver rebuilds each completion's tensors as
    views into them. Items of any other type (e.g. a subclass of ``Completion``) travel as
    a plain list does.
    """

    def __reduce__(self) -> Any:
        nested = bool(self) and all(type(x) in (list, CompletionList) for x in self)
        groups = list(self) if nested else [self]
        if not all(type(c) is Completion for group in groups for c in group):
            return (list, (list(self),))
        flat = [c for group in groups for c in group]
        prompt_index: dict[int, int] = {}
        prompts_ids = []
        for c in flat:  # the completions of one prompt share its prompt_ids tensor: sent once
            if id(c.prompt_ids) not in prompt_index:
                prompt_index[id(c.prompt_ids)] = len(prompts_ids)
                prompts_ids.append(c.prompt_ids)
        columns = (
            [len(group) for group in groups] if nested else None,
            [c.prompt for c in flat], [c.text for c in flat], [c.stop_reason for c in flat],
            [c.generator_version for c in flat], [c.metadata for c in flat],
            [prompt_index[id(c.prompt_ids)] for c in flat], _pack_many(prompts_ids),
            _pack_many([c.token_ids for c in flat]), _pack_many([c.logprobs for c in flat]),
        )
        return (_rebuild_completion_list, columns)


def _rebuild_completion_list(sizes, prompts, texts, stop_reasons, versions, metadata, prompt_of, prompts_ids,
                             token_ids, logprobs) -> CompletionList:
    prompts_ids, token_ids, logprobs = _unpack_many(prompts_ids), _unpack_many(token_ids), _unpack_many(logprobs)
    flat = [Completion(prompt, text, prompts_ids[p], tokens, lp, stop, version, meta)
            for prompt, text, p, tokens, lp, stop, version, meta
            in zip(prompts, texts, prompt_of, token_ids, logprobs, stop_reasons, versions, metadata)]
    if sizes is None:
        return CompletionList(flat)
    groups, start = CompletionList(), 0
    for size in sizes:
        groups.append(CompletionList(flat[start:start + size]))
        start += size
    return groups


def _pack_many(tensors: list[torch.Tensor]) -> tuple[str, list[int], bytes] | list[tuple[str, bytes]]:
    """1-D tensors of one dtype as (dtype, lengths, one byte string); mixed dtypes one by one."""
    import torch

    if not tensors or len({t.dtype for t in tensors}) > 1:
        return [_pack(t) for t in tensors]
    dtype = str(tensors[0].dtype).removeprefix("torch.")
    try:  # the usual case: 1-D tensors on the CPU
        joined = torch.cat(tensors).detach().cpu()
    except RuntimeError:  # 0-d, or on several devices
        joined = torch.cat([t.detach().reshape(-1).cpu() for t in tensors])
    return dtype, [t.numel() for t in tensors], _bytes(joined)


def _unpack_many(packed: tuple[str, list[int], bytes] | list[tuple[str, bytes]]) -> list[torch.Tensor]:
    if isinstance(packed, list):
        return [_unpack(p) for p in packed]
    dtype, lengths, data = packed
    return list(_unpack((dtype, data)).split(lengths))


def _pack(tensor: torch.Tensor) -> tuple[str, bytes]:
    return str(tensor.dtype).removeprefix("torch."), _bytes(tensor.detach().cpu())


def _bytes(tensor: torch.Tensor) -> bytes:
    import torch

    # seen as bytes, since numpy has no bfloat16
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _unpack(packed: tuple[str, bytes]) -> torch.Tensor:
    import torch

    dtype, data = packed
    if not data:
        return torch.empty(0, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype))


def _rebuild_completion(prompt, text, prompt_ids, token_ids, logprobs, stop_reason, version, metadata):
    return Completion(prompt, text, _unpack(prompt_ids), _unpack(token_ids), _unpack(logprobs),
                      stop_reason, version, metadata)


def check_engine_available(config: EngineConfig, with_gpus: bool | None = None) -> None:
    """Raise ValueError early when the requested backend cannot run here."""
    if config.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "engine_config backend='vllm' needs the optional vllm package (pip install "
                "'forge[vllm]') and a CUDA GPU; use backend='native' otherwise"
            )
        if with_gpus is False:
            raise ValueError("engine_config backend='vllm' runs on GPUs: use Policy.options(with_gpus=True)")


class Policy(ForgeActor):
    """Generation actor/service; see the module docstring."""

    def __init__(self, engine_config: dict | EngineConfig | None = None,
                 sampling_config: dict | SamplingParams | None = None, weight_store: str | None = None) -> None:
        from forge.weights import WeightStore

        self.engine_config = EngineConfig.parse(engine_config)
        self.sampling = SamplingParams.parse(sampling_config)
        self.store = WeightStore.resolve(weight_store)
        self._engine: GenerationEngine | None = None
        self._tokenizer: Any = None

    @classmethod
    def validate_arguments(cls, engine_config: Any = None, sampling_config: Any = None,
                           weight_store: Any = None, **unknown: Any) -> None:
        from forge.weights import WeightStore

        if unknown:
            raise ValueError(
                f"Policy got unknown argument(s) {sorted(unknown)}; it takes engine_config, "
                "sampling_config and weight_store"
            )
        WeightStore.resolve(weight_store)
        check_engine_available(EngineConfig.parse(engine_config), cls._forge_placement.with_gpus)
        SamplingParams.parse(sampling_config)

    @endpoint
    async def setup(self) -> None:
        """Load the model and build the engine (heavy; runs once per replica start)."""
        from forge.models import load_text_tokenizer, resolve_model_path

        path = resolve_model_path(self.engine_config.model)
        self._tokenizer = load_text_tokenizer(path)  # no transformers import where the tokenizer is plain
        self._engine = build_engine(self.engine_config, path, self._tokenizer)

    def _encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self._engine.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:  # the engine would fail its whole batch on it
                raise ValueError(f"a prompt of token ids has ids outside the model's vocabulary [0, {vocab}): "
                                 f"{[t for t in prompt if not 0 <= t < vocab][:5]}")
            return prompt  # a conversation so far, sent as the tokens it was sampled as
        if isinstance(prompt, str):
            return self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return list(self._tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                            return_dict=False))
        raise ValueError(f"a prompt is a string, a list of chat messages (dicts) or a list of token ids (ints), "
                         f"got {type(prompt).__name__}")

    @concurrent_endpoint
    async def generate(self, prompt: Any, *, sampling_config: dict | None = None) -> list[Completion]:
        """``n`` completions of ``prompt``: a string, chat messages, or token ids (a conversation
        so far, e.g. from ``forge.envs``; with the native engine's prefix cache a session's
        next turn prefills only its new tokens)."""
        return await self._generate(prompt, self.sampling.merged(sampling_config))

    @concurrent_endpoint
    async def generate_batch(self, prompts: list[Any], *,
                             sampling_config: dict | list[dict | None] | None = None) -> list[list[Completion]]:
        """``generate`` for several prompts in one message: one list of ``n`` completions per
        prompt, decoded together in the engine's batch. ``sampling_config`` is one override
        for every prompt or a list of one per prompt (e.g. a ``seed`` each: a prompt with a
        seed gets the same samples whether it comes alone or in a batch)."""
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"Policy.generate_batch: prompts must be a non-empty list, got {type(prompts).__name__}")
        overrides = sampling_config if isinstance(sampling_config, list) else [sampling_config] * len(prompts)
        if len(overrides) != len(prompts):
            raise ValueError(f"Policy.generate_batch: {len(overrides)} sampling configs for {len(prompts)} prompts; "
                             "give one per prompt, or one dict for all")
        params = [self.sampling.merged(o) for o in overrides]  # bad values raise before anything is decoded
        return CompletionList(await asyncio.gather(*(self._generate(p, q) for p, q in zip(prompts, params))))

    async def _generate(self, prompt: Any, params: SamplingParams) -> list[Completion]:
        import torch

        prompt_ids = self._encode(prompt)
        failpoint("Policy.generate")
        started = time.monotonic()
        request = await self._engine.generate(prompt_ids, params)
        sequences = request.sequences
        lengths = [len(seq.token_ids) for seq in sequences]
        # one tensor per field for the whole group, each completion's a view of it
        token_ids = torch.tensor([t for seq in sequences for t in seq.token_ids], dtype=torch.long).split(lengths)
        logprobs = torch.tensor([x for seq in sequences for x in seq.logprobs], dtype=torch.float32).split(lengths)
        prompt_tensor = torch.tensor(prompt_ids, dtype=torch.long)
        latency = time.monotonic() - started
        decode = self._tokenizer.decode
        return CompletionList(
            Completion(prompt, decode(seq.token_ids, skip_special_tokens=True), prompt_tensor, tokens, lp,
                       seq.finish_reason, request.version,
                       {"index": seq.index, "latency_s": latency, "num_prompt_tokens": len(prompt_ids),
                        "num_tokens": length})
            for seq, tokens, lp, length in zip(sequences, token_ids, logprobs, lengths)
        )

    @replay_on_rebuild  # a rebuilt replica loads the current version before it serves
    @endpoint
    async def update_weights(self, policy_version: int, state_dict: dict[str, torch.Tensor] | None = None,
                             source: Any = None) -> int:
        """Load weights version ``policy_version``; returns it once in effect.

        By default the weights come from the weight store the trainer published them to
        (``trainer.push_weights``), mapped from shared memory and copied straight into the
        model. When the version is not on this host and ``source`` (the trainer) is given,
        it is first pulled through Monarch in chunks into this host's store. A
        ``state_dict`` (Hugging Face names) is loaded as given instead.
        """
        if state_dict is not None:
            await self._engine.update_weights(state_dict, int(policy_version))
            return int(policy_version)
        if self._engine.version == int(policy_version):  # e.g. replayed to this rebuilt replica already
            return int(policy_version)
        if source is not None and self.store.find(int(policy_version)) is None:
            started = time.monotonic()
            pulled = await self.store.fetch(int(policy_version), source)
            if pulled:  # 0: another replica of this host pulled it
                record_metric("weight_sync/pulled_mb", pulled / 1e6, "sum")
                record_metric("weight_sync/pull_s", time.monotonic() - started, "max")
        await self.store.wait_for(int(policy_version))  # never block this replica's event loop
        failpoint("Policy.update_weights")
        with self.store.open(int(policy_version)) as published:
            await self._engine.update_weights(published, int(policy_version))
        return int(policy_version)

    async def __cleanup__(self, exc: Any) -> None:
        self.store.close()  # weights this replica mirrored from another host
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.close()

    @endpoint
    async def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the generator's current weights (to check a sync; small models only)."""
        return self._engine.state_dict()

    @endpoint
    async def get_version(self) -> int:
        return self._engine.version

    @endpoint
    async def engine_stats(self) -> dict:
        """This replica's engine counters (scheduler occupancy, tokens generated, version)."""
        return self._engine.statistics()
