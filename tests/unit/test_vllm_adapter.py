"""The vLLM adapter's own logic, without vLLM: a recording stand-in plays ``vllm.LLM``."""

import asyncio
import os
import sys
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.vllm_adapter import (
    IN_PROCESS_ENV,
    PICKLE_ENV,
    VllmEngine,
    convert_output,
    engine_arguments,
)


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    """The fields of vLLM's CompletionOutput the adapter reads."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[Completion]


def completion(tokens, index=0, reason="stop"):
    """Each sampled token's logprob is -(position + 1); a runner-up token sits beside it."""
    steps = [{token: Logprob(-(position + 1.0)), 999: Logprob(-50.0)} for position, token in enumerate(tokens)]
    return Completion(index, list(tokens), steps, reason)


class RecordingLLM:
    """Stands in for ``vllm.LLM``: records every call with the engine version seen at that
    moment, answers each prompt with its tokens reversed, and can hold ``generate`` until
    ``gate`` is set."""

    def __init__(self):
        self.calls = []
        self.loaded = []
        self.reset_ok = True
        self.gate: threading.Event | None = None
        self.version_of = lambda: None

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate", self.version_of(), [p["prompt_token_ids"] for p in prompts], params))
        if self.gate is not None:
            self.gate.wait(5)
        return [RequestOutput(str(i), [completion(p["prompt_token_ids"][::-1])]) for i, p in enumerate(prompts)]

    def collective_rpc(self, method):
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(load_weights=self._load)))
        return [method(worker)]

    def _load(self, weights):
        self.calls.append(("load", self.version_of()))
        self.loaded.append(dict(weights))

    def reset_prefix_cache(self):
        self.calls.append(("reset", self.version_of()))
        return self.reset_ok


@pytest.fixture
def llm():
    return RecordingLLM()


@pytest.fixture
def engine(llm):
    engine = VllmEngine(llm, EngineConfig(backend="vllm"), dict)
    llm.version_of = lambda: engine.version
    return engine


async def until(condition):
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


# ---- construction --------------------------------------------------------------


def test_the_llm_reports_processed_logprobs_unless_extra_names_a_mode():
    args = engine_arguments(EngineConfig(backend="vllm", dtype="bfloat16", max_model_len=256))
    assert args["logprobs_mode"] == "processed_logprobs"
    assert args["dtype"] == "bfloat16" and args["max_model_len"] == 256
    assert args["enable_prefix_caching"] is True
    assert engine_arguments(EngineConfig(backend="vllm", enable_prefix_caching=False))["enable_prefix_caching"] is False
    chosen = engine_arguments(EngineConfig(backend="vllm", extra={"logprobs_mode": "raw_logprobs", "x": 1}))
    assert chosen["logprobs_mode"] == "raw_logprobs" and chosen["x"] == 1


def fake_libraries(monkeypatch, cuda=True):
    built = {}

    class LLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=dict))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda)))
    monkeypatch.setenv(IN_PROCESS_ENV, "placeholder")  # recorded, so the test's value is undone
    monkeypatch.delenv(IN_PROCESS_ENV)
    return built


def test_create_builds_the_llm_in_process_with_processed_logprobs(monkeypatch, tmp_path):
    built = fake_libraries(monkeypatch)
    engine = VllmEngine.create(tmp_path, EngineConfig(backend="vllm", dtype="bfloat16"))
    assert built["model"] == str(tmp_path) and built["logprobs_mode"] == "processed_logprobs"
    assert built["dtype"] == "bfloat16" and engine.version == 0
    assert os.environ[IN_PROCESS_ENV] == "0"


def test_create_refuses_without_cuda_or_with_an_unusable_engine_process(monkeypatch, tmp_path):
    fake_libraries(monkeypatch, cuda=False)
    with pytest.raises(ValueError, match="CUDA"):
        VllmEngine.create(tmp_path, EngineConfig(backend="vllm"))
    fake_libraries(monkeypatch)
    monkeypatch.setenv(IN_PROCESS_ENV, "1")
    monkeypatch.delenv(PICKLE_ENV, raising=False)
    with pytest.raises(ValueError, match=PICKLE_ENV):
        VllmEngine.create(tmp_path, EngineConfig(backend="vllm"))


def test_sampling_params_ask_for_the_sampled_tokens_logprob_and_no_text(engine):
    params = engine._params(SamplingParams(n=4, max_tokens=7, temperature=0.7, stop_token_ids=(5,), seed=3))
    assert params["logprobs"] == 0 and params["detokenize"] is False
    assert params["top_k"] == -1 and params["n"] == 4 and params["stop_token_ids"] == [5]
    assert engine._params(SamplingParams(top_k=20))["top_k"] == 20


# ---- conversion ----------------------------------------------------------------


def test_conversion_picks_each_sampled_tokens_logprob():
    output = RequestOutput("r", [completion([7, 8, 9], index=0), completion([4], index=1, reason="length")])
    result = convert_output(output, version=3)
    assert result.version == 3
    first, second = result.sequences
    assert (first.index, first.token_ids, first.logprobs) == (0, [7, 8, 9], [-1.0, -2.0, -3.0])
    assert (second.index, second.token_ids, second.logprobs) == (1, [4], [-1.0])


@pytest.mark.parametrize("vllm_reason, reason", [("length", "length"), ("stop", "stop"), ("abort", "abort"),
                                                 ("error", "abort"), (None, "abort")])
def test_finish_reasons(vllm_reason, reason):
    output = RequestOutput("r", [completion([1], reason=vllm_reason)])
    assert convert_output(output, 0).sequences[0].finish_reason == reason


def test_a_sampled_token_without_logprob_is_an_error_naming_where():
    sample = completion([5, 6, 7], index=1)
    del sample.logprobs[2][7]
    output = RequestOutput("req-9", [completion([1]), sample])
    with pytest.raises(ValueError, match=r"token 7 of request 'req-9', sample 1, position 2"):
        convert_output(output, 0)
    sample.logprobs = sample.logprobs[:1]
    with pytest.raises(ValueError, match=r"sample 1, position 1 \(logprobs incomplete\)"):
        convert_output(output, 0)
    sample.logprobs = None
    with pytest.raises(ValueError, match=r"sample 1, position 0 \(logprobs missing\)"):
        convert_output(output, 0)


# ---- batching and weight swaps -------------------------------------------------


async def test_concurrent_calls_share_one_batch_and_each_gets_its_own_result(engine, llm):
    prompts = [[1, 2], [3, 4, 5], [6]]
    results = await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=4)) for p in prompts))
    assert [c[0] for c in llm.calls] == ["generate"]
    assert llm.calls[0][2] == prompts and len(llm.calls[0][3]) == 3
    assert [r.sequences[0].token_ids for r in results] == [p[::-1] for p in prompts]
    assert {r.version for r in results} == {0}
    await engine.update_weights({"w": 1}, version=5)
    assert (await engine.generate([1], SamplingParams())).version == 5


async def test_update_weights_loads_then_resets_the_prefix_cache_then_bumps_the_version(engine, llm):
    await engine.update_weights({"a": 1, "b": 2}, version=1)
    assert llm.calls == [("load", 0), ("reset", 0)]
    assert llm.loaded == [{"a": 1, "b": 2}] and engine.version == 1
    assert engine.statistics()["version"] == 1


async def test_a_refused_prefix_cache_reset_is_an_error_and_keeps_the_version(engine, llm):
    llm.reset_ok = False
    with pytest.raises(RuntimeError, match="prefix cache"):
        await engine.update_weights({"a": 1}, version=1)
    assert engine.version == 0 and [c[0] for c in llm.calls] == ["load", "reset"]


async def test_a_weight_update_waits_for_the_running_batch(engine, llm):
    llm.gate = threading.Event()
    running = asyncio.ensure_future(engine.generate([1, 2], SamplingParams()))
    await until(lambda: llm.calls)
    update = asyncio.ensure_future(engine.update_weights({"a": 1}, version=1))
    await asyncio.sleep(0.02)
    assert [c[0] for c in llm.calls] == ["generate"] and not update.done()
    llm.gate.set()
    assert (await running).version == 0
    await update
    assert [c[0] for c in llm.calls] == ["generate", "load", "reset"]
    assert (await engine.generate([3], SamplingParams())).version == 1


async def test_a_bad_output_fails_only_its_own_caller(engine, llm):
    answer = llm.generate

    def generate(prompts, params, use_tqdm):
        outputs = answer(prompts, params, use_tqdm)
        outputs[1].outputs[0].logprobs = None
        return outputs

    llm.generate = generate
    good, bad = await asyncio.gather(engine.generate([1], SamplingParams()), engine.generate([2], SamplingParams()),
                                     return_exceptions=True)
    assert good.sequences[0].token_ids == [1]
    assert isinstance(bad, ValueError) and "request '1'" in str(bad)


async def test_close_cancels_the_running_batch_and_the_waiting_calls(engine, llm):
    llm.gate = threading.Event()
    running = asyncio.ensure_future(engine.generate([1], SamplingParams()))
    await until(lambda: llm.calls)
    waiting = asyncio.ensure_future(engine.generate([2], SamplingParams()))
    await asyncio.sleep(0)
    assert engine.statistics()["waiting"] == 1
    await engine.close()
    llm.gate.set()  # lets the worker thread finish
    for call in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await call
    assert engine.statistics()["waiting"] == 0
